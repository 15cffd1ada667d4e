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

__all__ = ["ArchSpec", "ARCHITECTURES", "arch_for", "checkpoint_names", "decoder_layers", "decoder_steps",
           "layer_linears"]


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


def layer_linears(layer: nn.Module, spec: ArchSpec, factors: bool = False) -> list[list[tuple[str, nn.Linear]]]:
    """The linears of one decoder layer as steps of (name, module), checked to exist.

    With `factors`, a module of linears applied in sequence (it names them in `SEQUENCE`, as the
    factorized linear y = U(V(x)) does: ("V", "U")) stands in as those linears: the first
    (`<name>.V`) joins its step, since it reads the step's input, and each later one, which reads
    the one before's output, is a step of its own right after."""
    steps = []
    for step in spec.sequential:
        found, after = [], []
        for name in step:
            module = layer.get_submodule(name)
            sequence = getattr(module, "SEQUENCE", None) if factors else None
            if sequence:
                first, *rest = sequence
                found.append((f"{name}.{first}", module.get_submodule(first)))
                after += [[(f"{name}.{child}", module.get_submodule(child))] for child in rest]
                continue
            if not isinstance(module, nn.Linear):
                raise UsageError(f"{name} is a {type(module).__name__}, not nn.Linear; the architecture "
                                 "table does not fit this model")
            found.append((name, module))
        steps += [found, *after]
    return steps


def decoder_steps(model: nn.Module) -> list[list[list[tuple[str, nn.Linear]]]]:
    """Per decoder layer, its `layer_linears` steps with each linear named as in the model
    ("model.layers.3.mlp.up_proj")."""
    spec = arch_for(model)
    return [[[(f"{spec.layers}.{i}.{n}", m) for n, m in step] for step in layer_linears(layer, spec)]
            for i, layer in enumerate(decoder_layers(model, spec))]


def checkpoint_names(model: nn.Module, keys: list[str]) -> dict[str, str]:
    """Checkpoint key -> the model's own name, through transformers' renamings for the model
    (GPT-NeoX saves `lm_head` as `embed_out`, for one). Keys are returned unchanged when
    transformers has no mapping API; a model whose weights transformers must convert on load
    (fused or split tensors) is refused, since the walker loads tensors one by one."""
    try:  # inside: these transformers modules exist only from 5.x on
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key
    except ImportError:
        return {k: k for k in keys}
    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    names = {}
    for key in keys:
        name, converted = rename_source_key(key, renamings, converters)
        if converted is not None:
            raise UsageError(f"{key} is converted by transformers on load ({converted}); llmshrink cannot quantize "
                             f"model type '{model.config.model_type}' layer by layer yet")
        names[key] = name
    return names
