"""A real fine-tuned model: the default model fully fine-tuned on book text (LAMBADA passages).

Delta compression needs a fine-tune whose weights moved for a reason. This module makes one
on the CPU in a few minutes and caches it like the default model.

- Data: the domain training passages (data.py), cut into random windows drawn by seed.
- Training: every parameter (embeddings too; tied embeddings stay tied), fp32 master weights,
  optional bf16 autocast, AdamW, warmup then cosine or linear decay to 0, through
  `llmshrink.train.train_loop`, so `accelerate launch` spreads each batch over N processes (DDP)
  with the same data as one.
- Output: a plain transformers folder (fp32 safetensors + tokenizer) with `llmshrink_finetune.json`
  (config, base, domain perplexity before and after), written through `atomic_dir`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from pathlib import Path

import torch
from filelock import FileLock
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from ..errors import UsageError
from ..io import atomic_dir, cache_dir, prepare_out
from ..models import DEFAULT_MODEL, PACKAGED_MODELS, resolve_model
from ..train.loop import LoopConfig, setup_accelerator, train_loop
from .config import RECORD, FinetuneConfig
from .data import DOMAIN_CORPUS, DOMAIN_EVAL_PASSAGES, domain_perplexity, domain_texts

__all__ = ["finetune", "finetuned_model"]

logger = logging.getLogger(__name__)


def _windows(n_tokens: int, config: FinetuneConfig) -> torch.Tensor:
    """[steps, grad_accum, batch_size] start offsets of the training windows, fixed by the seed."""
    if n_tokens <= config.seqlen:
        raise UsageError(f"the training text has {n_tokens} tokens, too few for windows of seqlen={config.seqlen}; "
                         "use a smaller seqlen")
    g = torch.Generator().manual_seed(config.seed)
    return torch.randint(0, n_tokens - config.seqlen, (config.steps, config.grad_accum, config.batch_size), generator=g)


def _optimizer(model: torch.nn.Module, config: FinetuneConfig) -> torch.optim.Optimizer:
    """AdamW; weight decay on matrices (embeddings included), none on norms and biases."""
    decay, no_decay = [], []
    for p in model.parameters():  # tied weights appear once
        (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.95), eps=1e-8)


def _load_base(name: str | Path | None) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, str]:
    """(fp32 model, tokenizer, resolved folder or Hub id) of a plain, unquantized checkpoint."""
    resolved = resolve_model(None if name is None else str(name))
    model = AutoModelForCausalLM.from_pretrained(resolved, dtype=torch.float32)
    if getattr(model.config, "quantization_config", None) is not None:
        raise UsageError(f"{resolved} is a quantized checkpoint; fine-tune the unquantized model it came from")
    tokenizer = AutoTokenizer.from_pretrained(resolved)
    return model, tokenizer, resolved


def _eval_ppl(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, config: FinetuneConfig) -> float:
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
    config.validate()
    out = prepare_out(out, overwrite=True)  # replaced whole; checked here so a bad path fails before training
    accelerator, per_process = setup_accelerator(config.batch_size, mixed_precision=config.mixed_precision,
                                                 what="the fine-tune")
    world, rank = accelerator.num_processes, accelerator.process_index
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

    def batch(step: int, micro: int) -> torch.Tensor:
        return torch.stack([ids[s:s + config.seqlen] for s in starts[step, micro].tolist()])  # [per_process, seqlen]

    model.train()
    loop = LoopConfig(steps=config.steps, lr=config.lr, warmup=config.warmup, schedule=config.schedule,
                      grad_accum=config.grad_accum, max_grad_norm=config.max_grad_norm,
                      mixed_precision=config.mixed_precision, max_minutes=config.max_minutes)
    result = train_loop(accelerator, model, _optimizer(model, config), loop, batch,
                        lambda m, x: m(input_ids=x, labels=x).loss, desc="fine-tune", progress=progress)
    losses, steps_done = result.losses, result.steps_done
    if accelerator.is_main_process:
        logger.info("fine-tuned %d steps in %.0f s (%.2f s/step), loss %.3f -> %.3f", steps_done, result.seconds,
                    result.seconds / steps_done, losses[0], losses[-1])

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        trained = accelerator.unwrap_model(result.model)
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
                "train_seconds": round(result.seconds, 1),
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
