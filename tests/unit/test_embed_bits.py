"""GPTQConfig.embed_bits: the input embedding quantized into GPTQ tensors, on tiny random Llamas.

Each checkpoint is checked against a reference built from its own stored tensors: a dense copy of
the source model whose every quantized weight (the embedding's table, and a tied head's, included)
is `dequantize_gptq` of what the checkpoint holds."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM

import llmshrink
from llmshrink import UsageError
from llmshrink.gptq.compat import vllm_limits
from llmshrink.gptq.config import GPTQConfig
from llmshrink.gptq.embedding import check_embedding, quantize_table
from llmshrink.gptq.linear import PACKED, QuantEmbedding, QuantLinear
from llmshrink.gptq.load import load_quantized
from llmshrink.gptq.packing import dequantize_gptq, pack_gptq
from llmshrink.gptq.quantize import quantize_checkpoint
from llmshrink.safetensors_io import TensorIndex

SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=96)
EMBED = "model.embed_tokens"


def _save_tiny(folder, tied: bool, seed: int = 0, **extra):
    torch.manual_seed(seed)
    config = AutoConfig.for_model("llama", **{**SMALL, "tie_word_embeddings": tied, **extra})
    model = AutoModelForCausalLM.from_config(config).eval()
    model.save_pretrained(folder)
    return model


def _calib(n=12, seq=48):
    return torch.randint(1, 96, (n, seq), generator=torch.Generator().manual_seed(1))


def _quantize(tmp_path, tied: bool, embed_bits: int, **config):
    original = _save_tiny(tmp_path / "src", tied)
    out = quantize_checkpoint(tmp_path / "src", GPTQConfig(bits=4, group_size=16, embed_bits=embed_bits, **config),
                              _calib(), tmp_path / "q", progress=False)
    return original, out


def _stored(out, name: str) -> torch.Tensor:
    """The [out, in] float32 weight the checkpoint stores for module `name`, decoded."""
    index = TensorIndex(out)
    t = {k: index.get(f"{name}.{k}") for k in PACKED}
    return dequantize_gptq(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], t["qweight"].shape[0] * 32 // t["g_idx"].numel())


def _reference(original, out):
    """The source model with every weight the checkpoint stores, quantized ones decoded (fp32)."""
    index = TensorIndex(out)
    reference = AutoModelForCausalLM.from_config(original.config).eval()  # tie as the source is
    with torch.no_grad():
        for name, p in reference.named_parameters():
            module = name.rsplit(".", 1)[0]
            if name in index:
                p.copy_(index.get(name).float())
            elif f"{module}.qweight" in index:
                p.copy_(_stored(out, module))
    return reference


def _env():
    """A child process's environment: llmshrink serves transformers' "gptq" even where gptqmodel is installed."""
    return {**os.environ, "LLMSHRINK_HF_GPTQ": "llmshrink", "OMP_NUM_THREADS": "1"}


def _logits(model, x):
    with torch.no_grad():
        return model(x).logits


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("embed_bits", [8, 6, 4])  # 6: a width only the bit stream has
def test_quantized_embedding_computes_with_the_stored_tensors(tmp_path, tied, embed_bits):
    original, out = _quantize(tmp_path, tied, embed_bits)
    index = TensorIndex(out)
    assert f"{EMBED}.weight" not in index  # no fp16 copy of the table
    assert index.shape(f"{EMBED}.qweight") == (32 * embed_bits // 32, 96)  # [hidden * bits / 32, vocab]
    assert index.shape(f"{EMBED}.scales") == (2, 96) and index.shape(f"{EMBED}.qzeros") == (2, 96 * embed_bits // 32)
    head_keys = [k for k in index.keys() if k.startswith("lm_head.")]
    assert head_keys == ([] if tied else ["lm_head.weight"])  # a tied head has no tensors of its own
    config = json.loads((out / "config.json").read_text())
    record = config["quantization_config"]["llmshrink"]["modules"][EMBED]
    assert (record["bits"], record["group_size"], record["tied_head"]) == (embed_bits, 16, "lm_head" if tied else None)
    assert record["solved"] == ("gptq with the head's input Hessian" if tied else "rtn, unweighted")
    assert config["tie_word_embeddings"] is False  # the sharing is llmshrink's: no .weight is left to tie
    table, source = _stored(out, EMBED), original.model.embed_tokens.weight.detach()
    error = float((table - source).norm() / source.norm())
    assert error == pytest.approx(record["rel_error"], abs=2e-3)  # vs the fp32 source; recorded vs its fp16 rounding
    assert error < {8: 0.01, 6: 0.04, 4: 0.15}[embed_bits]

    loaded = load_quantized(out)
    assert isinstance(loaded.model.embed_tokens, QuantEmbedding) and loaded.model.embed_tokens.bits == embed_bits
    assert isinstance(loaded.lm_head, QuantLinear) if tied else type(loaded.lm_head) is torch.nn.Linear
    x = _calib(2, 20)
    want = _logits(_reference(original, out), x)
    torch.testing.assert_close(_logits(loaded, x), want, rtol=1e-5, atol=1e-5)
    assert (_logits(loaded, x) - _logits(original, x)).abs().max() < 0.5 * _logits(original, x).abs().max()

    # plain transformers after `import llmshrink`, in a fresh process
    code = textwrap.dedent(f"""
        import torch, transformers, llmshrink
        from safetensors.torch import save_file
        from llmshrink.gptq.linear import QuantEmbedding, QuantLinear
        model = transformers.AutoModelForCausalLM.from_pretrained({str(out)!r}, dtype=torch.float32)
        embed, head = model.model.embed_tokens, model.lm_head
        assert isinstance(embed, QuantEmbedding), type(embed)
        shared = isinstance(head, QuantLinear) and all(getattr(head, n) is getattr(embed, n) for n in
                                                      ("qweight", "qzeros", "scales", "g_idx"))
        assert shared is {tied}, head
        x = torch.tensor({x.tolist()})
        with torch.no_grad():
            save_file({{"logits": model(x).logits}}, {str(tmp_path / "hf.safetensors")!r})
    """)
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env())
    assert run.returncode == 0, run.stderr[-2000:]
    torch.testing.assert_close(load_file(tmp_path / "hf.safetensors")["logits"], want, rtol=1e-5, atol=1e-5)


def test_a_tied_head_shares_the_embedding_tensors_through_tie_weights_and_moves(tmp_path):
    _, out = _quantize(tmp_path, tied=True, embed_bits=4)
    model = llmshrink.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    embed, head = model.model.embed_tokens, model.lm_head

    def shared():
        return all(getattr(head, n) is getattr(embed, n) for n in PACKED)

    assert shared() and head.tied is embed and head.bits == 4
    assert not [k for k in model.state_dict() if k.startswith("lm_head.")]  # stored once, under the embedding
    x = _calib(2, 12)
    before = _logits(model, x)
    model.tie_weights()
    assert shared()
    torch.testing.assert_close(_logits(model, x), before, rtol=0, atol=0)
    model.to(torch.bfloat16)  # converts the fp16 scales: the head takes the embedding's converted tensors
    assert shared() and embed.scales.dtype == torch.bfloat16 and embed.compute_dtype == torch.bfloat16
    assert _logits(model, x).dtype == torch.bfloat16
    model.float()
    assert shared() and embed(x).dtype == torch.float32
    assert model.generate(x[:1, :5], max_new_tokens=3, do_sample=False).shape == (1, 8)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_quant_embedding_decodes_only_the_rows_it_is_given(monkeypatch, bits):
    """Any g_idx and asymmetric zeros (3-bit codes straddle words), without decoding the whole table."""
    from llmshrink.gptq import linear

    torch.manual_seed(bits)
    table = torch.randn(64, 96)  # [vocab, hidden]
    result = quantize_table(table, None, GPTQConfig(bits=4, group_size=32, sym=False, embed_bits=bits))
    g_idx = result.g_idx[torch.randperm(96)]  # a reordering g_idx: each channel in some group
    packed = pack_gptq(result.codes, result.zeros, result.scales, g_idx, bits)
    embed = QuantEmbedding(64, 96, bits, 32, dtype=torch.float32)
    for k, v in packed.items():
        getattr(embed, k).copy_(v)
    want = dequantize_gptq(packed["qweight"], packed["qzeros"], packed["scales"], packed["g_idx"], bits)  # [vocab, hidden]
    monkeypatch.setattr(linear, "dequantize_gptq", lambda *a: pytest.fail("the forward decoded the whole table"))
    ids = torch.tensor([[0, 63, 5, 5], [17, 31, 32, 1]])
    got = embed(ids)
    assert got.shape == (2, 4, 96) and got.dtype == torch.float32
    torch.testing.assert_close(got, want[ids], rtol=0, atol=0)
    embed.compute_dtype = torch.bfloat16
    torch.testing.assert_close(embed(ids), want[ids].bfloat16(), rtol=0, atol=0)


def test_lm_head_on_keeps_its_own_tensors_beside_the_embedding(tmp_path):
    original, out = _quantize(tmp_path, tied=True, embed_bits=8, lm_head=True)
    index = TensorIndex(out)
    assert {"lm_head.qweight", f"{EMBED}.qweight"} <= set(index.keys())
    assert "lm_head.weight" not in index and f"{EMBED}.weight" not in index
    modules = json.loads((out / "config.json").read_text())["quantization_config"]["llmshrink"]["modules"]
    assert modules["lm_head"]["bits"] == 4 and modules[EMBED]["bits"] == 8 and modules[EMBED]["tied_head"] is None
    loaded = load_quantized(out)
    head, embed = loaded.lm_head, loaded.model.embed_tokens
    assert isinstance(head, QuantLinear) and head.tied is None and head.bits == 4 and embed.bits == 8
    assert head.qweight.data_ptr() != embed.qweight.data_ptr()
    reference = _reference(original, out)  # untie: each decodes its own tensors
    with torch.no_grad():
        reference.lm_head.weight = torch.nn.Parameter(_stored(out, "lm_head"))
    x = _calib(2, 20)
    torch.testing.assert_close(_logits(loaded, x), _logits(reference, x), rtol=1e-5, atol=1e-5)


def test_bad_embed_bits_input_is_refused_before_work(tmp_path):
    with pytest.raises(UsageError, match=r"^embed_bits=9 is not supported; use one of 2, 3, 4, 5, 6, 7, 8"):
        GPTQConfig(embed_bits=9)
    _save_tiny(tmp_path / "odd", tied=True, vocab_size=100)  # 100 x 4 bits does not fill int32 words
    with pytest.raises(UsageError, match=r"^model.embed_tokens \(100x32\) cannot be packed at 4 bits .*; use embed_bits 8$"):
        quantize_checkpoint(tmp_path / "odd", GPTQConfig(group_size=16, embed_bits=4), _calib(), tmp_path / "q")
    assert not (tmp_path / "q").exists() and not (tmp_path / "q.partial").exists()


def test_a_model_without_a_plain_embedding_is_refused_before_work(tmp_path):
    from transformers.models.gemma3.modeling_gemma3 import Gemma3TextScaledWordEmbedding

    torch.manual_seed(0)
    config = AutoConfig.for_model("gemma3_text", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, head_dim=8, vocab_size=96)
    model = AutoModelForCausalLM.from_config(config)
    assert isinstance(model.get_input_embeddings(), Gemma3TextScaledWordEmbedding)  # scales in its own forward
    with pytest.raises(UsageError, match=r"^the model's input embedding is a Gemma3TextScaledWordEmbedding, not a "
                                         r"plain nn.Embedding, so embed_bits cannot quantize it; leave embed_bits off$"):
        check_embedding(model, GPTQConfig(embed_bits=4))
    check_embedding(model, GPTQConfig())  # nothing asked, nothing refused
    model.save_pretrained(tmp_path / "gemma")
    with pytest.raises(UsageError, match="not a plain nn.Embedding"):
        quantize_checkpoint(tmp_path / "gemma", GPTQConfig(group_size=16, embed_bits=4), _calib(), tmp_path / "q")
    assert not (tmp_path / "q").exists() and not (tmp_path / "q.partial").exists()


def test_readers_are_named_in_the_vllm_verdict_and_the_card(tmp_path):
    from llmshrink.hub import model_card

    assert vllm_limits({"a": (4, 64, True, 576)}, desc_act=False) is None
    why = vllm_limits({"a": (4, 64, True, 576)}, desc_act=False, embed_bits=4)
    assert why.startswith("embed_bits=4 quantizes the input embedding, which vLLM (and GPTQModel) cannot read")
    _, out = _quantize(tmp_path, tied=True, embed_bits=4)
    record = json.loads((out / "config.json").read_text())["quantization_config"]["llmshrink"]
    assert record["vllm_servable"] is False and record["vllm_cpu_servable"] is False and record["vllm_limit"] == why
    card = model_card(out, "org/q")
    assert "vllm serve" not in card and "input embedding `model.embed_tokens` is quantized too (4-bit, group size 16" in card
    assert "the output head `lm_head` shares it" in card
    assert "llmshrink (`llmshrink.AutoModelForCausalLM.from_pretrained`) and transformers after `import llmshrink`" in card
    assert "GPTQModel and vLLM do not read a quantized input embedding" in card


def test_cli_flag_and_recipe_step_set_embed_bits(tmp_path, capsys):
    from conftest import save_tiny
    from llmshrink.cli import main
    from llmshrink.evals.data import corpus_documents
    from llmshrink.pipeline import load_recipe, run_recipe

    model = save_tiny(tmp_path / "tiny", layers=2, seed=3, extra="ÀÁÂÃÄÅÆ")  # untied, hidden 64, vocab 97 + 7
    assert main(["quantize", "--model", str(model), "--out", str(tmp_path / "bad"), "--embed-bits", "9"]) == 2
    assert "embed_bits=9 is not supported" in capsys.readouterr().err
    calib = tmp_path / "calib.txt"
    calib.write_text("\n\n".join(corpus_documents("wiki")[-40:]))
    (tmp_path / "r.yaml").write_text(
        f"model: {model}\nseed: 0\ncalibration: {{source: {calib}, nsamples: 4, seqlen: 32}}\n"
        "steps:\n  - {method: gptq, bits: 4, group_size: 32, embed_bits: 4}\n"
        f"evaluate: {{tasks: [wiki], limit: 2, seqlen: 32, gen_tokens: 2}}\nout: {tmp_path / 'run'}\n")
    recipe = load_recipe(tmp_path / "r.yaml")
    assert recipe.steps[0].embed_bits == 4
    run_recipe(recipe, progress=False)
    final = tmp_path / "run" / "model"
    assert TensorIndex(final).shape(f"{EMBED}.qweight") == (64 * 4 // 32, 104)
    assert isinstance(llmshrink.AutoModelForCausalLM.from_pretrained(final).model.embed_tokens, QuantEmbedding)
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    ppl = {k: v["results"]["wiki"]["ppl"] for k, v in report["evals"].items()}
    assert len(ppl) == 2 and all(p > 1 for p in ppl.values())
