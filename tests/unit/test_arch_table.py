"""The declarative architecture table, proven on tiny random configs of each family."""

import pytest
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from llmshrink import UsageError
from llmshrink.arch import ARCHITECTURES, arch_for, decoder_layers, layer_linears

SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, vocab_size=128)
CONFIGS = {
    "llama": dict(num_key_value_heads=2),
    "mistral": dict(num_key_value_heads=2),
    "qwen2": dict(num_key_value_heads=2),
    "gemma": dict(num_key_value_heads=2, head_dim=8),
    "gemma2": dict(num_key_value_heads=2, head_dim=8),
    "gemma3_text": dict(num_key_value_heads=2, head_dim=8),
    "gpt_neox": dict(),
    "opt": dict(ffn_dim=64, word_embed_proj_dim=32, max_position_embeddings=64),
}


def _tiny(model_type, **extra):
    config = AutoConfig.for_model(model_type, **{**SMALL, **CONFIGS.get(model_type, {}), **extra})
    return AutoModelForCausalLM.from_config(config)


@pytest.mark.parametrize("model_type", sorted(CONFIGS))
def test_table_finds_every_layer_and_every_linear(model_type):
    model = _tiny(model_type)
    spec = arch_for(model)
    assert spec is ARCHITECTURES[model_type]
    layers = decoder_layers(model, spec)
    assert len(layers) == 3
    for layer in layers:
        named = [name for step in layer_linears(layer, spec) for name, _ in step]
        every = [n for n, m in layer.named_modules() if isinstance(m, nn.Linear)]
        assert sorted(named) == sorted(every)  # nothing missed, nothing twice


def test_unknown_types_fall_back_to_discovery():
    model = _tiny("phi")
    assert "phi" not in ARCHITECTURES
    spec = arch_for(model)
    layers = decoder_layers(model, spec)
    assert spec.layers == "model.layers" and len(layers) == 3
    names = [name for step in layer_linears(layers[0], spec) for name, _ in step]
    assert "mlp.fc1" in names and "self_attn.q_proj" in names


def test_a_model_without_linear_layers_is_a_clear_error():
    class NoLinears(nn.Module):
        config = type("C", (), {"model_type": "mystery"})()

        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([nn.Conv1d(2, 2, 1)])

    with pytest.raises(UsageError, match="no decoder layers holding nn.Linear found in model type 'mystery'"):
        arch_for(NoLinears())
