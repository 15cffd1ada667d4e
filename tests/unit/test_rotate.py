"""Rotations folded offline: Hadamard constructions, and rotated models whose logits equal the
original's on tiny random models of every family in the architecture table (or a clear refusal)."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import llmshrink
from llmshrink import UsageError
from llmshrink.arch import ARCHITECTURES
from llmshrink.rotate import RotateConfig, hadamard, hadamard_order_factors, orthogonal, rotate_model

SMALL = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, vocab_size=128)
CONFIGS = {
    "llama": dict(num_key_value_heads=2),
    "mistral": dict(num_key_value_heads=2),
    "qwen2": dict(num_key_value_heads=2),  # biases on q, k, v
    "gemma": dict(num_key_value_heads=2, head_dim=12),  # x * (1 + w) norms, tied head, scaled embedding
    "gemma2": dict(num_key_value_heads=2, head_dim=12),
    "gemma3_text": dict(num_key_value_heads=2, head_dim=12),
    "gemma3": dict(),
    "gpt_neox": dict(),
    "opt": dict(ffn_dim=96, word_embed_proj_dim=48, max_position_embeddings=64),
}
ROTATABLE = ("llama", "mistral", "qwen2", "gemma")
IDS = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))


def tiny(model_type: str, tie: bool | None = None):
    extra = {} if tie is None else {"tie_word_embeddings": tie}
    config = AutoConfig.for_model(model_type, **{**SMALL, **CONFIGS[model_type], **extra})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # norms with scales to fold (a fresh model's are all ones, or zeros)
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.rand(p.shape) * 1.5 + 0.25 - (1.0 if model_type == "gemma" else 0.0))
    return model


def logits(model, ids: torch.Tensor = IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits.double()


@pytest.mark.parametrize("n", [1, 2, 4, 12, 20, 28, 36, 48, 96, 576, 768, 896, 1536])
def test_hadamard_matrices_of_the_widths_models_use(n):
    H = hadamard(n)
    assert H.abs().eq(1).all()
    torch.testing.assert_close(H @ H.T, n * torch.eye(n, dtype=torch.float64))


def test_576_is_a_kronecker_product_and_odd_orders_have_none():
    assert math.prod(hadamard_order_factors(576)) == 576
    assert hadamard_order_factors(7) is None and hadamard_order_factors(14) is None


@pytest.mark.parametrize("kind,n", [("hadamard", 48), ("hadamard", 14), ("random", 48)])
def test_orthogonal_matrices_are_orthogonal_and_seeded(kind, n):
    Q = orthogonal(n, seed=3, kind=kind)
    torch.testing.assert_close(Q @ Q.T, torch.eye(n, dtype=torch.float64))
    assert torch.equal(Q, orthogonal(n, seed=3, kind=kind)) and not torch.equal(Q, orthogonal(n, seed=4, kind=kind))


@pytest.mark.parametrize("heads", [True, False])
@pytest.mark.parametrize("kind", ["hadamard", "random"])
@pytest.mark.parametrize("model_type", ROTATABLE)
def test_rotated_logits_equal_the_original(model_type, kind, heads):
    model = tiny(model_type)
    before = logits(model)
    record = rotate_model(model, RotateConfig(kind=kind, heads=heads, seed=1))
    torch.testing.assert_close(logits(model), before, rtol=1e-4, atol=1e-4)
    assert record["heads"] == ({"width": 12} if heads else None)
    embed = model.get_input_embeddings().weight
    assert not torch.allclose(embed, tiny(model_type).get_input_embeddings().weight)  # it did turn


@pytest.mark.parametrize("tie", [True, False])
def test_a_tied_head_is_untied_only_when_the_final_norm_has_a_scale(tie):
    model = tiny("llama", tie=tie)
    record = rotate_model(model, RotateConfig())
    assert record["untied"] is tie and model.config.tie_word_embeddings is False or not tie
    plain = tiny("llama", tie=True)
    with torch.no_grad():
        plain.model.norm.weight.fill_(1.0)  # nothing to fold: the head stays tied
    before = logits(plain)
    assert rotate_model(plain, RotateConfig())["untied"] is False
    assert plain.lm_head.weight is plain.model.embed_tokens.weight
    torch.testing.assert_close(logits(plain), before, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("model_type,why", [
    ("gemma2", "scale each branch's output"), ("gemma3_text", "scale each branch's output"),
    ("gpt_neox", "subtract the mean"), ("opt", "subtract the mean"), ("phi", "not in llmshrink's rotation table")])
def test_families_whose_norms_cannot_be_folded_are_refused_before_any_change(model_type, why):
    model = tiny(model_type) if model_type in CONFIGS else AutoModelForCausalLM.from_config(
        AutoConfig.for_model(model_type, **SMALL))
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UsageError, match=f"model type '{model_type}' cannot be rotated: .*{why}"):
        rotate_model(model, RotateConfig())
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())


def test_every_family_in_the_architecture_table_is_covered_here():
    assert set(ARCHITECTURES) <= set(CONFIGS)


def test_a_rotated_folder_is_an_ordinary_checkpoint_and_quantizes(tmp_path):
    from transformers import AutoModelForCausalLM as PlainAuto

    from conftest import save_tiny

    source = save_tiny(tmp_path / "tiny", layers=2, seed=2)
    out = llmshrink.compress(source, RotateConfig(), tmp_path / "rotated")
    ids = IDS % 97  # the tiny folder's character vocabulary
    torch.testing.assert_close(logits(PlainAuto.from_pretrained(out), ids),
                               logits(PlainAuto.from_pretrained(source), ids), rtol=1e-4, atol=1e-4)
    assert PlainAuto.from_pretrained(out).config.llmshrink_rotate["config"]["kind"] == "hadamard"
    calib = torch.randint(1, 97, (4, 32), generator=torch.Generator().manual_seed(1))
    q = llmshrink.quantize(out, llmshrink.GPTQConfig(bits=4, group_size=16), tmp_path / "q", calibration=calib,
                           progress=False)
    assert torch.isfinite(logits(llmshrink.AutoModelForCausalLM.from_pretrained(q), ids)).all()
