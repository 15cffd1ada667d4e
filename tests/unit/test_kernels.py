"""Every kernel against the reference dequantize-matmul: bits x group size x act-order x dtype x rows.

Triton kernels run here on the CPU through TRITON_INTERPRET=1 (set by conftest), and on CUDA in
the GPU-marked copies of the same tests, which skip cleanly without a GPU.
"""

import pytest
import torch

from llmshrink.gptq.linear import QuantLinear
from llmshrink.gptq.packing import pack_gptq
from llmshrink.kernels import KERNELS, prepare_kernels, select_kernel, sorted_groups
from llmshrink.kernels.cpu import TiledDequantKernel
from llmshrink.kernels.triton_gptq import CONFIGS

CUDA = torch.cuda.is_available()
TOL = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}  # relative to max |y|


def make_layer(k, n, bits, group_size, act_order=False, sym=True, bias=True, seed=0, g_idx=None):
    g = torch.Generator().manual_seed(seed)
    size = k if group_size == -1 else group_size
    groups = -(-k // size)
    codes = torch.randint(0, 2**bits, (n, k), generator=g)
    zeros = torch.full((groups, n), 2 ** (bits - 1)) if sym else torch.randint(1, 2**bits, (groups, n), generator=g)
    scales = torch.rand(groups, n, generator=g) * 0.02 + 0.002
    if g_idx is None:
        g_idx = torch.arange(k) // size
        if act_order:  # what GPTQ act-order without static groups writes: groups in a permuted order
            g_idx = g_idx[torch.randperm(k, generator=g)]
    b = torch.randn(n, generator=g) if bias else None
    return QuantLinear.from_packed(pack_gptq(codes, zeros, scales, g_idx, bits), bits, group_size, bias=b,
                                   dtype=torch.float32)


def check(kernel_name, layer, rows, dtype, device="cpu"):
    x = torch.randn(rows, layer.in_features, generator=torch.Generator().manual_seed(rows))
    want = KERNELS["reference"](layer, torch.device("cpu"), torch.float32)(x.to(dtype).float())
    kernel = select_kernel(layer.to(device), device, dtype, override=kernel_name)
    got = kernel(x.to(device=device, dtype=dtype))
    assert got.dtype == dtype and got.shape == want.shape
    err = (got.float().cpu() - want).abs().max() / want.abs().max()
    assert err < TOL[dtype], f"{kernel_name}: relative error {err:.2e}"


# (in_features, out_features, bits, group_size): partial last groups (96 = 1.5 x 64, 576 = 4.5 x 128),
# per-channel groups, and 3-bit codes that straddle int32 words.
# Groups of 64/128 hold whole BLOCK_K = 64 tiles (one scale row per tile), 32 and 96 do not (a scale per row).
LAYOUTS = [(64, 64, 4, 32), (96, 96, 3, 64), (96, 32, 2, -1), (64, 64, 8, 32), (128, 64, 4, 64), (96, 64, 8, -1),
           (320, 64, 4, 128)]
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="needs CUDA")])]


@pytest.mark.parametrize("rows", [1, 20])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("act_order,sym", [(False, True), (True, False)])
@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("device", DEVICES)
def test_triton_matches_reference(layout, act_order, sym, dtype, rows, device):
    check("triton", make_layer(*layout, act_order=act_order, sym=sym), rows, dtype, device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("config", [(kind, i) for kind in CONFIGS for i in range(len(CONFIGS[kind]))],
                         ids=lambda c: f"{c[0]}{c[1]}")
@pytest.mark.parametrize("device", DEVICES)
def test_triton_every_block_config(config, dtype, device):
    """Each block shape the autotuner may pick (split-K 4 to 16; BLOCK_K 32 to 128 against groups
    of 64, 96 and 128, i.e. both the one-scale-row-per-tile and the scale-per-row paths; packed
    words loaded per row or once, for 2/4/8 bits), not just the one it picks (the interpreter and
    the tests above only ever run the first)."""
    kind, i = config
    for layout, act_order in (((320, 64, 4, 128), True), ((192, 96, 3, 64), False), ((256, 32, 2, 64), True),
                              ((96, 32, 8, -1), False)):
        layer = make_layer(*layout, act_order=act_order, sym=False)
        x = torch.randn(3, layout[0], generator=torch.Generator().manual_seed(i)).to(dtype)
        want = KERNELS["reference"](layer, torch.device("cpu"), torch.float32)(x.float())
        kernel = select_kernel(layer.to(device), device, dtype, override="triton")
        got = kernel.forward(x.to(device), config=CONFIGS[kind][i]).float().cpu()
        assert (got - want).abs().max() / want.abs().max() < TOL[dtype], f"{kind} {CONFIGS[kind][i]} on {layout}"


@pytest.mark.parametrize("rows", [1, 20])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("device", DEVICES)
def test_triton_hand_made_groups(rows, dtype, device):
    """A g_idx whose groups are not all group_size channels: the kernel reads it row by row."""
    g_idx = torch.randint(0, 3, (192,), generator=torch.Generator().manual_seed(5))
    layer = make_layer(192, 64, 4, 64, sym=False, g_idx=g_idx)
    assert sorted_groups(layer.g_idx, 64) is None
    check("triton", layer, rows, dtype, device)


CPU_LAYOUTS = [(576, 192, 4, 128), (576, 1536, 3, 128), (1536, 576, 2, 64), (576, 576, 4, -1), (256, 64, 4, 32),
               (576, 576, 8, 128), (576, 576, 8, -1), (96, 64, 4, 16), (96, 40, 4, 32), (64, 32, 4, 128)]


@pytest.mark.parametrize("rows", [1, 7, 33])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("act_order,sym", [(False, True), (True, False)])
@pytest.mark.parametrize("layout", CPU_LAYOUTS, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("name", ["torch-int4", "torch-int8", "torch-dequant"])
def test_cpu_kernels_match_reference(name, layout, act_order, sym, dtype, rows):
    layer = make_layer(*layout, act_order=act_order, sym=sym)
    reason = KERNELS[name].supports(layer, torch.device("cpu"), dtype)
    fast_only = name in ("torch-int4", "torch-int8") and dtype != torch.bfloat16  # torch's slow paths
    expected_unsupported = fast_only or \
        (name == "torch-int4" and (layout[2] > 4 or layout[3] == 16 or layout[1] % 16 != 0)) or \
        (name == "torch-int8" and layout[2] != 8)
    assert (reason is not None) == expected_unsupported, reason
    if reason is None:
        check(name, layer, rows, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("groups", ["in order", "act-order", "hand-made"])
@pytest.mark.parametrize("layout", [(576, 224, 3, 128), (320, 112, 2, 64), (96, 56, 8, -1), (96, 40, 4, 32),
                                    (64, 48, 8, 128)],
                         ids=lambda s: "x".join(map(str, s)))
def test_dequant_tiles_match_reference(monkeypatch, layout, groups, dtype):
    """torch-dequant over many output tiles (the last one partial) for every way groups can lie."""
    k, n, bits, group_size = layout
    monkeypatch.setattr(TiledDequantKernel, "TILE_ELEMENTS", k * 24)  # tiles of 24 output features
    g_idx, count = None, -(-k // (k if group_size == -1 else group_size))
    if groups == "hand-made":  # groups of unequal sizes: a scale gather per input channel
        g_idx = torch.randint(0, count, (k,), generator=torch.Generator().manual_seed(3))
    layer = make_layer(k, n, bits, group_size, act_order=groups == "act-order", sym=False, g_idx=g_idx)
    assert (sorted_groups(layer.g_idx, group_size) is None) == (groups == "hand-made" and count > 1)
    kernel = select_kernel(layer, "cpu", dtype, override="torch-dequant")
    assert kernel.tile == 24 < n
    for rows in (1, 5):
        check("torch-dequant", layer, rows, dtype)


@pytest.mark.parametrize("layout", [(576, 192, 4, 128), (1536, 64, 2, 64), (576, 96, 8, 128), (576, 96, 8, -1)],
                         ids=lambda s: "x".join(map(str, s)))
def test_weight_only_kernels_dequantize_for_many_rows(layout):
    """From `dense_rows` rows on (counted over every leading dim), torch-int4/int8 hand the call to
    their dequantize-then-matmul path; both paths give the reference's result."""
    layer = make_layer(*layout, act_order=True, sym=False)
    kernel = select_kernel(layer, "cpu", torch.bfloat16)
    assert kernel.name == ("torch-int8" if layout[2] == 8 else "torch-int4") and kernel.dense_rows > 1
    seen = []
    dense_forward = kernel.dense.forward
    kernel.dense.forward = lambda x: seen.append(x.shape[:-1]) or dense_forward(x)
    x = torch.randn(kernel.dense_rows + 2, layer.in_features, generator=torch.Generator().manual_seed(0))
    want = KERNELS["reference"](layer, torch.device("cpu"), torch.float32)(x.bfloat16().float())
    for rows in (kernel.dense_rows - 1, kernel.dense_rows + 2):
        got = kernel(x[:rows].bfloat16().reshape(1, rows, -1)).reshape(rows, -1).float()
        assert ((got - want[:rows]).abs().max() / want[:rows].abs().max()) < TOL[torch.bfloat16]
    assert seen == [(1, kernel.dense_rows + 2)]


def test_selection_order_override_and_rebuild(monkeypatch):
    layer = make_layer(576, 192, 4, 128, act_order=True)
    assert select_kernel(layer, "cpu", torch.bfloat16).name == "torch-int4"
    assert select_kernel(make_layer(576, 192, 8, 128), "cpu", torch.bfloat16).name == "torch-int8"
    assert select_kernel(make_layer(96, 64, 4, 16), "cpu", torch.bfloat16).name == "torch-dequant"
    assert select_kernel(layer, "cpu", torch.float32).name == "torch-dequant"
    assert select_kernel(make_layer(96, 64, 4, 16), "cpu", torch.float64).name == "reference"
    assert "triton" not in {select_kernel(layer, "cpu", d).name for d in TOL}  # never picked on a CPU unasked
    monkeypatch.setenv("LLMSHRINK_KERNEL", "torch-dequant")
    assert select_kernel(layer, "cpu", torch.float32).name == "torch-dequant"
    monkeypatch.setenv("LLMSHRINK_KERNEL", "torch-int8")
    with pytest.raises(ValueError, match="kernel 'torch-int8' cannot compute .* 8-bit codes only; unset LLMSHRINK_KERNEL"):
        select_kernel(layer, "cpu", torch.bfloat16)
    monkeypatch.setenv("LLMSHRINK_KERNEL", "marlin")
    with pytest.raises(ValueError, match="not a kernel; use one of"):
        select_kernel(layer, "cpu", torch.float32)
    monkeypatch.delenv("LLMSHRINK_KERNEL")

    model = torch.nn.Sequential(layer)
    assert prepare_kernels(model, dtype=torch.bfloat16) == {"torch-int4": 1}
    assert prepare_kernels(model) == {"torch-dequant": 1}  # the module's own dtype, float32
    y = model(torch.randn(2, 576))
    other = make_layer(576, 192, 4, 128, act_order=True, seed=1)
    layer.load_state_dict(other.state_dict())  # new buffers: the kernel is rebuilt from them
    assert layer.kernel is None
    torch.testing.assert_close(layer(torch.ones(1, 576)), other(torch.ones(1, 576)))
    assert y.shape == (2, 192) and model(torch.zeros(0, 576)).shape == (0, 192)


def test_loader_warns_when_no_fast_kernel_serves(caplog):
    model = torch.nn.Sequential(make_layer(576, 192, 4, 128), make_layer(96, 64, 4, 16))
    with caplog.at_level("WARNING", logger="llmshrink.kernels"):
        assert prepare_kernels(model, dtype=torch.bfloat16) == {"torch-int4": 1, "torch-dequant": 1}
    assert "1 quantized linears run on a slow dequantize path (first: 1;" in caplog.text
    assert "torch-int4: the group size must be a multiple of 32" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="llmshrink.kernels"):
        prepare_kernels(model)  # float32: torch's int4 matmul is slow there
    assert "2 quantized linears run on a slow dequantize path" in caplog.text and "load in bfloat16" in caplog.text


def test_sorted_groups():
    assert sorted_groups(torch.arange(10) // 4, 4) == (None, 4)
    perm, size = sorted_groups(torch.tensor([1, 0, 1, 0]), 2)
    assert perm.tolist() == [1, 3, 0, 2] and size == 2
    assert sorted_groups(torch.tensor([0, 0, 0, 1]), 2) is None  # groups of unequal size


def test_kernels_folder_imports_as_a_top_level_package():
    """bitsandbytes probes `from kernels import get_kernel` (the Hub `kernels` package) and finds this
    repo's `kernels/` when run from its root: importing it there must not fail (only the probe may)."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-c", "import kernels, kernels.cpu, kernels.triton_gptq, kernels.onebit"],
                          cwd=root, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
