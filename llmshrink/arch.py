"""Where a model's decoder layers live and which linears inside them go together, as data.

One row per model type: the dotted path of the decoder layers' ModuleList and the linears of a
layer in the order GPTQ quantizes them (`true_sequential`), grouped by shared input. Model types
not in the table fall back to discovery: the longest ModuleList of blocks holding nn.Linear, each
linear its own step in module order.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .errors import UsageError

__all__ = ["ArchSpec", "ARCHITECTURES", "arch_for", "decoder_layers", "layer_linears"]


@dataclass(frozen=True)
class ArchSpec:
    layers: str  # dotted path from the CausalLM to the decoder layers' ModuleList
    sequential: tuple[tuple[str, ...], ...]  # linears per step; a step's linears share one input


_LLAMA_LIKE = ArchSpec(
    layers="model.layers",
    sequential=(
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        ("self_attn.o_proj",),
        ("mlp.gate_proj", "mlp.up_proj"),
        ("mlp.down_proj",),
    ),
)

ARCHITECTURES: dict[str, ArchSpec] = {
    "llama": _LLAMA_LIKE,  # SmolLM2 too
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "gemma2": _LLAMA_LIKE,
    "gemma3_text": _LLAMA_LIKE,
    "gemma3": ArchSpec("model.language_model.layers", _LLAMA_LIKE.sequential),
    "gpt_neox": ArchSpec(
        layers="gpt_neox.layers",
        sequential=(("attention.query_key_value",), ("attention.dense",), ("mlp.dense_h_to_4h",),
                    ("mlp.dense_4h_to_h",)),
    ),
    "opt": ArchSpec(
        layers="model.decoder.layers",
        sequential=(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.out_proj",),
                    ("fc1",), ("fc2",)),
    ),
}


def _discover(model: nn.Module) -> ArchSpec:
    best_name, best = None, None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0 and all(
            any(isinstance(m, nn.Linear) for m in block.modules()) for block in module
        ):
            if best is None or len(module) > len(best):
                best_name, best = name, module
    if best is None:
        raise UsageError(f"no decoder layers holding nn.Linear found in model type "
                         f"'{getattr(model.config, 'model_type', type(model).__name__)}'; it cannot be quantized "
                         f"layer by layer (supported: {', '.join(ARCHITECTURES)})")
    steps = tuple((n,) for n, m in best[0].named_modules() if isinstance(m, nn.Linear))
    return ArchSpec(best_name, steps)


def arch_for(model: nn.Module) -> ArchSpec:
    """The table's row for the model's type, or a discovered one."""
    return ARCHITECTURES.get(getattr(model.config, "model_type", ""), None) or _discover(model)


def decoder_layers(model: nn.Module, spec: ArchSpec | None = None) -> nn.ModuleList:
    spec = spec or arch_for(model)
    layers = model.get_submodule(spec.layers)
    if not isinstance(layers, nn.ModuleList):
        raise UsageError(f"{spec.layers} of {type(model).__name__} is not a list of layers")
    return layers


def layer_linears(layer: nn.Module, spec: ArchSpec) -> list[list[tuple[str, nn.Linear]]]:
    """The linears of one decoder layer as steps of (name, module), checked to exist."""
    steps = []
    for step in spec.sequential:
        found = []
        for name in step:
            module = layer.get_submodule(name)
            if not isinstance(module, nn.Linear):
                raise UsageError(f"{name} is a {type(module).__name__}, not nn.Linear; the architecture "
                                 "table does not fit this model")
            found.append((name, module))
        steps.append(found)
    return steps
