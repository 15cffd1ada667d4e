"""The default compute dtype of a GPTQ checkpoint loaded without `dtype=`: fast and finite."""

import json
import logging

import pytest
import torch
from transformers import AutoConfig, LlamaConfig, LlamaForCausalLM

import llmshrink
from llmshrink.gptq import load as gptq_load
from llmshrink.gptq.quantize import quantize_checkpoint
from llmshrink.kernels.cpu import native_bf16_cpu
from llmshrink.gptq.config import GPTQConfig
from llmshrink.gptq.linear import QuantLinear

X = torch.randint(1, 96, (2, 24), generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def overflowing(tmp_path_factory):
    """A tiny Llama whose residual stream leaves float16's range (5e4 and more after layer 0),
    quantized to 4 bits; returns (source folder, checkpoint folder)."""
    root = tmp_path_factory.mktemp("overflow")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=False)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.post_attention_layernorm.weight.fill_(500.0)
            layer.mlp.down_proj.weight.mul_(40)
        hidden = model(X, output_hidden_states=True).hidden_states
    assert max(h.abs().max() for h in hidden) > 2 * torch.finfo(torch.float16).max
    model.save_pretrained(root / "src")
    calib = torch.randint(1, 96, (8, 32), generator=torch.Generator().manual_seed(1))
    out = quantize_checkpoint(root / "src", GPTQConfig(bits=4, group_size=32), calib, root / "q", progress=False)
    return root / "src", out


def _logits(model):
    with torch.no_grad():
        return model(X).logits.float()


def _load_messages(caplog):
    return [r.getMessage() for r in caplog.records if "GPTQ checkpoint loads in" in r.getMessage()]


def test_default_load_is_finite_and_equals_the_bf16_load(overflowing, caplog):
    _, out = overflowing
    want_dtype = torch.bfloat16 if native_bf16_cpu() else torch.float32
    assert gptq_load.default_load_dtype(AutoConfig.from_pretrained(out), "cpu")[0] == want_dtype
    fp16 = llmshrink.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float16)  # obeyed, and overflows
    assert fp16.dtype == torch.float16 and not torch.isfinite(_logits(fp16)).all()
    with caplog.at_level(logging.INFO, logger="llmshrink"):
        default = llmshrink.AutoModelForCausalLM.from_pretrained(out)
    assert default.dtype == want_dtype != torch.float16
    (message,) = _load_messages(caplog)  # logged once, naming the dtype
    assert str(want_dtype).removeprefix("torch.") in message
    got = _logits(default)
    assert torch.isfinite(got).all()
    explicit = llmshrink.AutoModelForCausalLM.from_pretrained(out, dtype=want_dtype)
    torch.testing.assert_close(got, _logits(explicit), rtol=0, atol=0)
    assert all(m.compute_dtype == want_dtype for m in default.modules() if isinstance(m, QuantLinear))


def test_plain_transformers_default_load_is_the_same(overflowing, caplog):
    import transformers
    from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING

    _, out = overflowing
    if AUTO_QUANTIZER_MAPPING["gptq"].__module__ != "llmshrink.gptq.hf":
        pytest.skip("transformers' own GPTQ path serves gptq here")
    want_dtype = torch.bfloat16 if native_bf16_cpu() else torch.float32
    with caplog.at_level(logging.INFO, logger="llmshrink"):
        model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == want_dtype
    assert len(_load_messages(caplog)) == 1
    got = _logits(model)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, _logits(llmshrink.AutoModelForCausalLM.from_pretrained(out, dtype=want_dtype)),
                               rtol=0, atol=0)
    for dtype in (torch.float32, torch.float16):  # an explicit dtype is obeyed as it is
        assert transformers.AutoModelForCausalLM.from_pretrained(out, dtype=dtype).dtype == dtype


def test_plain_checkpoints_keep_float32(overflowing):
    src, _ = overflowing
    assert llmshrink.AutoModelForCausalLM.from_pretrained(src).dtype == torch.float32
    assert llmshrink.AutoModelForCausalLM.from_pretrained(src, dtype="auto").dtype == torch.float32


def test_the_rule_on_each_device(overflowing, monkeypatch):
    _, out = overflowing
    config = AutoConfig.from_pretrained(out)
    meta = json.loads((out / "config.json").read_text())
    assert meta["dtype"] == "float16" and meta["quantization_config"]["llmshrink"]["source_dtype"] == "float32"
    for native, want in ((True, torch.bfloat16), (False, torch.float32)):  # never float16 on CPU
        monkeypatch.setattr(gptq_load, "native_bf16_cpu", lambda native=native: native)
        assert gptq_load.default_load_dtype(config, "cpu")[0] == want
    assert gptq_load.default_load_dtype(config, "cuda")[0] == torch.float16  # the checkpoint's dtype
    config.quantization_config["llmshrink"]["source_dtype"] = "bfloat16"  # the source computes in bf16
    assert gptq_load.default_load_dtype(config, "cuda")[0] == torch.bfloat16
    other = AutoConfig.from_pretrained(out)
    del other.quantization_config["llmshrink"]
    other.dtype = torch.bfloat16  # another tool's checkpoint, saved in bf16
    assert gptq_load.default_load_dtype(other, "cuda")[0] == torch.bfloat16
