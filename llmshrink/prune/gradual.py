"""Gradual weight pruning: reach a sparsity in prune -> heal rounds instead of at once.

Each round scores the current (healed) model again, zeroes more of each linear (the zeros already
there score 0, so a mask only grows) and heals with `llmshrink.heal` (KD from the unpruned input):
with `heal_method="lora"` an adapter, merged, after which the pruned weights are zeroed again
(a merged adapter is dense); with `"full"` sparse fine-tuning, the surviving weights trained and
the pruned ones held at zero throughout (`HealConfig.keep_zeros`). With
`rewind` the surviving weights are reset to the input model's values before each round's healing
(the lottery ticket's rewinding), so a round carries over only its mask. `rounds=1` with heal
steps is the one-shot baseline: the same code, the same total healing.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from ..auto import load_model
from ..calibration import resolve_calibration
from ..heal import RECORD, HealConfig, heal
from .apply import _decoder_linears, prune_weights, save_pruned
from .config import WeightPruneConfig

__all__ = ["gradual_prune"]

logger = logging.getLogger(__name__)


def _heal_config(config: WeightPruneConfig, steps: int, text: str, seed: int) -> HealConfig:
    """One round's healing: CE + KD on windows of 4 x 256 tokens, as many windows as it sees; LoRA
    merged, or every surviving weight trained with the zeros kept."""
    full = config.heal_method == "full"
    return HealConfig(adapter=config.heal_method, loss="ce+kd", steps=steps, lr=config.learning_rate(),
                      warmup=min(2, steps), seqlen=256, batch_size=4, nsamples=4 * steps, calibration=text, seed=seed,
                      merge=not full, keep_zeros=full)


@torch.no_grad()
def _apply_masks(model: torch.nn.Module, masks: dict[str, torch.Tensor], source: dict[str, torch.Tensor] | None = None):
    """Zero every pruned weight again; with `source`, the kept ones take `source`'s values (rewind)."""
    for name, m in _decoder_linears(model).items():
        if source is not None:
            m.weight.copy_(source[name])
        m.weight.mul_(masks[name].to(m.weight.dtype))


def gradual_prune(source: str, config: WeightPruneConfig, out: str | Path, calibration: str | None = None,
                  nsamples: int = 64, seqlen: int = 512, seed: int = 0, progress: bool = True,
                  overwrite: bool = False) -> Path:
    """Prune `source` to `config.sparsity` in `config.rounds` prune -> heal rounds; save the result to `out`.

    Args:
        source: packaged name, folder or Hub id; also the healing's teacher.
        config: a WeightPruneConfig (its rounds, heal_steps, schedule, rewind, heal_method
            and heal_lr).
        out: checkpoint folder, written whole at the end (a normal dense checkpoint with zeros).
        calibration: None for the wiki calibration half (the pruning scores; healing draws from the
            same text), or a .txt/.jsonl path.
        nsamples, seqlen, seed: the scoring windows.
    Returns:
        `out`; its config.json's `llmshrink_prune` records every round.
    """
    config.validate()
    model, tokenizer, resolved = load_model(source)
    calib = resolve_calibration(tokenizer, calibration, nsamples, seqlen, seed)[0] if config.needs_calibration() else None
    original = ({n: m.weight.detach().clone() for n, m in _decoder_linears(model).items()}
                if config.rewind else None)
    rounds = []
    with tempfile.TemporaryDirectory(prefix="llmshrink-gradual-") as work:
        for r, (sparsity, steps) in enumerate(zip(config.round_sparsities(), config.round_steps())):
            model.eval()
            reached = prune_weights(model, dataclasses.replace(config, sparsity=sparsity, rounds=1, heal_steps=0,
                                                               rewind=False), calib, progress=progress)
            masks = {n: m.weight != 0 for n, m in _decoder_linears(model).items()}
            row = {"round": r + 1, "sparsity": round(sum(z for z, _ in reached.values())
                                                     / max(sum(n for _, n in reached.values()), 1), 6),
                   "heal_steps": steps}
            if steps:
                if original is not None:
                    _apply_masks(model, masks, original)
                student = save_pruned(model, tokenizer, Path(work) / f"round-{r + 1}", overwrite=True)
                healed = heal(student, _heal_config(config, steps, calibration or "wiki", seed + r),
                              Path(work) / f"round-{r + 1}-healed", teacher=resolved, overwrite=True,
                              progress=progress)
                record = json.loads((healed / RECORD).read_text())
                row.update(steps_done=record["steps_done"], train_seconds=record["train_seconds"],
                           loss_first=record["loss_first"],
                           loss_last=record["loss_last"])
                del model
                model = AutoModelForCausalLM.from_pretrained(healed, dtype=torch.float32)
                _apply_masks(model, masks)  # a merged adapter filled the zeros (full kept them)
            logger.info("round %d of %d: sparsity %.3f, %d healing steps", r + 1, config.rounds, row["sparsity"], steps)
            rounds.append(row)
    model.eval()
    model.config.llmshrink_prune = {"config": config.to_dict(), "sparsity": rounds[-1]["sparsity"], "rounds": rounds}
    return save_pruned(model, tokenizer, out, overwrite=overwrite)
