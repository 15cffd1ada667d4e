"""The quantized default model computes the same logits with every kernel this machine has."""

import pytest
import torch

from llmshrink import AutoModelForCausalLM, GPTQConfig, quantize
from llmshrink.gptq.linear import QuantLinear
from llmshrink.kernels import KERNELS

pytestmark = pytest.mark.real


@pytest.mark.parametrize("bits,kernels", [(4, ["torch-int4", "torch-dequant"]), (8, ["torch-int8", "torch-dequant"]),
                                          (3, ["torch-int4"])])
def test_default_model_logits_agree_across_kernels(tmp_path, monkeypatch, real_model, bits, kernels):
    _, tokenizer, source = real_model
    # RTN is enough: the kernels see the same packed format either way, and it takes seconds.
    out = quantize(source, GPTQConfig(bits=bits, group_size=128, method="rtn", clip_search=False), tmp_path / "q",
                   progress=False)
    x = tokenizer("The quick brown fox jumps over the lazy dog because it was late for", return_tensors="pt").input_ids
    logits = {}
    for name in ["reference", *kernels]:
        monkeypatch.setenv("LLMSHRINK_KERNEL", name)
        model = AutoModelForCausalLM.from_pretrained(out)
        used = {m.kernel.name for m in model.modules() if isinstance(m, QuantLinear)}
        assert used == {name}  # every one of the 210 linears (576 wide, partial last group) is served
        with torch.inference_mode():
            logits[name] = model(x).logits
            if name != "reference":
                logits[name + " decode"] = model(x[:, :1]).logits  # the 1-row path
                torch.testing.assert_close(logits[name + " decode"], logits["reference"][:, :1], rtol=1e-4, atol=1e-3)
    for name in kernels:
        torch.testing.assert_close(logits[name], logits["reference"], rtol=1e-4, atol=1e-3)
    assert set(kernels) <= set(KERNELS)
