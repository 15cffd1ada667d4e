"""`llmshrink.width_prune.width_prune`: measure each MLP channel's and each key/value group's output
energy on calibration text (with `refit`, the inputs' second moments of down_proj and o_proj),
choose the widths for the budget, then cut the linears (and refit the writers on what they keep).

The statistics come from full forwards of the original model over the calibration windows, a
few windows at a time, with hooks on every layer's o_proj and down_proj inputs; memory is one
batch's forward (and one key/value group's output through o_proj, [tokens, hidden] float64) plus,
per layer, 2 * intermediate_size + num_key_value_heads * (hidden_size + 1) float64 sums; with
`refit`, also per layer the x x^T sums of the inputs of each part that can be pruned (down_proj:
intermediate_size^2, o_proj: (heads * head_dim)^2 + heads * head_dim float64, on the CPU; one
[n, n] float32 product per hook call on the model's device). Every layer is measured on the
original model's activations (one pass: nothing is pruned until all are measured).
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
from .importance import (attention_bias_shift, bias_shift, channel_scores, choose_from_curves, choose_widths,
                         damped, fitting_widths, group_output_stats, group_scores, input_moment, keep_indices,
                         mlp_bias_shift, obs_curve, ranges, refit)

__all__ = ["BIAS_SWITCHES", "LAYOUT", "MODEL_TYPES", "RECORD", "Plan", "Statistics", "add_bias_shifts", "check_layout",
           "plan_widths", "prune_widths", "unit_statistics", "width_prune"]

logger = logging.getLogger(__name__)

RECORD = "llmshrink_width_prune"  # the config.json key of a width-pruned folder
BATCH = 4  # calibration windows per forward
# Calibration tokens per refit input below which width_prune warns: on the default model (1536 MLP
# channels, ratio 0.8, 4 x 256 held-out tokens) the refit lost to energy scores alone with 2048
# tokens (ppl 79.3 against 60.4; 61.7 at damp 0.1) and won with 8192 (49.7 against 55.6) and 65536.
REFIT_TOKENS = 4

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
    # with moments (for refitting): sums of x x^T and x of o_proj's inputs, of a a^T of down_proj's
    o_outer: torch.Tensor | None = None  # [layers, heads * head_dim, heads * head_dim] float64
    o_sum: torch.Tensor | None = None  # [layers, heads * head_dim]
    down_outer: torch.Tensor | None = None  # [layers, I, I]

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
                    progress: bool = True, moments: tuple[str, ...] = ()) -> Statistics:
    """Hooks on every layer's o_proj and down_proj inputs over full forwards of `calib` [n, seqlen];
    `moments`: the parts ('attention': o_proj, 'mlp': down_proj) whose inputs' x x^T sums are also
    taken (float32 products per batch, summed in float64), which refitting needs: L * I^2 float64
    more memory for the MLP, L * (heads * head_dim)^2 for attention."""
    layers = decoder_layers(model)
    mc = model.config
    L, G, I, h = len(layers), mc.num_key_value_heads, mc.intermediate_size, mc.hidden_size
    stats = Statistics(0, torch.zeros(L, G, dtype=torch.float64), torch.zeros(L, G, h, dtype=torch.float64),
                       torch.zeros(L, I, dtype=torch.float64), torch.zeros(L, I, dtype=torch.float64))
    lins = [_linears(layer) for layer in layers]
    n = lins[0]["o"].in_features
    stats.o_sum = torch.zeros(L, n, dtype=torch.float64)  # small; the refit's bias shift of either part reads it
    if "attention" in moments:
        stats.o_outer = torch.zeros(L, n, n, dtype=torch.float64)
    if "mlp" in moments:
        stats.down_outer = torch.zeros(L, I, I, dtype=torch.float64)

    def outer(x: torch.Tensor) -> torch.Tensor:
        x = x.detach().float()
        return (x.T @ x).double().cpu()

    def on_o(i):
        def fn(module, args):
            sq, total = group_output_stats(args[0], module.weight, G)
            stats.group_sq[i] += sq.cpu()
            stats.group_sum[i] += total.cpu()
            z = args[0].flatten(0, -2)
            stats.o_sum[i] += z.detach().double().sum(0).cpu()
            if stats.o_outer is not None:
                stats.o_outer[i] += outer(z)
        return fn

    def on_down(i):
        def fn(module, args):
            a = args[0].detach().double().flatten(0, -2)  # [tokens, I]
            stats.channel_sq[i] += a.pow(2).sum(0).cpu()
            stats.channel_sum[i] += a.sum(0).cpu()
            if stats.down_outer is not None:
                stats.down_outer[i] += outer(args[0].flatten(0, -2))
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


def _group_columns(keep_kv: torch.Tensor, group_heads: int, head_dim: int) -> torch.Tensor:
    """The query rows (= o_proj's columns) of the heads of key/value groups `keep_kv`, in order."""
    heads = (keep_kv.long()[:, None] * group_heads + torch.arange(group_heads)).flatten()
    return (heads[:, None] * head_dim + torch.arange(head_dim)).flatten()


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
        q_rows = _group_columns(keep_kv, g, d)  # the query heads of the kept groups
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
        parts whose removed mean was put back as a bias and those whose writer was refit, the
        parameters before and after, and the candidate widths with their removed energy (or
        refit error).
    """
    plan = plan_widths(model, config)  # an unknown layout or a ratio too small fails before any work
    if config.compensate and len(plan.compensate) < len(PARTS):
        logger.info("model type '%s' has no bias switch for %s; pruned there without bias compensation",
                    model.config.model_type, " or ".join(p for p in PARTS if p not in plan.compensate))
    mc = model.config
    check_seqlen(mc, seqlen if not isinstance(calibration, torch.Tensor) else calibration.shape[1])
    calib, calib_info = resolve_calibration(tokenizer, calibration, nsamples, seqlen, seed)
    widest = max((plan.channels if part == "mlp" else plan.kv_heads * plan.group_heads * plan.head_dim)
                 for part in _prunable(plan)) if config.refit and _prunable(plan) else 0
    if calib.numel() < REFIT_TOKENS * widest:
        logger.warning("width_prune: %d calibration tokens for a refit of %d inputs; the refit fits noise below "
                       "about %d tokens per input (on the default model it then did worse than --no-refit); give "
                       "more calibration (--nsamples) or --no-refit", calib.numel(), widest, REFIT_TOKENS)
    started = time.perf_counter()
    model.eval()
    stats = unit_statistics(model, calib, progress=progress, moments=_prunable(plan) if config.refit else ())
    layers = decoder_layers(model)
    shifts, refits = {}, {}
    if config.refit:
        kept_groups, kept_channels, candidates, keep_kv, keep_mlp = _refit_choice(model, plan, stats, config,
                                                                                  progress)
        refits, shifts = _refit_writers(model, plan, stats, keep_kv, keep_mlp, config.damp)
    else:
        # the variance is what compensation leaves lost; without it, the whole second moment
        att_scores, mlp_scores = stats.scores(model, "attention" in plan.compensate, "mlp" in plan.compensate)
        kept_groups, kept_channels, candidates = choose_widths(
            att_scores, mlp_scores, plan.group_options, plan.channel_options, plan.cost, plan.budget(config.ratio),
            relative=config.relative)
        keep_kv = [keep_indices(s, kept_groups) for s in att_scores]
        keep_mlp = [keep_indices(s, kept_channels) for s in mlp_scores]
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
    for part, weights in refits.items():
        writer = PARTS[part][-1]
        with torch.no_grad():
            for layer, weight in zip(layers, weights):
                target = _linears(layer)[writer].weight
                target.copy_(weight.to(dtype=target.dtype, device=target.device))
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
              "refit": sorted(refits),
              "parameters": {"counted": config.budget, "original": plan.total, "kept": kept,
                             "ratio": round(kept / plan.total, 6)},
              "candidates": [{**c, "removed_energy": round(c["removed_energy"], 8)} for c in candidates],
              "calibration": calib_info}
    logger.info("width-pruned to %d of %d key/value groups and %d of %d MLP channels per layer: %.4f of the %s "
                "parameters, in %.1f s", kept_groups, plan.kv_heads, kept_channels, plan.channels, kept / plan.total,
                config.budget, time.perf_counter() - started)
    setattr(mc, RECORD, record)
    return record


def _prunable(plan: Plan) -> tuple[str, ...]:
    """The parts whose width has more than one option."""
    return tuple(part for part, options in (("attention", plan.group_options), ("mlp", plan.channel_options))
                 if len(options) > 1)


def _moments(plan: Plan, stats: Statistics, layer: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """o_proj's and down_proj's input moments in layer `layer` (None for a part not measured):
    covariances where the part is compensated (its mean goes back as a bias), else second moments."""
    return tuple(None if outer is None
                 else input_moment(outer[layer], total[layer], stats.tokens, part in plan.compensate)
                 for part, outer, total in (("attention", stats.o_outer, stats.o_sum),
                                            ("mlp", stats.down_outer, stats.channel_sum)))


def _refit_choice(model: nn.Module, plan: Plan, stats: Statistics, config: WidthPruneConfig, progress: bool):
    """The widths and each layer's kept units by structured OBS error curves (`obs_curve`): the
    error of each layer's writers after dropping units and refitting the rest."""
    pairs = fitting_widths(plan.group_options, plan.channel_options, plan.cost, plan.budget(config.ratio))
    group_steps = plan.kv_heads - min(g for g, _ in pairs)
    channel_steps = plan.channels - min(c for _, c in pairs)
    orders, curves, totals = ([], []), ([], []), []
    for i, layer in enumerate(tqdm(decoder_layers(model), desc="width_prune: refit curves", unit="layer",
                                   disable=not progress)):
        lin = _linears(layer)
        M_o, M_down = _moments(plan, stats, i)
        total = 0.0
        for part, (W, M, block, steps) in enumerate(((lin["o"].weight, M_o, plan.group_heads * plan.head_dim,
                                                      group_steps), (lin["down"].weight, M_down, 1, channel_steps))):
            if M is None:  # a part that keeps its width: nothing to drop, nothing measured
                orders[part].append(torch.zeros(0, dtype=torch.long))
                curves[part].append(torch.zeros(1, dtype=torch.float64))
                continue
            W = W.detach().double().cpu()  # the moments are on the CPU, whatever the model's device
            order, curve = obs_curve(W, M, block=block, steps=steps, damp=config.damp)
            orders[part].append(order)
            curves[part].append(curve)
            total += float(torch.einsum("oi,ij,oj->", W, damped(M, config.damp), W))  # as the curve counts
        totals.append(total)
    kept_groups, kept_channels, candidates = choose_from_curves(
        torch.stack(curves[0]), torch.stack(curves[1]), (plan.kv_heads, plan.channels), pairs, plan.cost,
        torch.tensor(totals, dtype=torch.float64) if config.relative else None)
    keep_kv = [_removed(order[:plan.kv_heads - kept_groups], plan.kv_heads) for order in orders[0]]
    keep_mlp = [_removed(order[:plan.channels - kept_channels], plan.channels) for order in orders[1]]
    return kept_groups, kept_channels, candidates, keep_kv, keep_mlp


def _refit_writers(model: nn.Module, plan: Plan, stats: Statistics, keep_kv: list[torch.Tensor],
                   keep_mlp: list[torch.Tensor], damp: float) -> tuple[dict, dict]:
    """The least-squares o_proj / down_proj weights on the kept inputs of each pruned part, and
    (where compensated) the bias shifts that keep each writer's mean output."""
    refits, shifts = {}, {}
    for i, layer in enumerate(decoder_layers(model)):
        lin = _linears(layer)
        moments = _moments(plan, stats, i)
        means = (stats.o_sum[i] / stats.tokens, stats.channel_sum[i] / stats.tokens)
        kept = (_group_columns(keep_kv[i], plan.group_heads, plan.head_dim), keep_mlp[i].long())
        widths = (len(keep_kv[i]) < plan.kv_heads, len(keep_mlp[i]) < plan.channels)
        for part, M, mean, cols, pruned in zip(PARTS, moments, means, kept, widths):
            if not pruned:
                continue
            W = lin[PARTS[part][-1]].weight.detach().double().cpu()
            new = refit(W, M, cols, damp=damp)
            refits.setdefault(part, []).append(new)
            if part in plan.compensate:
                shifts.setdefault(part, []).append(bias_shift(W, new, mean, cols))
    return refits, shifts


def _removed(keep: torch.Tensor, n: int) -> torch.Tensor:
    """0 .. n-1 less `keep`, in order (also: what is kept when `keep` is what went)."""
    mask = torch.ones(n, dtype=torch.bool)
    mask[keep.long()] = False
    return mask.nonzero().flatten()
