"""`llmshrink.width_prune.width_prune`: measure each MLP channel's and each key/value group's output
energy on calibration text, choose the widths for the budget, then cut the linears.

The statistics come from full forwards of the original model over the calibration windows, a
few windows at a time, with hooks on every layer's o_proj and down_proj inputs; memory is one
batch's forward (and one key/value group's output through o_proj, [tokens, hidden] float64) plus,
per layer, 2 * intermediate_size + num_key_value_heads * (hidden_size + 1) float64 sums. Every
layer is measured on the original model's activations (one pass: nothing is pruned until all are
measured).
`importance.py` holds the math. The result is an ordinary model of the same type with smaller
widths in its config (head_dim written out, so it is not recomputed from hidden_size / heads).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import time

import torch
from huggingface_hub.errors import StrictDataclassError
from torch import nn
from tqdm.auto import tqdm

from ..arch import decoder_layers
from ..calibration import check_seqlen, resolve_calibration
from ..errors import UsageError
from .config import WidthPruneConfig
from .importance import (attention_bias_shift, channel_scores, choose_widths, group_output_stats, group_scores,
                         keep_indices, mlp_bias_shift, ranges)

__all__ = ["BIAS_SWITCHES", "LAYOUT", "MODEL_TYPES", "RECORD", "Plan", "Statistics", "add_bias_shifts", "check_layout",
           "plan_widths", "prune_widths", "unit_statistics", "width_prune"]

logger = logging.getLogger(__name__)

RECORD = "llmshrink_width_prune"  # the config.json key of a width-pruned folder
BATCH = 4  # calibration windows per forward

# Model types whose decoder layers are self_attn.{q,k,v,o}_proj (heads in order, grouped-query
# attention by repeat_kv) and mlp.{gate,up,down}_proj, with widths read from the config keys
# intermediate_size / num_attention_heads / num_key_value_heads / head_dim alone.
LAYOUT = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
          "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}
MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text")
WHY_NOT = {
    "olmo2": "its q/k norms span all heads at once, so removing heads changes the kept heads' outputs",
    "phi3": "its query/key/value and gate/up projections are fused into one linear each",
    "gpt_neox": "its query/key/value projection is fused into one linear",
    "gemma3": "it is the multimodal wrapper; prune a gemma3_text model",
    "gemma3n_text": "its layers hold more than attention and an MLP (AltUp, Laurel, per-layer inputs)",
}


def check_layout(model_config) -> None:
    """One-line UsageError for a model type whose attention and MLP layout is not in the table."""
    model_type = getattr(model_config, "model_type", "")
    if model_type not in MODEL_TYPES:
        why = WHY_NOT.get(model_type, "its attention and MLP layout is not in llmshrink's width pruning table")
        raise UsageError(f"model type '{model_type}' cannot be width-pruned: {why}; supported: "
                         f"{', '.join(MODEL_TYPES)}")


def _linears(layer: nn.Module) -> dict[str, nn.Linear]:
    found = {}
    for key, name in LAYOUT.items():
        try:
            found[key] = layer.get_submodule(name)
        except AttributeError:
            raise UsageError(f"the decoder layer has no {name}; the width pruning table does not fit this "
                             "model") from None
        if not isinstance(found[key], nn.Linear):
            raise UsageError(f"{name} is a {type(found[key]).__name__}, not nn.Linear; the width pruning table "
                             "does not fit this model")
    return found


def _count(params) -> int:
    return sum(p.numel() for p in {id(p): p for p in params}.values())


# Per model type, the config switches that give o_proj / down_proj a bias (each also gives its
# other linears one: attention_bias q, k, v and o; mlp_bias gate, up and down).
BIAS_SWITCHES = {"llama": {"attention": "attention_bias", "mlp": "mlp_bias"}, "qwen3": {"attention": "attention_bias"},
                 "gemma": {"attention": "attention_bias"}, "gemma2": {"attention": "attention_bias"},
                 "gemma3_text": {"attention": "attention_bias"}}
PARTS = {"attention": ("q", "k", "v", "o"), "mlp": ("gate", "up", "down")}


@dataclasses.dataclass(frozen=True)
class Plan:
    """The widths a model can take and what each costs (from shapes alone, no weights read)."""

    layers: int
    hidden: int
    kv_heads: int  # G: key/value groups per layer
    group_heads: int  # query heads per group
    head_dim: int
    channels: int  # I: intermediate_size
    bias: dict  # linear key -> whether it has a bias now
    compensate: tuple[str, ...]  # the parts ('attention', 'mlp') whose removed units are put back as a bias
    other: int  # parameters of a layer outside the seven linears (norms)
    outside: int  # parameters counted outside the decoder layers (budget 'model'), else 0
    total: int  # what the ratio counts (config.budget)
    group_options: tuple[int, ...]
    channel_options: tuple[int, ...]

    def biases(self, groups: int, channels: int) -> dict:
        """Which linears have a bias at these widths: compensating a pruned part whose writer
        (o_proj, down_proj) has no bias turns on its switch, which gives all its linears one."""
        bias = dict(self.bias)
        for part, pruned in (("attention", groups < self.kv_heads), ("mlp", channels < self.channels)):
            if pruned and part in self.compensate and not self.bias[PARTS[part][-1]]:
                bias.update({key: True for key in PARTS[part]})
        return bias

    def budget(self, ratio: float) -> int:
        """The most parameters `ratio` allows (whole parameters; a hair of float slack)."""
        return math.floor(ratio * self.total + 1e-6)

    def cost(self, groups: int, channels: int) -> int:
        """Parameters counted at (groups, channels) kept in every layer."""
        b, h, d = self.biases(groups, channels), self.hidden, self.head_dim
        heads = groups * self.group_heads
        attention = heads * d * (h + b["q"]) + groups * d * (2 * h + b["k"] + b["v"]) + h * (heads * d + b["o"])
        mlp = channels * (2 * h + b["gate"] + b["up"]) + h * (channels + b["down"])
        return self.outside + self.layers * (self.other + attention + mlp)


def _valid_config(model_config, heads: int, kv_heads: int, head_dim: int, channels: int) -> bool:
    """Whether transformers accepts the config with these widths (transformers 5's strict Llama
    and Gemma configs also want hidden_size to be a multiple of the head count, head_dim set or not)."""
    trial = copy.deepcopy(model_config)
    try:
        for key, value in (("num_attention_heads", heads), ("num_key_value_heads", kv_heads), ("head_dim", head_dim),
                           ("intermediate_size", channels)):
            setattr(trial, key, value)
        if callable(getattr(trial, "validate", None)):
            trial.validate()
    except (ValueError, StrictDataclassError):
        return False
    return True


def plan_widths(model: nn.Module, config: WidthPruneConfig) -> Plan:
    """The widths `model` can be cut to and their costs; a UsageError, before any work, for an
    unknown layout or a ratio below the smallest model these widths allow (naming that ratio).
    Reads shapes only, so a model on the meta device will do."""
    check_layout(model.config)
    layers = decoder_layers(model)
    mc = model.config
    G, H, I, h = mc.num_key_value_heads, mc.num_attention_heads, mc.intermediate_size, mc.hidden_size
    d = getattr(mc, "head_dim", None) or h // H
    if not isinstance(I, int) or H % G:
        raise UsageError(f"model type '{mc.model_type}' has intermediate_size={I!r}, {H} heads and {G} key/value "
                         "heads; width pruning needs one intermediate_size and whole groups of heads")
    want = {"q": (H * d, h), "k": (G * d, h), "v": (G * d, h), "o": (h, H * d), "gate": (I, h), "up": (I, h),
            "down": (h, I)}
    lins = [_linears(layer) for layer in layers]
    for i, lin in enumerate(lins):
        for key, shape in want.items():
            if tuple(lin[key].weight.shape) != shape or (lin[key].bias is None) != (lins[0][key].bias is None):
                raise UsageError(f"layer {i}'s {LAYOUT[key]} has shape {tuple(lin[key].weight.shape)}, not {shape} "
                                 "as the config's widths say (or another bias); width pruning keeps one width for all "
                                 "layers and reads the widths from the config")
    bias = {key: m.bias is not None for key, m in lins[0].items()}
    switches = BIAS_SWITCHES.get(mc.model_type, {})
    compensate = tuple(part for part in PARTS if config.compensate and (part in switches or bias[PARTS[part][-1]]))
    decoder = _count(layers.parameters())
    outside = 0 if config.budget == "decoder" else _count(model.parameters()) - decoder
    g = H // G
    group_options = (G,) if config.targets == "mlp" else tuple(
        n for n in range(1, G + 1) if n == G or _valid_config(mc, n * g, n, d, I))
    channel_options = (I,) if config.targets == "attention" else tuple(
        sorted({I, *range(config.multiple, I + 1, config.multiple)}))
    plan = Plan(len(layers), h, G, g, d, I, bias, compensate, 0, outside, decoder + outside, group_options,
                channel_options)
    other = (plan.total - plan.cost(G, I)) // len(layers)  # the norms (and anything else the linears are not)
    plan = dataclasses.replace(plan, other=other)
    least = plan.cost(group_options[0], channel_options[0])
    if least > plan.budget(config.ratio):
        smallest = math.ceil(least / plan.total * 1e4) / 1e4
        raise UsageError(
            f"ratio={config.ratio} is below the smallest model width pruning can make here ({least / plan.total:.4f} "
            f"of the {config.budget} parameters: {group_options[0]} key/value group(s) of {g} heads and "
            f"{channel_options[0]} MLP channels per layer); use ratio >= {smallest}")
    return plan


@dataclasses.dataclass
class Statistics:
    """Sums over the calibration tokens, per decoder layer: of ||y_g||^2 and y_g per key/value
    group (y_g: its heads' output through o_proj) and of a_j^2 and a_j per MLP channel."""

    tokens: int
    group_sq: torch.Tensor  # [layers, G] float64
    group_sum: torch.Tensor  # [layers, G, hidden]
    channel_sq: torch.Tensor  # [layers, I]
    channel_sum: torch.Tensor  # [layers, I]

    def scores(self, model: nn.Module, center_groups: bool = False,
               center_channels: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """([layers, G], [layers, I]): each group's and channel's mean output energy (centered:
        of its output less the output's mean)."""
        groups = torch.stack([group_scores(sq, s, self.tokens, center_groups)
                              for sq, s in zip(self.group_sq, self.group_sum)])
        downs = [_linears(layer)["down"].weight for layer in decoder_layers(model)]
        channels = torch.stack([channel_scores(sq, s, self.tokens, w, center_channels)
                                for sq, s, w in zip(self.channel_sq, self.channel_sum, downs)])
        return groups, channels


@torch.no_grad()
def unit_statistics(model: nn.Module, calib: torch.Tensor, batch_size: int = BATCH,
                    progress: bool = True) -> Statistics:
    """Hooks on every layer's o_proj and down_proj inputs over full forwards of `calib` [n, seqlen]."""
    layers = decoder_layers(model)
    mc = model.config
    L, G, I, h = len(layers), mc.num_key_value_heads, mc.intermediate_size, mc.hidden_size
    stats = Statistics(0, torch.zeros(L, G, dtype=torch.float64), torch.zeros(L, G, h, dtype=torch.float64),
                       torch.zeros(L, I, dtype=torch.float64), torch.zeros(L, I, dtype=torch.float64))
    lins = [_linears(layer) for layer in layers]

    def on_o(i):
        def fn(module, args):
            sq, total = group_output_stats(args[0], module.weight, G)
            stats.group_sq[i] += sq.cpu()
            stats.group_sum[i] += total.cpu()
        return fn

    def on_down(i):
        def fn(module, args):
            a = args[0].detach().double().flatten(0, -2)  # [tokens, I]
            stats.channel_sq[i] += a.pow(2).sum(0).cpu()
            stats.channel_sum[i] += a.sum(0).cpu()
        return fn

    handles = [m["o"].register_forward_pre_hook(on_o(i)) for i, m in enumerate(lins)]
    handles += [m["down"].register_forward_pre_hook(on_down(i)) for i, m in enumerate(lins)]
    device = next(model.parameters()).device
    try:
        for b in tqdm(range(0, len(calib), batch_size), desc="width_prune: energies", unit="batch",
                      disable=not progress):
            ids = calib[b:b + batch_size].to(device)
            model(ids, use_cache=False)
            stats.tokens += ids.numel()
    finally:
        for handle in handles:
            handle.remove()
    return stats


def _cut(linear: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> nn.Linear:
    """A new linear with only `rows` of the outputs (and the bias) and `cols` of the inputs."""
    W = linear.weight.detach()
    W = W if rows is None else W[rows]
    W = W if cols is None else W[:, cols]
    out = nn.Linear(W.shape[1], W.shape[0], bias=linear.bias is not None, device=W.device, dtype=W.dtype)
    out.weight.data.copy_(W)
    if linear.bias is not None:
        out.bias.data.copy_(linear.bias.detach() if rows is None else linear.bias.detach()[rows])
    return out


def _set(layer: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(layer.get_submodule(parent), child, module)


@torch.no_grad()
def prune_widths(model: nn.Module, kv_heads: list[torch.Tensor], channels: list[torch.Tensor]) -> nn.Module:
    """Keep, in decoder layer l, the key/value groups `kv_heads[l]` (with their query heads) and
    the MLP channels `channels[l]` (same counts in every layer); the config says the new widths."""
    mc = model.config
    G, H = mc.num_key_value_heads, mc.num_attention_heads
    g, d = H // G, getattr(mc, "head_dim", None) or mc.hidden_size // H
    counts = {(len(k), len(c)) for k, c in zip(kv_heads, channels)}
    if len(counts) != 1:
        raise ValueError(f"every layer must keep the same widths; asked for (groups, channels) {sorted(counts)}")
    for layer, keep_kv, keep_mlp in zip(decoder_layers(model), kv_heads, channels):
        lin = _linears(layer)
        keep_kv = keep_kv.long()
        heads = (keep_kv[:, None] * g + torch.arange(g)).flatten()  # the query heads of the kept groups
        q_rows = (heads[:, None] * d + torch.arange(d)).flatten()
        kv_rows = (keep_kv[:, None] * d + torch.arange(d)).flatten()
        keep_mlp = keep_mlp.long()
        for key, rows, cols in (("q", q_rows, None), ("k", kv_rows, None), ("v", kv_rows, None), ("o", None, q_rows),
                                ("gate", keep_mlp, None), ("up", keep_mlp, None), ("down", None, keep_mlp)):
            _set(layer, LAYOUT[key], _cut(lin[key], rows, cols))
        mlp = layer.get_submodule(LAYOUT["down"].rpartition(".")[0])
        if hasattr(mlp, "intermediate_size"):
            mlp.intermediate_size = len(keep_mlp)
    kept_groups, kept_channels = counts.pop()
    mc.num_attention_heads, mc.num_key_value_heads = kept_groups * g, kept_groups
    mc.head_dim, mc.intermediate_size = d, kept_channels  # head_dim explicit: not hidden_size / heads
    return model


@torch.no_grad()
def add_bias_shifts(model: nn.Module, part: str, shifts: list[torch.Tensor]) -> None:
    """Add shifts[l] to the bias of layer l's o_proj (part 'attention') or down_proj ('mlp'). Where
    it has none, the config's bias switch for the part is turned on and every linear it governs
    gets a bias (zero but for the shift), as a fresh load of that config expects."""
    writer = PARTS[part][-1]
    if _linears(decoder_layers(model)[0])[writer].bias is None:
        switch = BIAS_SWITCHES.get(model.config.model_type, {}).get(part)
        if switch is None:
            raise UsageError(f"model type '{model.config.model_type}' has no bias switch for its {part}; "
                             "prune it with compensate off")
        setattr(model.config, switch, True)
    for layer, shift in zip(decoder_layers(model), shifts):
        lin = _linears(layer)
        for key in PARTS[part]:
            m = lin[key]
            if m.bias is None:
                m.bias = nn.Parameter(torch.zeros(m.out_features, dtype=m.weight.dtype, device=m.weight.device))
        lin[writer].bias.add_(shift.to(dtype=lin[writer].bias.dtype, device=lin[writer].bias.device))


def width_prune(model: nn.Module, config: WidthPruneConfig, calibration: str | torch.Tensor | None = None,
                tokenizer=None, nsamples: int = 128, seqlen: int = 512, seed: int = 0, progress: bool = True) -> dict:
    """Prune `model`'s MLP channels and key/value groups in place, to `config.ratio` of its parameters.

    Args:
        calibration: None (the wiki calibration half), a .txt/.jsonl path, or [n, seqlen] token ids.
        tokenizer: the model's tokenizer, to cut calibration text.
    Returns:
        The record (also set as `model.config.llmshrink_width_prune`): the original and new
        widths, the kept channels and key/value heads of each layer (as 'a-b,c' ranges), the
        parts whose removed mean was put back as a bias, the parameters before and after, and the
        candidate widths with their removed energy.
    """
    plan = plan_widths(model, config)  # an unknown layout or a ratio too small fails before any work
    if config.compensate and len(plan.compensate) < len(PARTS):
        logger.info("model type '%s' has no bias switch for %s; pruned there without bias compensation",
                    model.config.model_type, " or ".join(p for p in PARTS if p not in plan.compensate))
    mc = model.config
    check_seqlen(mc, seqlen if not isinstance(calibration, torch.Tensor) else calibration.shape[1])
    calib, calib_info = resolve_calibration(tokenizer, calibration, nsamples, seqlen, seed)
    started = time.perf_counter()
    model.eval()
    stats = unit_statistics(model, calib, progress=progress)
    # the variance is what compensation leaves lost; without it, the whole second moment
    att_scores, mlp_scores = stats.scores(model, "attention" in plan.compensate, "mlp" in plan.compensate)
    kept_groups, kept_channels, candidates = choose_widths(
        att_scores, mlp_scores, plan.group_options, plan.channel_options, plan.cost, plan.budget(config.ratio),
        relative=config.relative)
    keep_kv = [keep_indices(s, kept_groups) for s in att_scores]
    keep_mlp = [keep_indices(s, kept_channels) for s in mlp_scores]
    shifts = {}
    layers = decoder_layers(model)
    if "attention" in plan.compensate and kept_groups < plan.kv_heads:
        shifts["attention"] = [attention_bias_shift(total, stats.tokens, _removed(keep, plan.kv_heads))
                               for total, keep in zip(stats.group_sum, keep_kv)]
    if "mlp" in plan.compensate and kept_channels < plan.channels:
        shifts["mlp"] = [mlp_bias_shift(total, stats.tokens, _linears(layer)["down"].weight,
                                        _removed(keep, plan.channels))
                         for total, keep, layer in zip(stats.channel_sum, keep_mlp, layers)]
    original = {"intermediate_size": mc.intermediate_size, "num_attention_heads": mc.num_attention_heads,
                "num_key_value_heads": mc.num_key_value_heads, "head_dim": plan.head_dim}
    prune_widths(model, keep_kv, keep_mlp)
    for part, part_shifts in shifts.items():
        add_bias_shifts(model, part, part_shifts)
    kept = plan.cost(kept_groups, kept_channels)
    counted = _count(layers.parameters()) + plan.outside
    if counted != kept:
        raise RuntimeError(f"width_prune counted {kept} parameters but the pruned model has {counted}")
    record = {"config": config.to_dict(), "original": original,
              "widths": {"intermediate_size": kept_channels, "num_attention_heads": kept_groups * plan.group_heads,
                         "num_key_value_heads": kept_groups, "head_dim": plan.head_dim},
              "kept": [{"kv_heads": ranges(k.tolist()), "channels": ranges(c.tolist())}
                       for k, c in zip(keep_kv, keep_mlp)],
              "compensated": sorted(shifts),
              "parameters": {"counted": config.budget, "original": plan.total, "kept": kept,
                             "ratio": round(kept / plan.total, 6)},
              "candidates": [{**c, "removed_energy": round(c["removed_energy"], 8)} for c in candidates],
              "calibration": calib_info}
    logger.info("width-pruned to %d of %d key/value groups and %d of %d MLP channels per layer: %.4f of the %s "
                "parameters, in %.1f s", kept_groups, plan.kv_heads, kept_channels, plan.channels, kept / plan.total,
                config.budget, time.perf_counter() - started)
    setattr(mc, RECORD, record)
    return record


def _removed(keep: torch.Tensor, n: int) -> torch.Tensor:
    mask = torch.ones(n, dtype=torch.bool)
    mask[keep.long()] = False
    return mask.nonzero().flatten()
