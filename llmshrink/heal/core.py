"""Healing a pruned model: LoRA or QLoRA fine-tuning on calibration text, with optional distillation.

A model with decoder layers removed (`llmshrink prune --layers N`) loses quality; a short LoRA
fine-tune on calibration text wins much of it back. The loss is cross-entropy on the next token
(`ce`), logit distillation from the unpruned teacher (`kd`: KL(teacher || student) at
temperature T, times T^2) or both (`ce+kd`: alpha * KD + (1 - alpha) * CE).

- `lora`: the pruned model in fp32, peft LoRA on every decoder linear; on an llmshrink/GPTQ
  checkpoint the LoRA layers wrap its packed QuantLinear modules (see `llmshrink.heal.adapters`; such
  an adapter cannot be merged). `qlora`: the frozen base in bitsandbytes NF4 (on the CPU every
  quantized linear's output width must divide by 32).
- Runs through `accelerate.Accelerator`, like `llmshrink.finetune`: one process as is, or N under
  `accelerate launch` (each batch split over the processes; only the main process evaluates and saves).
- Output, written through `atomic_dir` (a crash leaves no half folder):
  without `merge`, OUT is a plain peft adapter (adapter_config.json + adapter_model.safetensors,
  plus the tokenizer); with `merge`, OUT is a full merged transformers checkpoint and the adapter
  sits in OUT/adapter. Either way OUT/llmshrink_heal.json records the config, losses and evals.
- Resume: every `save_every` steps the adapter (a peft adapter), the AdamW state (safetensors +
  json), the step and every process's RNG state go to the sibling folder `OUT.checkpoint`
  (beside OUT, not in it, so OUT itself is only ever written whole). `resume=True` continues from
  it to the same result as an uninterrupted run; it is removed once OUT is written. Nothing is
  ever unpickled.
- bitsandbytes trap on CPUs with AVX512-BF16: a forward of a `Linear4bit` in eval mode without
  grad repacks its weight into a CPU inference layout whose matmul has no autograd formula, so
  every later backward through it is silently wrong. Evaluation here runs with the whole model in
  eval mode except the `Linear4bit` modules (`_eval_mode`), whose training flag only gates that repack.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .adapters import adapter_mismatch, add_lora, load_adapter, lora_config
from ..calibration import calibration_windows
from ..config import MethodConfig
from ..errors import Interrupted, UsageError
from ..finetune.core import SCHEDULES, lr_factor
from ..io import atomic_dir, fingerprint, fingerprint_change, prepare_out, tensor_sha256
from ..models import resolve_model

__all__ = ["HealConfig", "RECORD", "add_cli", "checkpoint_dir", "config_from_args", "heal", "heal_loss", "kd_loss",
           "merge_adapter"]

logger = logging.getLogger(__name__)

RECORD = "llmshrink_heal.json"
ADAPTERS = ("lora", "qlora")
LOSSES = ("ce", "kd", "ce+kd")
QLORA_MULTIPLE = 32  # bitsandbytes' CPU NF4 path needs output widths divisible by 32
_NO_MERGE = ("{model} is a quantized checkpoint, whose packed weights cannot absorb an adapter; keep the adapter "
             "(no --merge) and load it with llmshrink.AutoModelForCausalLM.from_pretrained(OUT), or heal the "
             "unquantized model and quantize the merged result")


# ----------------------------------------------------------------------------- config

@dataclasses.dataclass
class HealConfig(MethodConfig):
    """LoRA / QLoRA healing of a pruned model.

    One optimizer step sees `batch_size * grad_accum` windows of `seqlen` tokens, drawn in order
    from `nsamples` calibration windows (cycled); `batch_size` counts all processes together.
    """

    METHOD = "heal"
    VERSION = 1

    adapter: str = "lora"  # lora: fp32 base; qlora: NF4 base (`--method` on the command line)
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
        ]
        for ok, message in checks:
            if not ok:
                raise UsageError(message)


# ----------------------------------------------------------------------------- losses (pure math)

def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher || student) of the softened distributions, times T^2, mean over positions.

    Args:
        student_logits, teacher_logits: [..., vocab].
        temperature: T > 0.
    Returns:
        A scalar.
    """
    s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    kl = F.kl_div(s, t, log_target=True, reduction="none").sum(-1)  # [...]
    return kl.mean() * temperature ** 2


def heal_loss(student_logits: torch.Tensor, ids: torch.Tensor, teacher_logits: torch.Tensor | None,
              config: HealConfig) -> torch.Tensor:
    """The training loss of one batch.

    Args:
        student_logits: [batch, seq, vocab].
        ids: [batch, seq] the input ids (next-token targets are ids[:, 1:]).
        teacher_logits: [batch, seq, vocab], or None for `ce`.
        config: its `loss`, `alpha` and `temperature` decide.
    Returns:
        A scalar: CE, T^2 * KL, or alpha * KD + (1 - alpha) * CE.
    """
    def ce() -> torch.Tensor:
        pred = student_logits[:, :-1].float()  # [batch, seq - 1, vocab] predicts ids[:, 1:]
        return F.cross_entropy(pred.reshape(-1, pred.shape[-1]), ids[:, 1:].reshape(-1))

    if config.loss == "ce":
        return ce()
    kd = kd_loss(student_logits, teacher_logits, config.temperature)
    if config.loss == "kd":
        return kd
    return config.alpha * kd + (1 - config.alpha) * ce()


# ----------------------------------------------------------------------------- models

def _bnb_config():
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)


def _check_qlora_widths(resolved: str) -> None:
    """Fail before loading if a linear that NF4 would quantize has an output width not divisible by 32."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(resolved))
    head = model.get_output_embeddings()
    bad = [f"{name} ({m.out_features})" for name, m in model.named_modules()
           if isinstance(m, torch.nn.Linear) and m is not head and m.out_features % QLORA_MULTIPLE]
    if bad:
        raise UsageError(f"qlora on the CPU needs every quantized linear's output width divisible by "
                         f"{QLORA_MULTIPLE}; {resolved} has {', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''}; "
                         "use --method lora")


def _quantization(resolved: str) -> str | None:
    """The quant_method of a checkpoint's quantization_config ("gptq", ...), or None."""
    from transformers import AutoConfig

    from ..gptq.load import quant_method

    return quant_method(AutoConfig.from_pretrained(resolved))


def _load_student(resolved: str, method: str):
    """The model to train, in fp32 compute: plain (lora), NF4 (qlora) or a GPTQ checkpoint's
    QuantLinear modules, kept packed (lora on a quantized base)."""
    from transformers import AutoModelForCausalLM

    quantized = _quantization(resolved)
    if quantized == "gptq" and method == "lora":
        from ..gptq.load import load_quantized

        return load_quantized(resolved, dtype=torch.float32)
    if quantized is not None:
        fix = "use --method lora, which trains on its quantized weights" if quantized == "gptq" else \
            "heal the unquantized model (--method qlora quantizes it itself)"
        raise UsageError(f"{resolved} is a {quantized} checkpoint, which --method {method} cannot train; {fix}")
    if method == "qlora":
        _check_qlora_widths(resolved)
        return AutoModelForCausalLM.from_pretrained(resolved, dtype=torch.float32, quantization_config=_bnb_config())
    return AutoModelForCausalLM.from_pretrained(resolved, dtype=torch.float32)


def _load_tokenizer(resolved: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(resolved)
    except (OSError, ValueError) as e:
        raise UsageError(f"cannot load the tokenizer of {resolved} ({str(e).splitlines()[0]}); "
                         "heal needs a folder saved with its tokenizer") from None


def _check_teacher(student, student_tok, teacher, teacher_tok, model: str, teacher_name: str) -> None:
    """UsageError unless the teacher predicts over the student's vocabulary with the same tokenizer."""
    sv, tv = student.config.vocab_size, teacher.config.vocab_size
    if sv != tv:
        raise UsageError(f"teacher {teacher_name} has vocab_size={tv} but {model} has {sv}; distillation needs "
                         "the same tokenizer: give the model the pruned one came from")
    if student_tok.get_vocab() != teacher_tok.get_vocab():
        raise UsageError(f"teacher {teacher_name} has a different tokenizer vocabulary from {model}; "
                         "distillation needs the same tokenizer: give the model the pruned one came from")


def _lora_config(model, config: HealConfig):
    targets = config.target_modules if config.target_modules == "all-linear" else \
        [t.strip() for t in config.target_modules.split(",") if t.strip()]
    return lora_config(model, config.rank, config.lora_alpha, config.lora_dropout, targets)


def _linear4bit_modules(model) -> list[torch.nn.Module]:
    from bitsandbytes.nn import Linear4bit

    return [m for m in model.modules() if isinstance(m, Linear4bit)]


def _packed_for_cpu(model) -> list[str]:
    """Names of Linear4bit modules whose weight bitsandbytes repacked for CPU inference (breaks backward)."""
    from bitsandbytes.nn import Linear4bit

    return [n for n, m in model.named_modules() if isinstance(m, Linear4bit)
            and getattr(m.weight.quant_state, "packing_format_for_cpu", False)]


@contextlib.contextmanager
def _eval_mode(model):
    """Eval mode (no dropout) for an evaluation forward, but Linear4bit modules stay in training
    mode so bitsandbytes never repacks their weights; the previous mode is restored after."""
    was_training = model.training
    model.eval()
    for m in _linear4bit_modules(model):
        m.training = True  # gates only bitsandbytes' CPU inference repack; Linear4bit has no dropout
    try:
        yield model
    finally:
        model.train(was_training)


# ----------------------------------------------------------------------------- checkpoints

def checkpoint_dir(out: str | Path) -> Path:
    """The resume folder of `out`: the sibling `OUT.checkpoint`."""
    out = Path(out)
    return out.with_name(out.name + ".checkpoint")


def _optimizer_tensors(optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """AdamW state as (safetensors dict, json dict)."""
    sd = optimizer.state_dict()
    tensors = {f"state.{i}.{k}": v.detach().cpu().contiguous() for i, st in sd["state"].items() for k, v in st.items()}
    return tensors, {"param_groups": sd["param_groups"]}


def _load_optimizer(optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        _, i, k = key.split(".", 2)
        state.setdefault(int(i), {})[k] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def _rng_tensors() -> dict[str, torch.Tensor]:
    out = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state()
    return out


def _save_checkpoint(ckpt: Path, accelerator, model, optimizer, step: int, meta: dict) -> None:
    """Every process writes its RNG state; the main process writes adapter, optimizer and state.json last."""
    from safetensors.torch import save_file

    state_dict = accelerator.get_state_dict(model)  # collective under FSDP
    if accelerator.is_main_process:
        ckpt.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    save_file(_rng_tensors(), str(ckpt / f"rng-{accelerator.process_index}.safetensors"))
    if accelerator.is_main_process:
        accelerator.unwrap_model(model).save_pretrained(ckpt / "adapter", state_dict=state_dict)
        tensors, opt_meta = _optimizer_tensors(optimizer)
        save_file(tensors, str(ckpt / "optimizer.safetensors"))
        tmp = ckpt / "state.json.tmp"
        tmp.write_text(json.dumps({**meta, "step": step, "optimizer": opt_meta}, indent=1) + "\n")
        os.replace(tmp, ckpt / "state.json")  # the checkpoint counts once state.json is in place
    accelerator.wait_for_everyone()


def _read_checkpoint(ckpt: Path, config: HealConfig, world: int) -> dict:
    path = ckpt / "state.json"
    if not path.is_file():
        raise UsageError(f"nothing to resume: {path} does not exist; run without --resume (and with "
                         "--save-every N to write checkpoints)")
    state = json.loads(path.read_text())
    saved = HealConfig.from_dict(state["config"])
    if saved != config:
        diff = [f"{f.name}={getattr(saved, f.name)!r}" for f in dataclasses.fields(HealConfig)
                if getattr(saved, f.name) != getattr(config, f.name)]
        raise UsageError(f"the checkpoint in {ckpt} was made with {', '.join(diff)}; resume with the same "
                         "settings or start over without --resume")
    if state["num_processes"] != world:
        raise UsageError(f"the checkpoint in {ckpt} was made on {state['num_processes']} processes, "
                         f"this run has {world}; resume on {state['num_processes']}")
    return state


# ----------------------------------------------------------------------------- training

def _held_out_ids(tokenizer, config: HealConfig) -> torch.Tensor:
    """[<= eval_windows * eval_seqlen] ids of the first wiki passages (the evaluation half)."""
    from ..evals.data import load_corpus

    ids = torch.tensor(tokenizer(load_corpus("wiki", limit=config.eval_docs)).input_ids, dtype=torch.long)
    return ids[:config.eval_windows * config.eval_seqlen]


def _evaluate(model, ids: torch.Tensor, config: HealConfig) -> float:
    from ..evals.perplexity import perplexity_of_ids

    with _eval_mode(model):
        return perplexity_of_ids(model, ids, seqlen=config.eval_seqlen, protocol="gptq").ppl


def _micro_batch_loss(model, teacher, x: torch.Tensor, config: HealConfig) -> torch.Tensor:
    """Loss of one micro-batch x [per_process, seqlen]."""
    teacher_logits = None
    if teacher is not None:
        with torch.no_grad():
            teacher_logits = teacher(input_ids=x).logits  # [per_process, seqlen, vocab]
    return heal_loss(model(input_ids=x).logits, x, teacher_logits, config)


def heal(model: str | os.PathLike, config: HealConfig, out: str | os.PathLike, teacher: str | os.PathLike | None = None,
         resume: bool = False, overwrite: bool = False, progress: bool = True) -> Path:
    """Heal a (pruned) model with LoRA or QLoRA and save the adapter, or the merged model, to `out`.

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
    from accelerate import Accelerator, DistributedType
    from safetensors.torch import load_file

    config.validate()
    out, ckpt = prepare_out(out, overwrite), checkpoint_dir(out)
    if config.loss != "ce" and teacher is None:
        raise UsageError(f"loss='{config.loss}' distills from a teacher; pass --teacher (the unpruned model) "
                         "or use --loss ce")
    accelerator = Accelerator()
    if config.save_every and accelerator.distributed_type == DistributedType.FSDP:
        raise UsageError("save_every checkpoints are not supported under FSDP (the optimizer state is sharded); "
                         "use DDP (recipes/accelerate/ddp.yaml) or save_every: 0")
    world, rank = accelerator.num_processes, accelerator.process_index
    if config.batch_size % world:
        raise UsageError(f"batch_size={config.batch_size} does not split over {world} processes; "
                         f"use a multiple of {world}")
    per_process = config.batch_size // world
    state = _read_checkpoint(ckpt, config, world) if resume else None

    resolved = resolve_model(model)
    teacher_resolved = resolve_model(teacher) if config.loss != "ce" else None  # both found before any load
    if config.merge and _quantization(resolved) is not None:
        raise UsageError(_NO_MERGE.format(model=resolved))
    tokenizer = _load_tokenizer(resolved)
    student = _load_student(resolved, config.adapter)
    teacher_model = None
    if config.loss != "ce":
        from transformers import AutoModelForCausalLM

        teacher_model = AutoModelForCausalLM.from_pretrained(teacher_resolved, dtype=torch.float32).eval()
        teacher_model.requires_grad_(False)
        _check_teacher(student, tokenizer, teacher_model, _load_tokenizer(teacher_resolved), resolved, teacher_resolved)
        teacher_model.to(accelerator.device)
    elif teacher is not None:
        logger.warning("loss='ce' does not use the teacher %s", teacher)

    torch.manual_seed(config.seed)  # the same LoRA init on every process and every run
    peft_model = add_lora(student, _lora_config(student, config))
    if state is not None:
        why = adapter_mismatch(peft_model, ckpt / "adapter", resolved)
        if why:
            raise UsageError(f"cannot resume: {why}; remove {ckpt} or give the model it was trained on")
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(peft_model, load_file(str(ckpt / "adapter" / "adapter_model.safetensors")))
    peft_model.train()  # from_pretrained returns eval mode: a bnb forward in it would repack the weights
    if rank == 0:
        trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
        logger.info("healing %s with %s rank %d (%d trainable parameters), loss %s, %d process(es)",
                    resolved, config.adapter, config.rank, trainable, config.loss, world)

    windows = calibration_windows(tokenizer, config.calibration, nsamples=config.nsamples, seqlen=config.seqlen,
                                  seed=config.seed)  # [nsamples, seqlen]
    inputs = {"model": fingerprint(resolved), "teacher": fingerprint(teacher_resolved),
              "windows_sha256": tensor_sha256(windows)}
    if state is not None and state.get("inputs") != inputs:
        saved = state.get("inputs") or {"model": {"?": {}}}  # older checkpoints recorded no input
        why = next((f"the {role}'s {change}" for role in ("model", "teacher")
                    if (change := fingerprint_change(saved.get(role, {}), inputs[role]))), "the training windows differ")
        raise UsageError(f"cannot resume from {ckpt}: {why}; start over without --resume, or give the same input")
    eval_ids = _held_out_ids(tokenizer, config) if config.eval_every and accelerator.is_main_process else None

    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, betas=(0.9, 0.999), weight_decay=0.0)
    model_ddp, optimizer = accelerator.prepare(peft_model, optimizer)
    start = 0
    losses: list[float] = []
    evals: list[dict] = []
    if state is not None:
        _load_optimizer(optimizer, load_file(str(ckpt / "optimizer.safetensors")), state["optimizer"])
        rng = load_file(str(ckpt / f"rng-{rank}.safetensors"))
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
        start, losses, evals = state["step"], state["losses"], state["evals"]
        logger.info("resuming from step %d of %d (%s)", start, config.steps, ckpt)
    elif ckpt.exists() and accelerator.is_main_process:
        logger.warning("starting over: removing the old checkpoint %s (pass --resume to continue from it)", ckpt)
        shutil.rmtree(ckpt)
    meta = {"config": config.to_dict(), "model": resolved, "teacher": teacher_resolved, "num_processes": world,
            "inputs": inputs}

    def evaluate(step: int) -> None:
        if eval_ids is not None:
            ppl = _evaluate(accelerator.unwrap_model(model_ddp), eval_ids, config)
            evals.append({"step": step, "ppl": ppl})
            logger.info("step %d: held-out wiki perplexity %.3f", step, ppl)
        accelerator.wait_for_everyone()

    if start == 0 and config.eval_every:
        evaluate(0)
    bar = tqdm(total=config.steps, initial=start, desc=f"heal ({config.adapter})",
               disable=not (progress and accelerator.is_main_process))
    started = time.perf_counter()
    for step in range(start, config.steps):
        for group in optimizer.param_groups:
            group["lr"] = config.lr * lr_factor(step, config.steps, config.warmup, config.schedule)
        step_loss = torch.zeros((), device=accelerator.device)
        for micro in range(config.grad_accum):
            first = (step * config.grad_accum + micro) * config.batch_size + rank * per_process
            rows = [(first + b) % config.nsamples for b in range(per_process)]
            x = windows[rows].to(accelerator.device)  # [per_process, seqlen]
            sync = micro == config.grad_accum - 1
            with contextlib.nullcontext() if sync else accelerator.no_sync(model_ddp):
                loss = _micro_batch_loss(model_ddp, teacher_model, x, config) / config.grad_accum
                accelerator.backward(loss)
            step_loss += loss.detach().float()
        if config.max_grad_norm > 0:
            accelerator.clip_grad_norm_(params, config.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(accelerator.reduce(step_loss, "mean").item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
        bar.update(1)
        done = step + 1
        if config.eval_every and (done % config.eval_every == 0 or done == config.steps):
            evaluate(done)
        if config.save_every and done % config.save_every == 0 and done < config.steps:
            _save_checkpoint(ckpt, accelerator, model_ddp, optimizer, done,
                             {**meta, "losses": losses, "evals": evals})
    bar.close()
    seconds = time.perf_counter() - started

    state_dict = accelerator.get_state_dict(model_ddp)
    if accelerator.is_main_process:
        trained = accelerator.unwrap_model(model_ddp)
        record = {**meta, "steps_done": config.steps, "resumed_from": start, "train_seconds": round(seconds, 1),
                  "loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None,
                  "losses": losses, "evals": evals}
        with atomic_dir(out) as tmp:
            adapter = tmp / "adapter" if config.merge else tmp
            trained.save_pretrained(adapter, state_dict=state_dict)
            if config.merge:
                _merge_into(resolved, trained, adapter, config.adapter, tmp)
            tokenizer.save_pretrained(tmp)
            (tmp / RECORD).write_text(json.dumps(record, indent=2) + "\n")
        if ckpt.exists():
            shutil.rmtree(ckpt)
        logger.info("healed %s in %.0f s: loss %.3f -> %.3f; %s written to %s", resolved, seconds,
                    losses[0] if losses else float("nan"), losses[-1] if losses else float("nan"),
                    "merged model" if config.merge else "adapter", out)
    accelerator.wait_for_everyone()
    return out


# ----------------------------------------------------------------------------- merging

def _merge_into(resolved: str, trained, adapter: Path, method: str, dest: Path) -> None:
    """Save the merged full model into `dest`. LoRA: merge the trained fp32 model in place.
    QLoRA: reload the base unquantized in fp32 and merge the saved adapter into it."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    if method == "qlora":
        base = AutoModelForCausalLM.from_pretrained(resolved, dtype=torch.float32)
        trained = PeftModel.from_pretrained(base, adapter)
    merged = trained.merge_and_unload()
    merged.save_pretrained(dest)


def merge_adapter(model: str | os.PathLike, adapter: str | os.PathLike, out: str | os.PathLike,
                  overwrite: bool = False) -> Path:
    """Merge a saved peft adapter into its base (loaded in fp32) and save the full model.

    Args:
        model: the base the adapter was trained on (alias or folder).
        adapter: a folder holding adapter_config.json + adapter_model.safetensors.
        out: folder to write (a plain transformers checkpoint + tokenizer), atomically.
        overwrite: replace a non-empty `out`.
    Returns:
        `out`.
    """
    from transformers import AutoModelForCausalLM

    out, adapter = prepare_out(out, overwrite), Path(adapter)
    resolved = resolve_model(model)
    if _quantization(resolved) is not None:
        raise UsageError(_NO_MERGE.format(model=resolved))
    tokenizer = _load_tokenizer(resolved)
    try:
        peft_model = load_adapter(AutoModelForCausalLM.from_pretrained(resolved, dtype=torch.float32), adapter,
                                  resolved)
    except UsageError as e:
        raise UsageError(str(e).replace("cannot load the adapter", "cannot merge")) from None
    merged = peft_model.merge_and_unload()
    with atomic_dir(out) as tmp:
        merged.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return out


# ----------------------------------------------------------------------------- command line

def config_from_args(args: argparse.Namespace) -> HealConfig:
    """HealConfig from parsed arguments: every field whose option was given, defaults for the rest."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(HealConfig)
              if getattr(args, f.name, None) is not None}
    return HealConfig(**values)


def _cmd_heal(args: argparse.Namespace) -> int:
    if args.merge_adapter:
        out = merge_adapter(args.model, args.merge_adapter, args.out, overwrite=args.overwrite)
        print(f"adapter {args.merge_adapter} merged into {args.model}; checkpoint written to {out}")
        return 0
    config = config_from_args(args)
    try:
        out = heal(args.model, config, args.out, teacher=args.teacher, resume=args.resume, overwrite=args.overwrite,
                   progress=not args.no_progress)
    except KeyboardInterrupt:
        if (checkpoint_dir(args.out) / "state.json").is_file():
            raise Interrupted(f"the last checkpoint is kept in {checkpoint_dir(args.out)}: run the same command with "
                              "--resume to continue from it, or delete it to discard it") from None
        raise
    if (out / RECORD).is_file():
        record = json.loads((out / RECORD).read_text())
        ppl = f"; held-out ppl {record['evals'][0]['ppl']:.2f} -> {record['evals'][-1]['ppl']:.2f}" \
            if record["evals"] else ""
        print(f"healed in {record['train_seconds']:.0f} s, loss {record['loss_first']:.3f} -> "
              f"{record['loss_last']:.3f}{ppl}; {'merged model' if config.merge else 'adapter'} written to {out}")
    return 0


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    """Add the `heal` sub-command to llmshrink's command line."""
    d = HealConfig()
    p = subparsers.add_parser("heal", help="LoRA/QLoRA fine-tune of a pruned model, distilled from the original",
                              description="Heal a pruned model: LoRA or QLoRA on calibration text with cross-entropy, "
                                          "logit distillation from the teacher, or both.")
    p.add_argument("--model", required=True, help="the pruned model: folder (with tokenizer) or packaged name")
    p.add_argument("--teacher", help="the original model, for --loss kd or ce+kd (same tokenizer)")
    p.add_argument("--out", required=True, help="folder to write: the adapter, or with --merge the merged model")
    p.add_argument("--method", dest="adapter", help=f"lora or qlora (NF4 base) (default {d.adapter})")
    p.add_argument("--loss", help=f"ce, kd or ce+kd (default {d.loss})")
    p.add_argument("--alpha", type=float, help=f"ce+kd: alpha * KD + (1 - alpha) * CE (default {d.alpha})")
    p.add_argument("--temperature", type=float, help=f"distillation temperature (default {d.temperature})")
    p.add_argument("--rank", type=int, help=f"LoRA rank (default {d.rank})")
    p.add_argument("--lora-alpha", type=int, help=f"LoRA alpha (default {d.lora_alpha})")
    p.add_argument("--lora-dropout", type=float, help=f"LoRA dropout (default {d.lora_dropout})")
    p.add_argument("--target-modules", help=f"peft target modules (default {d.target_modules})")
    p.add_argument("--steps", type=int, help=f"optimizer steps (default {d.steps})")
    p.add_argument("--seqlen", type=int, help=f"tokens per training window (default {d.seqlen})")
    p.add_argument("--batch-size", type=int, help=f"windows per step over all processes (default {d.batch_size})")
    p.add_argument("--grad-accum", type=int, help=f"micro-batches per step (default {d.grad_accum})")
    p.add_argument("--lr", type=float, help=f"peak learning rate (default {d.lr})")
    p.add_argument("--warmup", type=int, help=f"warmup steps (default {d.warmup})")
    p.add_argument("--schedule", help=f"cosine or linear decay (default {d.schedule})")
    p.add_argument("--calib-file", dest="calibration", help="local .txt/.jsonl training text (default: the wiki "
                                                             "calibration half)")
    p.add_argument("--nsamples", type=int, help=f"training windows drawn from the text (default {d.nsamples})")
    p.add_argument("--eval-every", type=int, help="held-out wiki perplexity every N steps (default 0: never)")
    p.add_argument("--save-every", type=int, help="checkpoint into OUT.checkpoint every N steps (default 0: never)")
    p.add_argument("--seed", type=int, help=f"seed of the windows and the LoRA init (default {d.seed})")
    p.add_argument("--merge", action="store_true", default=None,
                   help="write the merged full model to OUT (the adapter goes to OUT/adapter)")
    p.add_argument("--resume", action="store_true", help="continue from OUT.checkpoint")
    p.add_argument("--adapter", dest="merge_adapter", metavar="FOLDER",
                   help="no training: merge this saved adapter into --model and write it to --out")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_heal)
