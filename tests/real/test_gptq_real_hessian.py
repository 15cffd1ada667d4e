"""GPTQ math on a real layer of the packaged model with a real Hessian from real text."""

import pytest
import torch

from llmshrink.evals import load_corpus
from llmshrink.gptq.algorithm import accumulate_hessian, gptq_quantize, rtn_quantize

pytestmark = pytest.mark.real


@pytest.fixture(scope="module")
def layer_inputs(real_model):
    model, tokenizer, _ = real_model
    ids = torch.tensor(tokenizer(load_corpus("lambada", limit=40)).input_ids[:2048])[None]
    captured = {}
    target = model.model.layers[5]
    hooks = [target.self_attn.q_proj.register_forward_pre_hook(lambda m, a: captured.__setitem__("q", a[0][0])),
             target.mlp.down_proj.register_forward_pre_hook(lambda m, a: captured.__setitem__("down", a[0][0]))]
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    return {"q": (target.self_attn.q_proj.weight.detach(), captured["q"]),
            "down": (target.mlp.down_proj.weight.detach(), captured["down"])}


def _err(W, Q, X):
    return ((X @ (W - Q).t()) ** 2).mean().item()


@pytest.mark.parametrize("which", ["q", "down"])
@pytest.mark.parametrize("bits", [4, 3])
def test_gptq_beats_rtn_with_a_real_hessian(layer_inputs, which, bits):
    W, X = layer_inputs[which]
    H, _ = accumulate_hessian(None, 0, X)
    rtn = rtn_quantize(W, bits, 128)
    plain = gptq_quantize(W, H, bits, 128, shrink_grid=(1.0,))
    searched = gptq_quantize(W, H, bits, 128)
    e_rtn, e_plain, e_search = (_err(W, r.dequantized, X) for r in (rtn, plain, searched))
    assert e_plain < e_rtn
    assert e_search < e_plain
