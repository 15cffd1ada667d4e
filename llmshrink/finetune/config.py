"""The fine-tune config: a full fine-tune of a causal LM on the domain training passages."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import MethodConfig
from ..errors import UsageError
from ..train.loop import PRECISIONS
from ..train.schedule import SCHEDULES

__all__ = ["RECORD", "FinetuneConfig"]

RECORD = "llmshrink_finetune.json"


@dataclass
class FinetuneConfig(MethodConfig):
    """A full fine-tune of a causal LM on the domain training passages.

    One optimizer step sees `batch_size * grad_accum` windows of `seqlen` tokens. Under
    `accelerate launch` with N processes each micro-batch of `batch_size` windows is split over
    the processes (batch_size must divide by N), so a config means the same data on 1 or N processes.
    The default takes about 3 minutes on 2 CPU cores; `FinetuneConfig.small()` under a minute.
    """

    METHOD = "finetune"
    VERSION = 1

    steps: int = 24
    seqlen: int = 256
    batch_size: int = 4  # windows per micro-batch, over all processes together
    grad_accum: int = 1
    lr: float = 2e-4
    warmup: int = 2  # steps of linear warmup from 0
    schedule: str = "cosine"  # decay to 0 after warmup: cosine or linear
    weight_decay: float = 0.0  # on matrices only, never on norms
    max_grad_norm: float = 1.0  # 0 turns clipping off
    mixed_precision: str = "bf16"  # "bf16": autocast forward/backward over fp32 master weights; "no": fp32
    seed: int = 0
    max_minutes: float | None = None  # stop early after this much training time (the schedule is unchanged)
    eval_seqlen: int = 512  # domain perplexity before/after, recorded in llmshrink_finetune.json
    eval_windows: int | None = 20  # first 20 of the 78 windows (a quarter, ~25 s); None: the whole eval text

    @classmethod
    def small(cls) -> "FinetuneConfig":
        """A fine-tune for tests: under a minute on 2 CPU cores, measured on 20 eval windows of 128 tokens."""
        return cls(steps=12, seqlen=128, batch_size=2, lr=2e-4, warmup=2, eval_seqlen=128, eval_windows=20)

    def validate(self) -> None:
        """Raise UsageError naming the fix if a field is out of range."""
        checks = [
            (self.steps >= 1, f"steps={self.steps} trains nothing; use steps >= 1"),
            (self.seqlen >= 2, f"seqlen={self.seqlen} has no token to predict; use seqlen >= 2"),
            (self.batch_size >= 1, f"batch_size={self.batch_size} is empty; use batch_size >= 1"),
            (self.grad_accum >= 1, f"grad_accum={self.grad_accum} is invalid; use grad_accum >= 1"),
            (self.lr > 0, f"lr={self.lr} does not train; use a positive learning rate such as 1e-4"),
            (0 <= self.warmup <= self.steps, f"warmup={self.warmup} must be between 0 and steps={self.steps}"),
            (self.schedule in SCHEDULES, f"schedule='{self.schedule}' is unknown; use one of {', '.join(SCHEDULES)}"),
            (self.weight_decay >= 0, f"weight_decay={self.weight_decay} is negative; use 0 or more"),
            (self.max_grad_norm >= 0, f"max_grad_norm={self.max_grad_norm} is negative; use 0 (off) or more"),
            (self.mixed_precision in PRECISIONS,
             f"mixed_precision='{self.mixed_precision}' is unsupported; use one of {', '.join(PRECISIONS)}"),
            (self.max_minutes is None or self.max_minutes > 0,
             f"max_minutes={self.max_minutes} stops before the first step; use a positive number or None"),
            (self.eval_seqlen >= 2, f"eval_seqlen={self.eval_seqlen} scores nothing; use eval_seqlen >= 2"),
            (self.eval_windows is None or self.eval_windows >= 1,
             f"eval_windows={self.eval_windows} scores nothing; use a positive number or None for all"),
        ]
        for ok, message in checks:
            if not ok:
                raise UsageError(message)
