"""The heal config: LoRA / QLoRA healing of a (pruned) model, and the names its output uses."""

from __future__ import annotations

import dataclasses

from ..config import MethodConfig
from ..errors import UsageError
from ..train.schedule import SCHEDULES

__all__ = ["ADAPTERS", "LOSSES", "RECORD", "HealConfig"]

RECORD = "llmshrink_heal.json"
ADAPTERS = ("lora", "qlora", "full")
LOSSES = ("ce", "kd", "ce+kd")


@dataclasses.dataclass
class HealConfig(MethodConfig):
    """LoRA / QLoRA healing of a pruned model.

    One optimizer step sees `batch_size * grad_accum` windows of `seqlen` tokens, drawn in order
    from `nsamples` calibration windows (cycled); `batch_size` counts all processes together.
    """

    METHOD = "heal"
    VERSION = 1

    adapter: str = "lora"  # lora: fp32 base; qlora: NF4 base; full: every weight trained (`--method`)
    loss: str = "ce+kd"  # ce, kd or ce+kd (kd needs a teacher)
    alpha: float = 0.5  # ce+kd: alpha * KD + (1 - alpha) * CE
    temperature: float = 2.0  # KD temperature T; the KL is multiplied by T^2
    rank: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    target_modules: str = "all-linear"  # peft's target_modules: "all-linear" or comma-separated names
    steps: int = 100
    seqlen: int = 256
    batch_size: int = 4
    grad_accum: int = 1
    lr: float = 2e-4
    warmup: int = 0  # steps of linear warmup from 0
    schedule: str = "cosine"
    max_grad_norm: float = 1.0  # 0 turns clipping off
    calibration: str = "wiki"  # wiki (its calibration half) or a .txt/.jsonl path
    nsamples: int = 256
    seed: int = 0
    eval_every: int = 0  # held-out perplexity at step 0, every eval_every steps and at the end; 0: never
    eval_docs: int = 40  # the first N wiki passages (the eval half) ...
    eval_seqlen: int = 256  # ... cut into windows of this many tokens (gptq protocol)
    eval_windows: int = 8  # and at most this many windows scored
    save_every: int = 0  # checkpoint into OUT.checkpoint every N steps; 0: never
    merge: bool = False  # OUT: a merged full checkpoint (adapter in OUT/adapter) instead of the adapter
    max_minutes: float | None = None  # stop early after this much training time (the schedule is unchanged)
    keep_zeros: bool = False  # full: weights exactly zero at the start get no update (a sparse model stays sparse)

    @property
    def writes_model(self) -> bool:
        """Whether OUT is a full model (merged LoRA, or every weight trained) rather than an adapter."""
        return self.merge or self.adapter == "full"

    def validate(self) -> None:
        checks = [
            (self.adapter in ADAPTERS, f"method='{self.adapter}' is unknown; use one of {', '.join(ADAPTERS)}"),
            (self.loss in LOSSES, f"loss='{self.loss}' is unknown; use one of {', '.join(LOSSES)}"),
            (0 <= self.alpha <= 1, f"alpha={self.alpha} is outside [0, 1]; it weighs KD against CE "
                                   "(loss = alpha * KD + (1 - alpha) * CE)"),
            (self.temperature > 0, f"temperature={self.temperature} must be positive, e.g. 2.0"),
            (self.rank >= 1, f"rank={self.rank} adds nothing; use rank >= 1, e.g. 16"),
            (self.lora_alpha > 0, f"lora_alpha={self.lora_alpha} must be positive, e.g. 2 * rank"),
            (0 <= self.lora_dropout < 1, f"lora_dropout={self.lora_dropout} must be in [0, 1)"),
            (self.steps >= 1, f"steps={self.steps} trains nothing; use steps >= 1"),
            (self.seqlen >= 2, f"seqlen={self.seqlen} has no token to predict; use seqlen >= 2"),
            (self.batch_size >= 1, f"batch_size={self.batch_size} is empty; use batch_size >= 1"),
            (self.grad_accum >= 1, f"grad_accum={self.grad_accum} is invalid; use grad_accum >= 1"),
            (self.lr > 0, f"lr={self.lr} does not train; use a positive learning rate such as 2e-4"),
            (0 <= self.warmup <= self.steps, f"warmup={self.warmup} must be between 0 and steps={self.steps}"),
            (self.schedule in SCHEDULES, f"schedule='{self.schedule}' is unknown; use one of {', '.join(SCHEDULES)}"),
            (self.max_grad_norm >= 0, f"max_grad_norm={self.max_grad_norm} is negative; use 0 (off) or more"),
            (self.nsamples >= 1, f"nsamples={self.nsamples} gives no training windows; use nsamples >= 1"),
            (self.eval_every >= 0, f"eval_every={self.eval_every} is negative; use 0 (never) or more"),
            (self.eval_docs >= 1 and self.eval_windows >= 1 and self.eval_seqlen >= 2,
             f"eval_docs={self.eval_docs}, eval_windows={self.eval_windows}, eval_seqlen={self.eval_seqlen} "
             "score nothing; use eval_docs >= 1, eval_windows >= 1, eval_seqlen >= 2"),
            (self.save_every >= 0, f"save_every={self.save_every} is negative; use 0 (never) or more"),
            (not (self.adapter == "full" and self.save_every),
             f"save_every={self.save_every}: method='full' keeps no resumable checkpoints (they hold adapters); "
             "leave save_every at 0 or heal with lora"),
            (not self.keep_zeros or self.adapter == "full",
             f"keep_zeros holds weights at zero while they train, and method='{self.adapter}' trains an adapter "
             "whose update is dense; use method='full' (sparse fine-tuning), or drop keep_zeros"),
            (self.max_minutes is None or self.max_minutes > 0,
             f"max_minutes={self.max_minutes} stops before the first step; use a positive number or None"),
        ]
        for ok, message in checks:
            if not ok:
                raise UsageError(message)
