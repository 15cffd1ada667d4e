"""A real fine-tuned model: the default model fully fine-tuned on book text (LAMBADA passages).

Delta compression needs a fine-tune whose weights moved for a reason. This module makes one
on the CPU in a few minutes and caches it like the default model.

- Domain split: the 5153 LAMBADA passages in file order; the first 500 are the domain eval set,
  the other 4653 the training set. Domain perplexity is the `gptq` protocol of
  `llmshrink.evals.perplexity` on the eval passages joined by blank lines.
- Training: every parameter (embeddings too; tied embeddings stay tied), fp32 master weights,
  optional bf16 autocast, AdamW, warmup then cosine or linear decay to 0, random windows of the
  tokenized training text drawn by seed. It runs through `accelerate.Accelerator`, so
  `accelerate launch` spreads each batch over N processes (DDP) with the same data as one.
- Output: a plain transformers folder (fp32 safetensors + tokenizer) with `llmshrink_finetune.json`
  (config, base, domain perplexity before and after), written through `atomic_dir`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from filelock import FileLock
from tqdm.auto import tqdm

from ..config import MethodConfig
from ..errors import UsageError
from ..evals.data import corpus_documents
from ..evals.perplexity import perplexity_of_ids
from ..io import atomic_dir, cache_dir, prepare_out
from ..models import DEFAULT_MODEL, PACKAGED_MODELS, resolve_model

__all__ = ["DOMAIN_EVAL_PASSAGES", "RECORD", "FinetuneConfig", "domain_texts", "domain_eval_text", "domain_perplexity",
           "finetune", "finetuned_model", "lr_factor"]

logger = logging.getLogger(__name__)

DOMAIN_CORPUS = "lambada"
DOMAIN_EVAL_PASSAGES = 500  # the first 500 LAMBADA passages (file order) are held out for evaluation
RECORD = "llmshrink_finetune.json"
SCHEDULES = ("cosine", "linear")
PRECISIONS = ("no", "bf16")


# ----------------------------------------------------------------------------- domain data

def domain_texts() -> tuple[list[str], list[str]]:
    """The LAMBADA passages split for fine-tuning.

    Returns:
        (train_docs, eval_docs): eval is the first 500 passages in file order, train the other 4653.
    """
    docs = corpus_documents(DOMAIN_CORPUS)
    return docs[DOMAIN_EVAL_PASSAGES:], docs[:DOMAIN_EVAL_PASSAGES]


def domain_eval_text() -> str:
    """The 500 held-out passages joined by blank lines (about 40k SmolLM2 tokens)."""
    return "\n\n".join(domain_texts()[1])


def domain_perplexity(model, tokenizer, seqlen: int = 512, limit_windows: int | None = None) -> float:
    """Perplexity on the domain eval text, `gptq` protocol (non-overlapping windows of `seqlen`).

    Args:
        model: a causal LM; it is put in eval mode and left there.
        tokenizer: its tokenizer.
        seqlen: tokens per window.
        limit_windows: score only the first this many windows (all, about 40k // seqlen, if None).
    Returns:
        exp(mean NLL) over the scored tokens.
    """
    ids = torch.tensor(tokenizer(domain_eval_text()).input_ids, dtype=torch.long)
    if limit_windows is not None:
        if limit_windows < 1:
            raise UsageError(f"limit_windows={limit_windows} scores nothing; use a positive number or None for all")
        ids = ids[:limit_windows * seqlen]  # [limit_windows * seqlen]
    model.eval()
    return perplexity_of_ids(model, ids, seqlen=seqlen, protocol="gptq").ppl


# ----------------------------------------------------------------------------- config

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


def lr_factor(step: int, steps: int, warmup: int, schedule: str) -> float:
    """Multiplier of the peak learning rate at optimizer step `step` (0-based) of `steps`.

    Linear warmup over `warmup` steps (the first step already trains at lr / warmup), then
    cosine or linear decay that would reach 0 one step after the last.
    """
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup + 1) / (steps - warmup + 1)  # in (0, 1): the last step still trains
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0 - progress


# ----------------------------------------------------------------------------- training

def _windows(n_tokens: int, config: FinetuneConfig) -> torch.Tensor:
    """[steps, grad_accum, batch_size] start offsets of the training windows, fixed by the seed."""
    if n_tokens <= config.seqlen:
        raise UsageError(f"the training text has {n_tokens} tokens, too few for windows of seqlen={config.seqlen}; "
                         "use a smaller seqlen")
    g = torch.Generator().manual_seed(config.seed)
    return torch.randint(0, n_tokens - config.seqlen, (config.steps, config.grad_accum, config.batch_size), generator=g)


def _optimizer(model, config: FinetuneConfig) -> torch.optim.Optimizer:
    """AdamW; weight decay on matrices (embeddings included), none on norms and biases."""
    decay, no_decay = [], []
    for p in model.parameters():  # tied weights appear once
        (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.95), eps=1e-8)


def _load_base(name: str | Path | None):
    """(fp32 model, tokenizer, resolved folder or Hub id) of a plain, unquantized checkpoint."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    resolved = resolve_model(None if name is None else str(name))
    model = AutoModelForCausalLM.from_pretrained(resolved, dtype=torch.float32)
    if getattr(model.config, "quantization_config", None) is not None:
        raise UsageError(f"{resolved} is a quantized checkpoint; fine-tune the unquantized model it came from")
    tokenizer = AutoTokenizer.from_pretrained(resolved)
    return model, tokenizer, resolved


def _eval_ppl(model, tokenizer, config: FinetuneConfig) -> float:
    was_training = model.training
    ppl = domain_perplexity(model, tokenizer, seqlen=config.eval_seqlen, limit_windows=config.eval_windows)
    model.train(was_training)
    return ppl


def finetune(model_name_or_path: str | Path | None, config: FinetuneConfig, out: str | Path,
             progress: bool = True) -> Path:
    """Fully fine-tune a causal LM on the domain training passages and save it to `out`.

    Runs as is in one process, or under `accelerate launch` on N processes: every process trains
    its share of each batch, the main process measures the domain perplexity and saves.

    Args:
        model_name_or_path: the base model: packaged alias, folder or Hub id (None: the default model).
        config: the fine-tune; see `FinetuneConfig`.
        out: folder to write; replaced whole, and only once everything is written.
        progress: show a progress bar with the loss (main process only).
    Returns:
        `out`, holding model.safetensors (fp32), the tokenizer and llmshrink_finetune.json.
    """
    from accelerate import Accelerator

    config.validate()
    out = prepare_out(out, overwrite=True)  # replaced whole; checked here so a bad path fails before training
    accelerator = Accelerator()  # plain or `accelerate launch`; autocast is ours, from the config
    if accelerator.mixed_precision not in ("no", config.mixed_precision):
        raise UsageError(f"accelerate is set to mixed_precision={accelerator.mixed_precision} but the fine-tune "
                         f"asks for {config.mixed_precision}; launch with --mixed_precision no (the config decides)")
    world, rank = accelerator.num_processes, accelerator.process_index
    if config.batch_size % world:
        raise UsageError(f"batch_size={config.batch_size} does not split over {world} processes; "
                         f"use a multiple of {world}")
    per_process = config.batch_size // world
    torch.manual_seed(config.seed)

    model, tokenizer, resolved = _load_base(model_name_or_path)
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    train_docs, _ = domain_texts()
    ids = torch.tensor(tokenizer("\n\n".join(train_docs)).input_ids, dtype=torch.long)  # [n_train_tokens]
    starts = _windows(len(ids), config)[:, :, rank * per_process:(rank + 1) * per_process]  # this process's share

    ppl_before = None
    if accelerator.is_main_process:
        started = time.perf_counter()
        ppl_before = _eval_ppl(model, tokenizer, config)
        logger.info("domain perplexity of %s before fine-tuning: %.3f (%.0f s)", resolved, ppl_before,
                    time.perf_counter() - started)
    accelerator.wait_for_everyone()

    model.train()
    optimizer = _optimizer(model, config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(  # stepped by hand once per step: not prepared by accelerate
        optimizer, lambda s: lr_factor(s, config.steps, config.warmup, config.schedule))
    model, optimizer = accelerator.prepare(model, optimizer)
    autocast = torch.autocast(accelerator.device.type, dtype=torch.bfloat16,
                              enabled=config.mixed_precision == "bf16")

    bar = tqdm(total=config.steps, desc="fine-tune", disable=not (progress and accelerator.is_main_process))
    losses: list[float] = []
    started, steps_done = time.perf_counter(), 0
    for step in range(config.steps):
        step_loss = torch.zeros((), device=accelerator.device)
        for micro in range(config.grad_accum):
            x = torch.stack([ids[s:s + config.seqlen] for s in starts[step, micro].tolist()])  # [per_process, seqlen]
            x = x.to(accelerator.device)
            sync = micro == config.grad_accum - 1
            with (contextlib.nullcontext() if sync else accelerator.no_sync(model)), autocast:
                loss = model(input_ids=x, labels=x).loss / config.grad_accum
            accelerator.backward(loss)
            step_loss += loss.detach().float()
        if config.max_grad_norm > 0:
            accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm)
        lr = scheduler.get_last_lr()[0]  # the rate this step trained at
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        steps_done += 1
        losses.append(accelerator.reduce(step_loss, "mean").item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}", lr=f"{lr:.1e}")
        bar.update(1)
        elapsed = time.perf_counter() - started
        if config.max_minutes is not None:  # every process must stop at the same step
            stop = torch.tensor(float(elapsed > 60 * config.max_minutes), device=accelerator.device)
            if accelerator.reduce(stop, "sum").item() > 0 and step + 1 < config.steps:
                logger.warning("max_minutes=%s reached: stopping after %d of %d steps", config.max_minutes,
                               steps_done, config.steps)
                break
    bar.close()
    train_seconds = time.perf_counter() - started
    if accelerator.is_main_process:
        logger.info("fine-tuned %d steps in %.0f s (%.2f s/step), loss %.3f -> %.3f", steps_done, train_seconds,
                    train_seconds / steps_done, losses[0], losses[-1])

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        trained = accelerator.unwrap_model(model)
        if tied and trained.get_output_embeddings().weight is not trained.get_input_embeddings().weight:
            raise RuntimeError("the tied input and output embeddings came apart during fine-tuning")
        ppl_after = _eval_ppl(trained, tokenizer, config)
        logger.info("domain perplexity: %.3f before, %.3f after fine-tuning", ppl_before, ppl_after)
        trained.eval()
        with atomic_dir(out) as tmp:
            trained.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            record = {
                "config": config.to_dict(),
                "base": str(model_name_or_path or DEFAULT_MODEL),
                "base_folder": resolved,
                "domain": {"corpus": DOMAIN_CORPUS, "eval_passages": DOMAIN_EVAL_PASSAGES,
                           "protocol": "gptq", "seqlen": config.eval_seqlen, "windows": config.eval_windows},
                "domain_ppl_before": ppl_before,
                "domain_ppl_after": ppl_after,
                "steps_done": steps_done,
                "train_seconds": round(train_seconds, 1),
                "num_processes": world,
                "loss_first": losses[0],
                "loss_last": losses[-1],
            }
            (tmp / RECORD).write_text(json.dumps(record, indent=2) + "\n")
        logger.info("fine-tuned model written to %s", out)
    accelerator.wait_for_everyone()
    return out


# ----------------------------------------------------------------------------- cache

def _cache_name(config: FinetuneConfig, base: str, resolved: str) -> str:
    payload = json.dumps({"config": config.to_dict(), "base": Path(resolved).name}, sort_keys=True)
    digest = hashlib.sha256(payload.encode()).hexdigest()[:12]
    label = base.lower() if base.lower() in PACKAGED_MODELS else re.sub(r"[^\w.\-]+", "_", Path(base).name)
    return f"finetune-{label}-{digest}"


def finetuned_model(config: FinetuneConfig | None = None, base: str = DEFAULT_MODEL, progress: bool = False) -> Path:
    """The fine-tune of `base` under `config`, built once into the llmshrink cache and reused.

    Args:
        config: the fine-tune (default `FinetuneConfig()`: a few minutes on 2 CPU cores).
        base: the base model: packaged alias, folder or Hub id.
        progress: show the training progress bar while building.
    Returns:
        `cache_dir()/models/finetune-<base>-<hash of config and base folder>`, a transformers folder.
    """
    config = config or FinetuneConfig()
    config.validate()
    resolved = resolve_model(base)
    out = cache_dir() / "models" / _cache_name(config, base, resolved)
    if (out / RECORD).is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out) + ".lock"):
        if not (out / RECORD).is_file():  # another process may have finished it meanwhile
            logger.info("fine-tuning %s into %s (once) ...", base, out)
            finetune(base, config, out, progress=progress)
    return out
