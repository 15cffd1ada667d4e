"""Healing a pruned model: LoRA or QLoRA fine-tuning on calibration text, with optional distillation.

A model with decoder layers removed (`llmshrink prune --layers N`) loses quality; a short LoRA
fine-tune on calibration text wins much of it back. The loss is cross-entropy on the next token
(`ce`), logit distillation from the unpruned teacher (`kd`: KL(teacher || student) at
temperature T, times T^2) or both (`ce+kd`: alpha * KD + (1 - alpha) * CE); see losses.py.

- `lora`: the pruned model in fp32, peft LoRA on every decoder linear; on an llmshrink/GPTQ
  checkpoint the LoRA layers wrap its packed QuantLinear modules (see `llmshrink.heal.adapters`; such
  an adapter cannot be merged). `qlora`: the frozen base in bitsandbytes NF4 (see qlora.py).
  `full`: no adapter, every weight of the fp32 model trains (a dense or factorized input; the
  output is the model itself, in the input's format; no resumable checkpoints). With
  `keep_zeros` the weights that are exactly zero at the start get no gradient, so AdamW (no
  weight decay) never moves them: a pruned model is fine-tuned and stays exactly as sparse.
- Trains through `llmshrink.train.train_loop`, like `llmshrink.finetune`: one process as is, or N
  under `accelerate launch` (each batch split over the processes; only the main process evaluates and saves).
- Output, written through `atomic_dir` (a crash leaves no half folder):
  without `merge`, OUT is a plain peft adapter (adapter_config.json + adapter_model.safetensors,
  plus the tokenizer); with `merge`, OUT is a full merged transformers checkpoint and the adapter
  sits in OUT/adapter. Either way OUT/llmshrink_heal.json records the config, losses and evals.
- Resume: every `save_every` steps the adapter (a peft adapter), the AdamW state (safetensors +
  json), the step and every process's RNG state go to the sibling folder `OUT.checkpoint`
  (beside OUT, not in it, so OUT itself is only ever written whole; see `llmshrink.train.checkpoint`).
  `resume=True` continues from it to the same result as an uninterrupted run, refusing a
  checkpoint of other settings or other input; it is removed once OUT is written. Nothing is
  ever unpickled.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import PreTrainedTokenizerBase

from ..calibration import calibration_windows
from ..errors import UsageError
from ..evals.data import load_corpus
from ..evals.perplexity import perplexity_of_ids
from ..io import atomic_dir, fingerprint, fingerprint_change, prepare_out, tensor_sha256
from ..models import resolve_model
from ..train.checkpoint import MODEL_FOLDER, checkpoint_dir, read_checkpoint
from ..train.loop import Checkpoint, LoopConfig, setup_accelerator, train_loop
from .adapters import ADAPTER_WEIGHTS, adapter_mismatch, add_lora
from .config import RECORD, HealConfig
from .load import FACTORIZED, heal_lora_config, load_student, load_teacher, load_tokenizer, quantization
from .losses import heal_loss
from .merge import NO_MERGE, merge_into, save_trained
from .qlora import eval_mode

__all__ = ["heal", "keep_zeros"]

logger = logging.getLogger(__name__)


def _held_out_ids(tokenizer: PreTrainedTokenizerBase, config: HealConfig) -> torch.Tensor:
    """[<= eval_windows * eval_seqlen] ids of the first wiki passages (the evaluation half)."""
    ids = torch.tensor(tokenizer(load_corpus("wiki", limit=config.eval_docs)).input_ids, dtype=torch.long)
    return ids[:config.eval_windows * config.eval_seqlen]


def _evaluate(model: torch.nn.Module, ids: torch.Tensor, config: HealConfig) -> float:
    with eval_mode(model):
        return perplexity_of_ids(model, ids, seqlen=config.eval_seqlen, protocol="gptq").ppl


def _micro_batch_loss(model: torch.nn.Module, teacher: torch.nn.Module | None, x: torch.Tensor,
                      config: HealConfig) -> torch.Tensor:
    """Loss of one micro-batch x [per_process, seqlen]."""
    teacher_logits = None
    if teacher is not None:
        with torch.no_grad():
            teacher_logits = teacher(input_ids=x).logits  # [per_process, seqlen, vocab]
    return heal_loss(model(input_ids=x).logits, x, teacher_logits, config)


def _load_checkpoint_adapter(peft_model: torch.nn.Module, ckpt: Path, resolved: str) -> None:
    """Put the checkpoint's adapter weights into `peft_model`, after checking they fit it."""
    from peft import set_peft_model_state_dict  # lazy: peft adds seconds to `import llmshrink`

    why = adapter_mismatch(peft_model, ckpt / MODEL_FOLDER, resolved)
    if why:
        raise UsageError(f"cannot resume: {why}; remove {ckpt} or give the model it was trained on")
    set_peft_model_state_dict(peft_model, load_file(str(ckpt / MODEL_FOLDER / ADAPTER_WEIGHTS)))


def _check_same_inputs(state: dict, inputs: dict, ckpt: Path) -> None:
    """UsageError if the checkpoint was trained on another model, teacher or training text."""
    if state.get("inputs") != inputs:
        saved = state.get("inputs") or {"model": {"?": {}}}  # older checkpoints recorded no input
        changes = (f"the {role}'s {change}" for role in ("model", "teacher")
                   if (change := fingerprint_change(saved.get(role, {}), inputs[role])))
        why = next(changes, "the training windows differ")
        raise UsageError(f"cannot resume from {ckpt}: {why}; start over without --resume, or give the same input")


def keep_zeros(model: torch.nn.Module) -> int:
    """Mask the gradient of every trainable weight at its exact zeros, so training keeps them zero
    (with an optimizer whose update is zero where every gradient was: AdamW without weight decay).
    Returns how many weights are held."""
    held = 0
    for p in model.parameters():
        if p.requires_grad and p.dim() > 1:
            mask = p.detach() != 0
            if not bool(mask.all()):
                p.register_hook(lambda g, mask=mask: g * mask)
                held += int(mask.numel() - mask.sum())
    return held


def heal(model: str | os.PathLike, config: HealConfig, out: str | os.PathLike, teacher: str | os.PathLike | None = None,
         resume: bool = False, overwrite: bool = False, progress: bool = True) -> Path:
    """Heal a (pruned) model with LoRA or QLoRA and save the adapter, or the merged model, to `out`;
    with `config.adapter == "full"`, train every weight and save the model.

    Runs as is in one process, or under `accelerate launch` on N processes.

    Args:
        model: the model to heal: packaged alias or folder (with its tokenizer).
        config: see `HealConfig`.
        out: folder to write, whole and only at the end; checkpoints go to `checkpoint_dir(out)`.
        teacher: the unpruned model, for `kd` and `ce+kd` (same tokenizer).
        resume: continue from `checkpoint_dir(out)`.
        overwrite: replace a non-empty `out`.
        progress: progress bar with the loss (main process only).
    Returns:
        `out`.
    """
    config.validate()
    out, ckpt = prepare_out(out, overwrite), checkpoint_dir(out)
    if config.loss != "ce" and teacher is None:
        raise UsageError(f"loss='{config.loss}' distills from a teacher; pass --teacher (the unpruned model) "
                         "or use --loss ce")
    accelerator, per_process = setup_accelerator(config.batch_size, checkpoints=bool(config.save_every))
    world, rank = accelerator.num_processes, accelerator.process_index
    state = read_checkpoint(ckpt, config, world) if resume else None

    resolved = resolve_model(model)
    teacher_resolved = resolve_model(teacher) if config.loss != "ce" else None  # both found before any load
    if config.merge and quantization(resolved) not in (None, FACTORIZED):
        raise UsageError(NO_MERGE.format(model=resolved))
    tokenizer = load_tokenizer(resolved)
    student = load_student(resolved, config.adapter)
    teacher_model = None
    if config.loss != "ce":
        teacher_model = load_teacher(teacher_resolved, student, tokenizer, resolved, accelerator.device)
    elif teacher is not None:
        logger.warning("loss='ce' does not use the teacher %s", teacher)

    torch.manual_seed(config.seed)  # the same LoRA init on every process and every run
    if config.adapter == "full":  # every weight trains (no checkpoints: validate refuses save_every)
        peft_model = student.requires_grad_(True)
        if config.keep_zeros:
            logger.info("keep_zeros: %d weights held at zero", keep_zeros(peft_model))
    else:
        peft_model = add_lora(student, heal_lora_config(student, config))
        if state is not None:
            _load_checkpoint_adapter(peft_model, ckpt, resolved)
    peft_model.train()  # from_pretrained returns eval mode: a bnb forward in it would repack the weights
    if rank == 0:
        trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
        logger.info("healing %s with %s%s (%d trainable parameters), loss %s, %d process(es)", resolved,
                    config.adapter, "" if config.adapter == "full" else f" rank {config.rank}", trainable,
                    config.loss, world)

    windows = calibration_windows(tokenizer, config.calibration, nsamples=config.nsamples, seqlen=config.seqlen,
                                  seed=config.seed)  # [nsamples, seqlen]
    inputs = {"model": fingerprint(resolved), "teacher": fingerprint(teacher_resolved),
              "windows_sha256": tensor_sha256(windows)}
    if state is not None:
        _check_same_inputs(state, inputs, ckpt)
    eval_ids = _held_out_ids(tokenizer, config) if config.eval_every and accelerator.is_main_process else None

    def batch(step: int, micro: int) -> torch.Tensor:
        """This process's rows of micro-batch `micro` of step `step`, cycling through the windows."""
        first = (step * config.grad_accum + micro) * config.batch_size + rank * per_process
        return windows[[(first + b) % config.nsamples for b in range(per_process)]]  # [per_process, seqlen]

    def evaluate(model_ddp: torch.nn.Module, step: int) -> dict | None:
        if eval_ids is None:
            return None
        ppl = _evaluate(accelerator.unwrap_model(model_ddp), eval_ids, config)
        logger.info("step %d: held-out wiki perplexity %.3f", step, ppl)
        return {"ppl": ppl}

    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, betas=(0.9, 0.999), weight_decay=0.0)
    meta = {"config": config.to_dict(), "model": resolved, "teacher": teacher_resolved, "num_processes": world,
            "inputs": inputs}
    loop = LoopConfig(steps=config.steps, lr=config.lr, warmup=config.warmup, schedule=config.schedule,
                      grad_accum=config.grad_accum, max_grad_norm=config.max_grad_norm,
                      eval_every=config.eval_every, save_every=config.save_every, max_minutes=config.max_minutes)
    result = train_loop(accelerator, peft_model, optimizer, loop, batch,
                        lambda m, x: _micro_batch_loss(m, teacher_model, x, config),  # looked up per call: a test seam
                        evaluate, Checkpoint(ckpt, meta, resume=state), desc=f"heal ({config.adapter})",
                        progress=progress)
    losses = result.losses

    state_dict = accelerator.get_state_dict(result.model)
    if accelerator.is_main_process:
        trained = accelerator.unwrap_model(result.model)
        record = {**meta, "steps_done": result.steps_done, "resumed_from": result.resumed_from,
                  "train_seconds": round(result.seconds, 1), "loss_first": losses[0] if losses else None,
                  "loss_last": losses[-1] if losses else None, "losses": losses, "evals": result.evals}
        with atomic_dir(out) as tmp:
            if config.adapter == "full":
                save_trained(resolved, trained, state_dict, tmp)
            else:
                adapter = tmp / "adapter" if config.merge else tmp
                trained.save_pretrained(adapter, state_dict=state_dict)
                if config.merge:
                    merge_into(resolved, trained, adapter, config.adapter, tmp)
            tokenizer.save_pretrained(tmp)
            (tmp / RECORD).write_text(json.dumps(record, indent=2) + "\n")
        if ckpt.exists():
            shutil.rmtree(ckpt)
        logger.info("healed %s in %.0f s: loss %.3f -> %.3f; %s written to %s", resolved, result.seconds,
                    losses[0] if losses else float("nan"), losses[-1] if losses else float("nan"),
                    "model" if config.writes_model else "adapter", out)
    accelerator.wait_for_everyone()
    return out
