"""The quantized default model computes the same logits with every kernel this machine has."""

import pytest
import torch

from llmshrink import AutoModelForCausalLM, GPTQConfig, quantize
from llmshrink.evals import load_corpus, perplexity_of_ids
from llmshrink.gptq.linear import QuantLinear

pytestmark = pytest.mark.real


@pytest.mark.parametrize("bits,bf16_kernel", [(4, "torch-int4"), (3, "torch-int4"), (8, "torch-int8")])
def test_default_model_logits_agree_across_kernels(tmp_path, monkeypatch, real_model, bits, bf16_kernel):
    _, tokenizer, source = real_model
    # RTN is enough: the kernels see the same packed format either way, and it takes seconds.
    out = quantize(source, GPTQConfig(bits=bits, group_size=128, algorithm="rtn", clip_search=False), tmp_path / "q",
                   progress=False)
    x = tokenizer("The quick brown fox jumps over the lazy dog because it was late for", return_tensors="pt").input_ids

    ids = torch.tensor(tokenizer(load_corpus("wiki", 20)).input_ids)[:2 * 256]

    def run(kernel, dtype):
        monkeypatch.setenv("LLMSHRINK_KERNEL", kernel)
        model = AutoModelForCausalLM.from_pretrained(out, dtype=dtype)
        # every one of the 210 linears (576 wide with a partial last group of 64) is served
        assert {m.kernel.name for m in model.modules() if isinstance(m, QuantLinear)} == {kernel}
        with torch.inference_mode():
            ppl = perplexity_of_ids(model, ids, seqlen=256).ppl
            return model(x).logits.float(), model(x[:, :1]).logits.float(), ppl  # prefill, the 1-row path

    want, want_first, want_ppl = run("reference", torch.float32)
    got, got_first, ppl = run("torch-dequant", torch.float32)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(got_first, want[:, :1], rtol=1e-4, atol=1e-3)
    assert ppl == pytest.approx(want_ppl, rel=1e-4)
    # bf16 activations: bf16 tolerance. torch's int4/int8 matmuls also take their scales in bf16
    # (fp16 scales lose 3 mantissa bits, the same for a whole group), so they may stray up to a
    # few times further from the fp32 logits than dequantize + F.linear in bf16; the perplexity
    # must not move.
    drift = {}
    for kernel in ("reference", bf16_kernel):
        got, got_first, ppl = run(kernel, torch.bfloat16)
        drift[kernel] = [float((a - b).norm() / b.norm()) for a, b in ((got, want), (got_first, want_first))]
        assert ppl == pytest.approx(want_ppl, rel=0.01), kernel
    assert max(drift["reference"]) < 0.1, drift  # bf16 arithmetic through 30 layers
    assert all(k <= 3 * r for k, r in zip(drift[bf16_kernel], drift["reference"])), drift
