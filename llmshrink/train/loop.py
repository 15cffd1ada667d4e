"""The one training loop of llmshrink: heal (LoRA / QLoRA) and finetune (full) both run through it.

`setup_accelerator` makes the `accelerate.Accelerator` (one process as is, or N under
`accelerate launch`) and splits each batch over the processes; `train_loop` then runs optimizer
steps: the learning rate of `lr_factor` (warmup, then cosine or linear decay), `grad_accum`
micro-batches per step (gradients synchronised on the last only), optional bf16 autocast over
the forward, gradient clipping, AdamW or whatever optimizer it is given, a progress bar, an
evaluation callback at step 0, every `eval_every` steps and at the end, checkpoints every
`save_every` steps (see `llmshrink.train.checkpoint`; `resume` continues from one to the same
result as an uninterrupted run) and an optional time limit (`max_minutes`, the schedule unchanged).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import shutil
import time
from pathlib import Path
from typing import Callable

import torch
from accelerate import Accelerator, DistributedType
from tqdm.auto import tqdm

from ..errors import UsageError
from .checkpoint import restore_checkpoint, save_checkpoint
from .schedule import lr_factor

__all__ = ["Checkpoint", "LoopConfig", "LoopResult", "setup_accelerator", "train_loop"]

logger = logging.getLogger(__name__)

PRECISIONS = ("no", "bf16")


@dataclasses.dataclass
class LoopConfig:
    """How the loop trains: the schedule of optimizer steps and what happens between them."""

    steps: int
    lr: float  # peak learning rate
    warmup: int = 0  # steps of linear warmup from 0
    schedule: str = "cosine"  # decay to 0 after warmup: cosine or linear
    grad_accum: int = 1  # micro-batches per optimizer step
    max_grad_norm: float = 1.0  # 0 turns clipping off
    mixed_precision: str = "no"  # "bf16": autocast forward over fp32 master weights
    eval_every: int = 0  # evaluate at step 0, every eval_every steps and at the end; 0: never
    save_every: int = 0  # checkpoint every save_every steps (never after the last); 0: never
    max_minutes: float | None = None  # stop early after this much training time (the schedule is unchanged)


@dataclasses.dataclass
class Checkpoint:
    """Where the loop checkpoints, and what state.json records besides the loop's own state."""

    folder: Path
    meta: dict  # the caller's record: config, inputs, num_processes, ...
    resume: dict | None = None  # the state.json to continue from (`read_checkpoint`), or None: start over


@dataclasses.dataclass
class LoopResult:
    model: torch.nn.Module  # as accelerate prepared it (DDP-wrapped under `accelerate launch`)
    steps_done: int
    resumed_from: int  # the step a resumed run started at; 0 for a fresh run
    losses: list[float]  # one per optimizer step, averaged over the processes
    evals: list[dict]  # {"step": ..., **what `evaluate` returned}
    seconds: float  # training time, without the step-0 evaluation


def setup_accelerator(batch_size: int, mixed_precision: str | None = None, checkpoints: bool = False,
                      what: str = "the run") -> tuple[Accelerator, int]:
    """The run's Accelerator and the windows each process takes of a batch.

    Args:
        batch_size: windows per micro-batch over all processes; it must divide by their number.
        mixed_precision: refuse an `accelerate launch` set to another precision than this one
            (the loop applies the config's own autocast); None: no check.
        checkpoints: the run will checkpoint, which FSDP (sharded optimizer state) cannot.
        what: the run, as error messages name it ("the fine-tune").
    Returns:
        (accelerator, batch_size // num_processes).
    """
    accelerator = Accelerator()  # plain or `accelerate launch`; autocast is ours, from the config
    if mixed_precision is not None and accelerator.mixed_precision not in ("no", mixed_precision):
        raise UsageError(f"accelerate is set to mixed_precision={accelerator.mixed_precision} but {what} "
                         f"asks for {mixed_precision}; launch with --mixed_precision no (the config decides)")
    if checkpoints and accelerator.distributed_type == DistributedType.FSDP:
        raise UsageError("save_every checkpoints are not supported under FSDP (the optimizer state is sharded); "
                         "use DDP (recipes/accelerate/ddp.yaml) or save_every: 0")
    world = accelerator.num_processes
    if batch_size % world:
        raise UsageError(f"batch_size={batch_size} does not split over {world} processes; use a multiple of {world}")
    return accelerator, batch_size // world


def train_loop(accelerator: Accelerator, model: torch.nn.Module, optimizer: torch.optim.Optimizer, loop: LoopConfig,
               batch: Callable[[int, int], torch.Tensor],
               loss: Callable[[torch.nn.Module, torch.Tensor], torch.Tensor],
               evaluate: Callable[[torch.nn.Module, int], dict | None] | None = None,
               checkpoint: Checkpoint | None = None, desc: str = "train", progress: bool = True) -> LoopResult:
    """Train `model` for `loop.steps` optimizer steps.

    Args:
        accelerator: from `setup_accelerator`; the loop prepares `model` and `optimizer` with it.
        model: in training mode; the parameters that require grad are clipped and trained.
        optimizer: over those parameters, not yet prepared; its lr is set every step.
        loop: the schedule; see `LoopConfig`.
        batch: (step, micro) -> this process's input ids [per_process, seqlen] on the CPU.
        loss: (prepared model, ids on the device) -> the scalar loss of one micro-batch.
        evaluate: (prepared model, step) -> a dict to record in `evals`, or None (e.g. on other
            processes than the main one); every process waits for it.
        checkpoint: where to save every `loop.save_every` steps and what to resume from; without
            `checkpoint.resume` an old checkpoint there is removed.
        desc: the progress bar's label.
        progress: show the progress bar (main process only).
    Returns:
        See `LoopResult`.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    model, optimizer = accelerator.prepare(model, optimizer)
    start, losses, evals = 0, [], []
    resume = checkpoint.resume if checkpoint is not None else None
    if resume is not None:
        restore_checkpoint(checkpoint.folder, optimizer, resume, accelerator.process_index)
        start, losses, evals = resume["step"], resume["losses"], resume["evals"]
        logger.info("resuming from step %d of %d (%s)", start, loop.steps, checkpoint.folder)
    elif checkpoint is not None and checkpoint.folder.exists() and accelerator.is_main_process:
        logger.warning("starting over: removing the old checkpoint %s (pass --resume to continue from it)",
                       checkpoint.folder)
        shutil.rmtree(checkpoint.folder)

    def run_evaluation(step: int) -> None:
        result = evaluate(model, step) if evaluate is not None else None
        if result is not None:
            evals.append({"step": step, **result})
        accelerator.wait_for_everyone()

    if start == 0 and loop.eval_every:
        run_evaluation(0)
    autocast = torch.autocast(accelerator.device.type, dtype=torch.bfloat16) if loop.mixed_precision == "bf16" \
        else contextlib.nullcontext()
    bar = tqdm(total=loop.steps, initial=start, desc=desc, disable=not (progress and accelerator.is_main_process))
    started, done = time.perf_counter(), start
    for step in range(start, loop.steps):
        lr = loop.lr * lr_factor(step, loop.steps, loop.warmup, loop.schedule)
        for group in optimizer.param_groups:
            group["lr"] = lr
        step_loss = torch.zeros((), device=accelerator.device)
        for micro in range(loop.grad_accum):
            x = batch(step, micro).to(accelerator.device)  # [per_process, seqlen]
            sync = micro == loop.grad_accum - 1  # DDP all-reduces the gradients of the last micro-batch only
            with contextlib.nullcontext() if sync else accelerator.no_sync(model):
                with autocast:
                    micro_loss = loss(model, x) / loop.grad_accum
                accelerator.backward(micro_loss)
            step_loss += micro_loss.detach().float()
        if loop.max_grad_norm > 0:
            accelerator.clip_grad_norm_(params, loop.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        done = step + 1
        losses.append(accelerator.reduce(step_loss, "mean").item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}", lr=f"{lr:.1e}")
        bar.update(1)
        if loop.eval_every and (done % loop.eval_every == 0 or done == loop.steps):
            run_evaluation(done)
        if checkpoint is not None and loop.save_every and done % loop.save_every == 0 and done < loop.steps:
            save_checkpoint(checkpoint.folder, accelerator, model, optimizer, done,
                            {**checkpoint.meta, "losses": losses, "evals": evals})
        if loop.max_minutes is not None and done < loop.steps:  # every process must stop at the same step
            late = float(time.perf_counter() - started > 60 * loop.max_minutes)
            if accelerator.reduce(torch.tensor(late, device=accelerator.device), "sum").item() > 0:
                logger.warning("max_minutes=%s reached: stopping after %d of %d steps", loop.max_minutes, done,
                               loop.steps)
                break
    bar.close()
    return LoopResult(model=model, steps_done=done, resumed_from=start, losses=losses, evals=evals,
                      seconds=time.perf_counter() - started)
