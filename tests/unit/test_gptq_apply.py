"""The layer-by-layer walker and the loader on tiny random models saved to disk."""

import hashlib
import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from llmshrink import UsageError
from llmshrink.gptq import layers as gptq_layers, passes as gptq_passes, resume as gptq_resume
from llmshrink.gptq.quantize import quantize_checkpoint
from llmshrink.gptq.config import GPTQConfig
from llmshrink.gptq.linear import QuantLinear
from llmshrink.gptq.load import load_quantized
from llmshrink.gptq.packing import dequantize_gptq
from llmshrink.safetensors_io import TensorIndex

SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, vocab_size=96)


def _save_tiny(folder, model_type="llama", seed=0, **extra):
    torch.manual_seed(seed)
    kw = {"llama": dict(num_key_value_heads=2), "opt": dict(ffn_dim=64, word_embed_proj_dim=32),
          "gpt_neox": dict()}[model_type]
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **{**SMALL, **kw, **extra})).eval()
    model.save_pretrained(folder)
    return model


def _calib(n=12, seq=48):
    return torch.randint(1, 96, (n, seq), generator=torch.Generator().manual_seed(1))


def _digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("model_type", ["llama", "opt", "gpt_neox"])
def test_loaded_checkpoint_computes_with_the_packed_weights(tmp_path, model_type):
    original = _save_tiny(tmp_path / "src", model_type)
    out = quantize_checkpoint(tmp_path / "src", GPTQConfig(bits=4, group_size=16), _calib(), tmp_path / "q",
                              progress=False)
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "gptq" and config["checkpoint_format"] == "gptq" and config["bits"] == 4
    assert json.loads((out / "quantize_config.json").read_text())["group_size"] == 16
    if model_type == "gpt_neox":  # the source's key names are kept; transformers renames embed_out on load
        assert "embed_out.weight" in TensorIndex(out) and "lm_head.weight" not in TensorIndex(out)
    loaded = load_quantized(out)
    quantized = [m for m in loaded.modules() if isinstance(m, QuantLinear)]
    assert len(quantized) == {"llama": 21, "opt": 18, "gpt_neox": 12}[model_type]  # every layer linear
    # Reference: the original model with each linear's weight decoded from the checkpoint tensors.
    reference = original
    with torch.no_grad():
        for name, module in loaded.named_modules():
            if isinstance(module, QuantLinear):
                reference.get_submodule(name).weight.copy_(
                    dequantize_gptq(module.qweight, module.qzeros, module.scales, module.g_idx, module.bits))
        for name, p in loaded.named_parameters():
            reference.get_parameter(name).copy_(p)
        x = _calib(2, 20)
        torch.testing.assert_close(loaded(x).logits, reference(x).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model_type", ["llama", "opt", "gpt_neox"])
def test_replaying_finished_blocks_changes_nothing(tmp_path, monkeypatch, model_type):
    """Passes that stand in for a finished attention block with its saved o_proj inputs give the
    same checkpoint, byte for byte, as passes that run every block in full."""
    _save_tiny(tmp_path / "src", model_type)
    cfg = GPTQConfig(bits=4, group_size=16, calib_dtype="float32")
    templates = []
    real_template = gptq_passes._output_template
    monkeypatch.setattr(gptq_passes, "_output_template", lambda *a: templates.append(real_template(*a)) or templates[-1])
    replayed = quantize_checkpoint(tmp_path / "src", cfg, _calib(), tmp_path / "replayed", progress=False)
    assert len(templates) == 3 and all(t is not None for t in templates)  # one attention block per layer
    monkeypatch.setattr(gptq_layers, "replay_block", lambda *a: None)
    full = quantize_checkpoint(tmp_path / "src", cfg, _calib(), tmp_path / "full", progress=False)
    assert _digest(replayed) == _digest(full)


def test_bf16_calibration_is_recorded_and_as_good_as_fp32(tmp_path):
    original = _save_tiny(tmp_path / "src")
    x = _calib(4, 32)
    with torch.no_grad():
        want = original(x).logits
    errors = {}
    for dtype in ("float32", "bfloat16"):
        out = quantize_checkpoint(tmp_path / "src", GPTQConfig(bits=2, group_size=16, calib_dtype=dtype), _calib(),
                                  tmp_path / dtype, progress=False)
        meta = json.loads((out / "config.json").read_text())["quantization_config"]["llmshrink"]
        assert meta["calibration"]["dtype"] == dtype
        with torch.no_grad():
            errors[dtype] = float((load_quantized(out)(x).logits - want).pow(2).mean())
    assert errors["bfloat16"] < 1.2 * errors["float32"], errors
    with pytest.raises(UsageError, match="calib_dtype"):
        GPTQConfig(calib_dtype="float16")


@pytest.mark.parametrize("tied", [True, False])
def test_lm_head_quantized_on_request(tmp_path, tied):
    original = _save_tiny(tmp_path / "src", tie_word_embeddings=tied)
    out = quantize_checkpoint(tmp_path / "src", GPTQConfig(bits=4, group_size=16, lm_head=True), _calib(),
                              tmp_path / "q", progress=False)
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["lm_head"] is True and config["tie_word_embeddings"] is False
    assert "lm_head.qweight" in TensorIndex(out) and "lm_head.weight" not in TensorIndex(out)
    assert config["quantization_config"]["llmshrink"]["modules"]["lm_head"]["bits"] == 4
    loaded = load_quantized(out)
    assert isinstance(loaded.lm_head, QuantLinear)
    # the input embeddings are untouched (fp16 as saved), even where the head was tied to them
    torch.testing.assert_close(loaded.model.embed_tokens.weight, original.model.embed_tokens.weight.half().float())
    with torch.no_grad():
        head = loaded.lm_head.dequantized_weight()
        assert (head - original.lm_head.weight).abs().mean() < 0.1 * original.lm_head.weight.abs().mean()
        x = _calib(2, 20)
        hidden = loaded.model(x).last_hidden_state
        torch.testing.assert_close(loaded(x).logits, hidden @ head.t(), rtol=1e-5, atol=1e-5)


def test_same_seed_gives_a_byte_identical_checkpoint(tmp_path):
    _save_tiny(tmp_path / "src")
    cfg = GPTQConfig(bits=2, group_size=32, desc_act=True, sym=False)
    a = quantize_checkpoint(tmp_path / "src", cfg, _calib(), tmp_path / "a", progress=False)
    b = quantize_checkpoint(tmp_path / "src", cfg, _calib(), tmp_path / "b", progress=False)
    assert _digest(a) == _digest(b)


@pytest.mark.parametrize("fp_target", [0.0, 1.0])  # True: the full-precision stream is rebuilt on resume
def test_an_interrupted_run_resumes_to_the_same_checkpoint(tmp_path, monkeypatch, fp_target):
    _save_tiny(tmp_path / "src")
    cfg = GPTQConfig(bits=4, group_size=16, fp_target=fp_target)
    whole = quantize_checkpoint(tmp_path / "src", cfg, _calib(), tmp_path / "whole", progress=False)

    real_save = gptq_resume.save_tensors
    calls = {"n": 0}

    def crash_on_layer_2(tensors, path, metadata=None):
        if path.name == "layer-00002.safetensors":
            raise KeyboardInterrupt
        real_save(tensors, path, metadata)

    monkeypatch.setattr(gptq_resume, "save_tensors", crash_on_layer_2)
    with pytest.raises(KeyboardInterrupt):
        quantize_checkpoint(tmp_path / "src", cfg, _calib(), tmp_path / "resumed", progress=False)
    assert not (tmp_path / "resumed").exists()
    state = json.loads((tmp_path / "resumed.partial" / "state.json").read_text())
    assert state["done_layers"] == 2
    monkeypatch.setattr(gptq_resume, "save_tensors", real_save)
    resumed = quantize_checkpoint(tmp_path / "src", cfg, _calib(), tmp_path / "resumed", progress=False)
    assert _digest(resumed) == _digest(whole)
    assert not (tmp_path / "resumed.partial").exists()


def test_a_resume_refuses_a_partial_run_of_other_input(tmp_path, monkeypatch):
    """A .partial folder is resumed only from the same source tensors and calibration windows."""
    model = _save_tiny(tmp_path / "src")
    cfg = GPTQConfig(bits=4, group_size=16)
    real_save = gptq_resume.save_tensors

    def crash_on_layer_1(tensors, path, metadata=None):
        if path.name == "layer-00001.safetensors":
            raise KeyboardInterrupt
        real_save(tensors, path, metadata)

    monkeypatch.setattr(gptq_resume, "save_tensors", crash_on_layer_1)
    with pytest.raises(KeyboardInterrupt, match="kept in .*out.partial.*run the same command again"):
        quantize_checkpoint(tmp_path / "src", cfg, _calib(), tmp_path / "out", progress=False)
    monkeypatch.setattr(gptq_resume, "save_tensors", real_save)
    with pytest.raises(UsageError, match="other calibration windows"):
        quantize_checkpoint(tmp_path / "src", cfg, _calib() + 1, tmp_path / "out", progress=False)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.mul_(2)
    model.save_pretrained(tmp_path / "src")  # same shapes, same sizes: the header and mtime tell
    with pytest.raises(UsageError, match="source model's model.safetensors has changed since the run began .*; delete it to start over"):
        quantize_checkpoint(tmp_path / "src", cfg, _calib(), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists() and (tmp_path / "out.partial" / "state.json").is_file()


def test_bad_inputs_are_refused_before_work(tmp_path):
    model = _save_tiny(tmp_path / "src")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(UsageError, match="exists and is not empty"):
        quantize_checkpoint(tmp_path / "src", GPTQConfig(), _calib(), tmp_path / "full")
    out = quantize_checkpoint(tmp_path / "src", GPTQConfig(group_size=16), _calib(), tmp_path / "q", progress=False)
    with pytest.raises(UsageError, match="already quantized"):
        quantize_checkpoint(out, GPTQConfig(), _calib(), tmp_path / "q2")
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
    model.save_pretrained(tmp_path / "nan")
    with pytest.raises(UsageError, match="up_proj.weight holds NaN or Inf"):
        quantize_checkpoint(tmp_path / "nan", GPTQConfig(group_size=16), _calib(), tmp_path / "q3", progress=False)
    assert not (tmp_path / "q3").exists() and not (tmp_path / "q3.partial").exists()  # found before any layer
    data = (out / "model.safetensors").read_bytes()
    (out / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(UsageError, match="truncated or corrupt"):
        load_quantized(out)


def test_quantize_api_and_auto_loader(tmp_path):
    import llmshrink

    model = _save_tiny(tmp_path / "src")
    out = llmshrink.quantize(model, llmshrink.GPTQConfig(algorithm="rtn", clip_search=False, group_size=16),
                             tmp_path / "rtn", calibration=_calib(), progress=False)
    loaded = llmshrink.AutoModelForCausalLM.from_pretrained(out)
    assert isinstance(loaded.model.layers[0].mlp.down_proj, QuantLinear)
    info = json.loads((out / "config.json").read_text())["quantization_config"]["llmshrink"]
    assert info["config"]["algorithm"] == "rtn" and info["calibration"]["source"] == "tensor"
    plain = llmshrink.AutoModelForCausalLM.from_pretrained(tmp_path / "src")
    assert isinstance(plain.model.layers[0].mlp.down_proj, torch.nn.Linear)
    with pytest.raises(UsageError, match="never runs a model's remote code"):
        llmshrink.AutoModelForCausalLM.from_pretrained(tmp_path / "src", trust_remote_code=True)


def test_plain_transformers_loads_our_checkpoint_after_import_llmshrink(tmp_path):
    import transformers

    import llmshrink  # noqa: F401  (registers the quantizer)
    from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING
    from transformers.utils import is_gptqmodel_available, is_optimum_available

    if is_optimum_available() and is_gptqmodel_available():
        pytest.skip("transformers' own GPTQ path can run here, so llmshrink leaves it in place")
    assert AUTO_QUANTIZER_MAPPING["gptq"].__module__ == "llmshrink.gptq.hf"
    _save_tiny(tmp_path / "src")
    config = GPTQConfig(bits=2, group_size=16, desc_act=True, static_groups=False)  # a non-monotone g_idx
    out = quantize_checkpoint(tmp_path / "src", config, _calib(), tmp_path / "q", progress=False, max_shard_bytes=8192)
    assert len(list(out.glob("model-*-of-*.safetensors"))) > 1  # sharded, with an index
    model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert sum(isinstance(m, QuantLinear) for m in model.modules()) == 21
    assert model.model.layers[2].mlp.down_proj.bits == 2
    reference = load_quantized(out)
    x = _calib(2, 20)
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, reference(x).logits, rtol=0, atol=0)
        assert model.generate(x[:1, :5], max_new_tokens=4, do_sample=False).shape == (1, 9)


def test_too_short_or_empty_calibration_is_refused(tmp_path, tiny):
    from llmshrink.calibration import calibration_windows

    _, tokenizer = tiny
    (tmp_path / "short.txt").write_text("Only a few words here.")
    with pytest.raises(UsageError, match="too few for windows of 512"):
        calibration_windows(tokenizer, str(tmp_path / "short.txt"), nsamples=4, seqlen=512)
    with pytest.raises(UsageError, match="nsamples >= 1"):
        calibration_windows(tokenizer, str(tmp_path / "short.txt"), nsamples=0, seqlen=8)


@pytest.mark.parametrize("static_groups", [True, False])
def test_desc_act_describes_the_stored_layout(tmp_path, static_groups):
    """Act-order with static groups stores g_idx = i // group_size: no reordering, so the standard
    field says desc_act false (vLLM refuses desc_act true) and llmshrink records the act-order."""
    _save_tiny(tmp_path / "src")
    config = GPTQConfig(bits=4, group_size=16, desc_act=True, static_groups=static_groups)
    out = quantize_checkpoint(tmp_path / "src", config, _calib(), tmp_path / "q", progress=False)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    index = TensorIndex(out)
    g_idx = [index.get(k) for k in index.keys() if k.endswith(".g_idx")]
    trivial = all(torch.equal(g, torch.arange(len(g), dtype=torch.int32) // 16) for g in g_idx)
    assert trivial == static_groups and qc["desc_act"] is (not trivial)
    assert qc["llmshrink"]["act_order"] is True
    assert json.loads((out / "quantize_config.json").read_text())["desc_act"] is qc["desc_act"]


def test_whole_groups_and_vllm_limits_math():
    from llmshrink.gptq.compat import vllm_limits, whole_group_size

    assert whole_group_size(128, [576, 1536]) == 64 and whole_group_size(128, [4096, 11008]) == 128
    assert whole_group_size(128, [100]) == 128  # nothing >= 32 divides it: partial groups stay
    assert whole_group_size(-1, [100]) == -1 and whole_group_size(96, [576]) == 96
    assert vllm_limits({"a": (4, 64, True, 576)}, desc_act=False) is None
    assert "partial last group" in vllm_limits({"a": (4, 128, True, 576)}, desc_act=False)
    assert "bits=3" in vllm_limits({"a": (3, 64, True, 576)}, desc_act=False)
    assert "asymmetric" in vllm_limits({"a": (8, 64, False, 576)}, desc_act=False)
    assert "desc_act=True" in vllm_limits({"a": (4, 64, True, 576)}, desc_act=True)
    assert vllm_limits({"a": (8, 64, True, 576)}, desc_act=False) is None  # GPUs read 8-bit ...
    assert "CPU kernels read 4-bit" in vllm_limits({"a": (8, 64, True, 576)}, desc_act=False, cpu=True)  # its CPU not


@pytest.mark.parametrize("config, stored_group, servable", [
    (GPTQConfig(bits=4, group_size=64), 32, True),  # 48-wide MLP inputs: halved for whole groups
    (GPTQConfig(bits=4, group_size=64, partial_groups=True), 64, False),
    (GPTQConfig(bits=2, group_size=16), 16, False),
], ids=["halved", "partial-kept", "2-bit"])
def test_group_size_and_the_vllm_verdict_are_stored(tmp_path, caplog, config, stored_group, servable):
    from llmshrink.hub import model_card

    _save_tiny(tmp_path / "src", intermediate_size=96)  # hidden 32, MLP inputs 96: 64 leaves partial groups
    with caplog.at_level("INFO"):
        out = quantize_checkpoint(tmp_path / "src", config, _calib(), tmp_path / "q", progress=False)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["group_size"] == stored_group and qc["llmshrink"]["group_size_requested"] == config.group_size
    assert qc["llmshrink"]["vllm_servable"] is servable
    warned = [r.getMessage() for r in caplog.records if "vLLM will not serve" in r.getMessage()]
    assert bool(warned) is (not servable) and (servable or qc["llmshrink"]["vllm_limit"] in warned[0])
    assert ("vllm serve" in model_card(out, "org/q")) is servable
    n = QuantLinear  # the loader reads every layout, partial groups included
    model = load_quantized(out)
    assert {m.group_size for m in model.modules() if isinstance(m, n)} == {stored_group}
