import pytest
import torch

from llmshrink.gptq.algorithm import accumulate_hessian, gptq_quantize, rtn_quantize
from llmshrink.gptq.packing import dequantize_gptq, pack_gptq


def _layer(seed=0, out_f=48, in_f=256, tokens=2048):
    """A weight and correlated, unevenly scaled inputs (as real activations are)."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out_f, in_f, generator=g) * 0.05
    mix = torch.randn(in_f, in_f, generator=g) / in_f**0.5
    X = (torch.randn(tokens, in_f, generator=g) @ mix) * torch.rand(in_f, generator=g).mul(4).add(0.1)
    return W, X


def _output_error(W, Q, X):
    return ((X @ W.t() - X @ Q.t()) ** 2).sum().item()


def test_hessian_accumulates_as_a_running_average():
    _, X = _layer()
    H, n = None, 0
    for chunk in X.split(300):
        H, n = accumulate_hessian(H, n, chunk)
    assert n == len(X)
    torch.testing.assert_close(H, 2 * X.t() @ X / len(X), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("bits,group_size,desc_act,sym,ratio", [
    (4, 128, False, True, 0.8), (3, 64, True, True, 0.8), (2, 128, False, False, 0.95), (4, -1, True, False, 0.8),
    (8, 128, False, True, 0.8),
])
def test_gptq_beats_rtn_on_the_layer_output(bits, group_size, desc_act, sym, ratio):
    W, X = _layer()
    H, _ = accumulate_hessian(None, 0, X)
    rtn = rtn_quantize(W, bits, group_size, sym=sym)
    gptq = gptq_quantize(W, H, bits, group_size, sym=sym, desc_act=desc_act, shrink_grid=(1.0,))
    assert _output_error(W, gptq.dequantized, X) < ratio * _output_error(W, rtn.dequantized, X)


def test_the_clipping_search_never_hurts_the_weighted_objective():
    W, X = _layer(seed=3)
    H, _ = accumulate_hessian(None, 0, X)
    plain = gptq_quantize(W, H, 3, 64, shrink_grid=(1.0,))
    searched = gptq_quantize(W, H, 3, 64)
    assert _output_error(W, searched.dequantized, X) < _output_error(W, plain.dequantized, X)


@pytest.mark.parametrize("sym,desc_act,static_groups,group_size", [
    (True, False, False, 128), (False, True, False, 64), (True, True, True, 64), (False, False, False, 96),
])
def test_packed_tensors_decode_to_the_quantized_weight(sym, desc_act, static_groups, group_size):
    W, X = _layer(out_f=32, in_f=256)
    H, _ = accumulate_hessian(None, 0, X)
    r = gptq_quantize(W, H, 4, group_size, sym=sym, desc_act=desc_act, static_groups=static_groups)
    n_groups = -(-256 // group_size)  # 96 does not divide 256: the last group is partial
    assert r.scales.shape == (n_groups, 32) and r.g_idx.shape == (256,)
    assert int(r.g_idx.max()) == n_groups - 1
    packed = pack_gptq(r.codes, r.zeros, r.scales, r.g_idx, 4)
    # scales go to fp16 in the checkpoint, so compare against the fp16-rounded grid
    torch.testing.assert_close(dequantize_gptq(**packed, bits=4), r.dequantized, rtol=2e-3, atol=1e-4)


def test_act_order_groups_follow_the_hessian_diagonal():
    W, X = _layer(in_f=128)
    H, _ = accumulate_hessian(None, 0, X)
    r = gptq_quantize(W, H, 4, 32, desc_act=True)
    order = torch.argsort(torch.diag(H), descending=True)
    assert torch.equal(r.g_idx[order], torch.arange(128, dtype=torch.int32) // 32)


def test_dead_inputs_and_determinism():
    W, X = _layer(in_f=128)
    X[:, 5] = 0
    H, _ = accumulate_hessian(None, 0, X)
    a = gptq_quantize(W, H, 4, 32)
    b = gptq_quantize(W, H, 4, 32)
    assert torch.equal(a.codes, b.codes) and torch.equal(a.scales, b.scales)
    assert torch.all(a.dequantized[:, 5] == 0)  # an input that never fires carries no weight


@pytest.mark.parametrize("desc_act,static_groups", [(False, False), (True, True), (True, False)])
def test_stacked_rows_quantize_as_each_weight_alone(desc_act, static_groups):
    """The walker solves linears sharing a Hessian (q/k/v, gate/up) as one stacked weight."""
    W, X = _layer()
    W2 = torch.randn(16, W.shape[1], generator=torch.Generator().manual_seed(5)) * 0.05
    H, _ = accumulate_hessian(None, 0, X)
    kw = dict(bits=4, group_size=64, desc_act=desc_act, static_groups=static_groups)
    both = gptq_quantize(torch.cat([W, W2]), H, **kw)
    for rows, alone in ((slice(0, 48), gptq_quantize(W, H, **kw)), (slice(48, 64), gptq_quantize(W2, H, **kw))):
        assert torch.equal(both.codes[rows], alone.codes)
        assert torch.equal(both.scales[:, rows], alone.scales) and torch.equal(both.zeros[:, rows], alone.zeros)
        assert torch.equal(both.g_idx, alone.g_idx)
        assert both.row_loss[rows].sum().item() == pytest.approx(alone.loss, rel=1e-4)
