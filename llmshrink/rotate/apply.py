"""Rotating a model in place: fold each RMSNorm's scale into the linears it feeds, then turn the
residual stream by an orthogonal Q (and, with `heads`, each value/output head by an orthogonal R).

With x the residual stream (a row vector) and y = x W^T a linear:
- a linear that reads the stream (q, k, v, gate, up, the head) becomes W Q;
- a linear that writes it (o_proj, down_proj) becomes Q^T W (its bias b Q);
- the embedding table becomes E Q; a scale-free RMSNorm commutes with Q (|x Q| = |x|).
So every hidden state of the rotated model is the original's times Q and the logits are the same,
while the weights that GPTQ rounds have their outliers spread over all coordinates.

Which norm feeds which linears is data (`FAMILIES`); a model outside it, or one whose norms subtract
a mean (LayerNorm) or scale a branch's output before the residual add (Gemma 2/3's sandwich norms),
cannot be folded and is refused before any weight changes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from ..arch import arch_for, decoder_layers
from ..errors import UsageError
from .config import RotateConfig
from .hadamard import hadamard_order_factors, orthogonal

__all__ = ["FAMILIES", "Family", "check_rotatable", "rotate_model"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Family:
    norms: dict[str, tuple[str, ...]]  # a layer's norm -> the linears that read its output
    writers: tuple[str, ...]  # the linears that add into the residual stream
    value: str = "self_attn.v_proj"
    output: str = "self_attn.o_proj"


_LLAMA_LIKE = Family(
    norms={"input_layernorm": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
           "post_attention_layernorm": ("mlp.gate_proj", "mlp.up_proj")},
    writers=("self_attn.o_proj", "mlp.down_proj"))

FAMILIES: dict[str, Family] = {"llama": _LLAMA_LIKE, "mistral": _LLAMA_LIKE, "qwen2": _LLAMA_LIKE,
                               "gemma": _LLAMA_LIKE}
WHY_NOT = {
    "gemma2": "its post-attention and post-feedforward norms scale each branch's output before the residual add",
    "gemma3_text": "its post-attention and post-feedforward norms scale each branch's output before the residual add",
    "gemma3": "its post-attention and post-feedforward norms scale each branch's output before the residual add",
    "gpt_neox": "its LayerNorms subtract the mean, which does not commute with a rotation",
    "opt": "its LayerNorms subtract the mean, which does not commute with a rotation",
}


def _norm_form(norm: nn.Module) -> str | None:
    """'w' for x / rms(x) * w, '1+w' for x / rms(x) * (1 + w), None for anything else (probed)."""
    weight = getattr(norm, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 1 or getattr(norm, "bias", None) is not None:
        return None
    x = torch.randn(3, weight.numel(), generator=torch.Generator().manual_seed(0), dtype=torch.float32) + 0.5
    with torch.no_grad():
        out = norm(x.to(weight.dtype)).float()
    unit = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6)))
    w = weight.detach().float()
    for form, scale in (("w", w), ("1+w", 1 + w)):
        if torch.allclose(out, unit * scale, rtol=1e-4, atol=1e-5):
            return form
    return None


def _final_norm(model: nn.Module) -> nn.Module:
    return model.get_submodule(arch_for(model).layers.rsplit(".", 1)[0] + ".norm")


def check_rotatable(model: nn.Module) -> tuple[Family, dict[nn.Module, str]]:
    """The model's family and each norm's form ('w' or '1+w', probed once), or a UsageError saying
    why it cannot be rotated (before any change)."""
    model_type = getattr(model.config, "model_type", "")
    if model_type not in FAMILIES:
        why = WHY_NOT.get(model_type, "its norms and linears are not in llmshrink's rotation table")
        raise UsageError(f"model type '{model_type}' cannot be rotated: {why}; rotatable: {', '.join(FAMILIES)}")
    family = FAMILIES[model_type]
    norms = [(f"layers.{i}.{n}", layer.get_submodule(n)) for i, layer in enumerate(decoder_layers(model))
             for n in family.norms] + [("norm", _final_norm(model))]
    forms = {}
    for name, norm in norms:
        forms[norm] = _norm_form(norm)
        if forms[norm] is None:
            raise UsageError(f"{name} ({type(norm).__name__}) is not an RMSNorm of the form x*w or x*(1+w); "
                             "the model cannot be rotated")
    return family, forms


def _fold(norm: nn.Module, form: str, linears: list[nn.Linear]) -> None:
    """Move the norm's scale into the columns of the linears that read it; leave the norm scale-free."""
    scale = norm.weight.detach().double() + (1 if form == "1+w" else 0)
    for linear in linears:
        linear.weight.data = (linear.weight.double() * scale[None, :]).to(linear.weight.dtype)
    norm.weight.data = torch.full_like(norm.weight, 0.0 if form == "1+w" else 1.0)


def _reads(linear: nn.Linear, Q: torch.Tensor) -> None:
    linear.weight.data = (linear.weight.double() @ Q).to(linear.weight.dtype)


def _writes(linear: nn.Linear, Q: torch.Tensor) -> None:
    linear.weight.data = (Q.T @ linear.weight.double()).to(linear.weight.dtype)
    if linear.bias is not None:
        linear.bias.data = (linear.bias.double() @ Q).to(linear.bias.dtype)


def _rotate_heads(layer: nn.Module, family: Family, R: torch.Tensor, head_dim: int) -> None:
    """v_proj's rows and o_proj's columns, head by head: each head's values turn by R, o_proj undoes it."""
    v, o = layer.get_submodule(family.value), layer.get_submodule(family.output)
    W = v.weight.double().reshape(-1, head_dim, v.in_features)  # [kv heads, head_dim, in]
    v.weight.data = torch.einsum("dk,hdi->hki", R, W).reshape(v.weight.shape).to(v.weight.dtype)
    if v.bias is not None:
        v.bias.data = (v.bias.double().reshape(-1, head_dim) @ R).reshape(-1).to(v.bias.dtype)
    Wo = o.weight.double().reshape(o.out_features, -1, head_dim)  # [out, heads, head_dim]
    o.weight.data = (Wo @ R).reshape(o.weight.shape).to(o.weight.dtype)


def rotate_model(model: nn.Module, config: RotateConfig) -> dict:
    """Fold the norms and rotate `model` in place; returns the record saved as config.llmshrink_rotate."""
    family, forms = check_rotatable(model)
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    final = _final_norm(model)
    tied = head is not None and head.weight is embed.weight
    untied = False
    identity = 0.0 if forms[final] == "1+w" else 1.0  # a final norm with nothing to fold
    if tied and not torch.all(final.weight.detach() == identity):
        head.weight = nn.Parameter(embed.weight.detach().clone())  # the head gets the final norm's scale
        model.config.tie_word_embeddings = False
        untied = True
        logger.warning("the output head was tied to the embedding; the final norm's scale is folded into the head, "
                       "so the two are saved apart (+%.1f M parameters)", embed.weight.numel() / 1e6)
    layers = decoder_layers(model)
    with torch.no_grad():
        for layer in layers:
            for name, readers in family.norms.items():
                norm = layer.get_submodule(name)
                _fold(norm, forms[norm], [layer.get_submodule(r) for r in readers])
        if head is not None:
            _fold(final, forms[final], [head])
        d = embed.weight.shape[1]
        Q = orthogonal(d, seed=config.seed, kind=config.kind)
        embed.weight.data = (embed.weight.double() @ Q).to(embed.weight.dtype)
        for layer in layers:
            for readers in family.norms.values():
                for r in readers:
                    _reads(layer.get_submodule(r), Q)
            for w in family.writers:
                _writes(layer.get_submodule(w), Q)
        if head is not None and not tied or untied:
            _reads(head, Q)
        head_dim = getattr(model.config, "head_dim", None) or model.config.hidden_size // model.config.num_attention_heads
        if config.heads:
            R = orthogonal(head_dim, seed=config.seed + 1, kind=config.kind)
            for layer in layers:
                _rotate_heads(layer, family, R, head_dim)
    record = {"config": config.to_dict(), "untied": untied,
              "residual": {"width": d, "hadamard_factors": list(hadamard_order_factors(d) or []) if config.kind == "hadamard" else []},
              "heads": {"width": head_dim} if config.heads else None}
    model.config.llmshrink_rotate = record
    return record
