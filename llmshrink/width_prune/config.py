"""WidthPruneConfig: MLP channels and whole key/value head groups removed from every decoder layer,
chosen by the output error their loss leaves on calibration data (after a least-squares refit of
the writers, or by output energy alone), to meet one parameter budget."""

from __future__ import annotations

import dataclasses

from ..config import MethodConfig
from ..errors import UsageError

__all__ = ["BUDGETS", "TARGETS", "WidthPruneConfig"]

BUDGETS = ("decoder", "model")
TARGETS = ("both", "mlp", "attention")


@dataclasses.dataclass
class WidthPruneConfig(MethodConfig):
    """Structured width pruning (FLAP / LLM-Pruner style): fewer MLP channels and attention heads.

    Every decoder layer keeps the same widths, because a transformers config has one
    `intermediate_size`, one `num_attention_heads` and one `num_key_value_heads` for all layers
    (Llama-like models have no per-layer widths; in transformers 5 only Gemma 3n's config takes
    one intermediate_size per layer). Which channels and heads a layer keeps is its
    own choice, by its own measured importance; how many, one count for all layers, is the count
    whose removed importance summed over the layers is least within the budget (each layer's sum
    taken relative to its total with `relative`). With `refit` (the default), what a layer loses
    by dropping units is the output error left after down_proj / o_proj is refit on the rest, the
    units dropped greedily by that error (see `refit`). Without it, a channel's importance is the
    output energy it adds to the residual stream, E[a_j^2] * ||W_down[:, j]||^2, and a key/value
    group's (one kv head and the query heads that share it: grouped-query attention stays valid)
    the energy of those heads' output through o_proj.

    Args:
        ratio: share of the parameters kept, in (0, 1]: the widths with the least removed
            importance whose parameter count is at most ratio times the original's (the widths
            are whole channels and groups, so the ratio reached is at or just below it).
        budget: what the ratio counts: decoder (every parameter inside the decoder layers:
            attention and MLP linears with their biases, and the layer norms; the embedding, the
            final norm and the output head are not counted) or model (every parameter of the
            model, a tied head counted once).
        targets: both (MLP channels and key/value groups), mlp or attention (only those).
        multiple: the MLP width is a multiple of this (the original width is always allowed), so
            GPTQ groups of 32 and fast kernels fit down_proj's inputs; 1 for any width.
        relative: when choosing how many channels and groups to remove, weigh each layer's
            removed energy (or refit error) relative to that layer's total output energy (so
            layers whose outputs are larger do not decide the split alone); off: absolute.
        compensate: FLAP's bias compensation: add the mean output of the removed channels to
            down_proj's bias and of the removed heads to o_proj's bias, and rank units by the
            variance of their output (what is then lost). The config's mlp_bias / attention_bias
            is set where the model type has that switch (llama: both; qwen3, gemma: attention;
            mistral, qwen2: neither, so those are pruned without it), which also gives the
            switch's other linears zero biases; the biases are counted in the budget. On tiny
            random Llamas it lowered the logits' error after pruning in all 9 cases measured.
        refit: refit down_proj's and o_proj's kept columns by least squares on the calibration
            inputs, and choose the units to drop with that refit in the loop (structured Optimal
            Brain Surgeon, as ZipLM / SlimGPT): the error curves replace the energy scores. Costs
            the inputs' x x^T sums (L * (I^2 + (heads * head_dim)^2) float64) and a greedy pass per
            layer; off: FLAP's energy scores alone.
        damp: with refit, the inputs' second moment gets damp times its mean diagonal added to
            its diagonal before it is inverted (a ridge on the refit, as GPTQ's damping).
    """

    METHOD = "width_prune"
    VERSION = 1

    ratio: float = 0.8
    budget: str = "decoder"
    targets: str = "both"
    multiple: int = 32
    relative: bool = True
    compensate: bool = True
    refit: bool = True
    damp: float = 0.01

    def validate(self) -> None:
        if isinstance(self.ratio, bool) or not isinstance(self.ratio, (int, float)) or not 0 < self.ratio <= 1:
            raise UsageError(f"ratio={self.ratio!r} is outside (0, 1]; give the share of the parameters to keep, "
                             "e.g. 0.8")
        if self.budget not in BUDGETS:
            raise UsageError(f"budget='{self.budget}' is not known; use one of {', '.join(BUDGETS)}")
        if self.targets not in TARGETS:
            raise UsageError(f"targets='{self.targets}' is not known; use one of {', '.join(TARGETS)}")
        if isinstance(self.multiple, bool) or not isinstance(self.multiple, int) or self.multiple < 1:
            raise UsageError(f"multiple={self.multiple!r} is not a positive whole number; use e.g. 32, or 1 "
                             "for any MLP width")
        if isinstance(self.damp, bool) or not isinstance(self.damp, (int, float)) or not self.damp > 0:
            raise UsageError(f"damp={self.damp!r} is not a positive number; use e.g. 0.01")
