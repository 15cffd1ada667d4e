import pytest
import torch

from llmshrink.gptq.packing import dequantize_gptq, pack_gptq, pack_rows, unpack_gptq, unpack_rows


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_packing_is_exactly_reversible(bits):
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 2**bits, (64, 5), generator=g)
    words = pack_rows(codes, bits)
    assert words.dtype == torch.int32 and words.shape == (64 * bits // 32, 5)
    assert torch.equal(unpack_rows(words, bits), codes.to(torch.int32))


def test_4bit_layout_matches_the_published_format():
    # Code k of a column sits at bits 4k..4k+3 of its word, lowest first.
    codes = torch.arange(8).view(8, 1)
    assert pack_rows(codes, 4).item() == 0x76543210
    # Symmetric 4-bit zero points (8) are stored minus one: the familiar 0x77777777.
    packed = pack_gptq(torch.zeros(3, 8, dtype=torch.int32), torch.full((1, 8), 8), torch.ones(1, 8),
                       torch.zeros(8, dtype=torch.int32), 4)
    assert packed["qzeros"].shape == (1, 1) and packed["qzeros"].item() == 0x77777777


def test_3bit_codes_straddle_words_as_in_the_published_format():
    codes = torch.zeros(32, 1, dtype=torch.int64)
    codes[10] = 0b111  # bits 30..32: two bits in word 0, one in word 1
    words = pack_rows(codes, 3).to(torch.int64) & 0xFFFFFFFF
    assert words[0].item() == 0b11 << 30 and words[1].item() == 1 and words[2].item() == 0


def test_dequantize_follows_g_idx():
    out_f, in_f, bits = 8, 32, 4  # qzeros packs along out: 8 four-bit zeros fill one word
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (out_f, in_f), generator=g)
    zeros = torch.randint(1, 16, (2, out_f), generator=g)
    scales = torch.rand(2, out_f, generator=g) + 0.1
    g_idx = torch.arange(in_f) % 2  # act-order style: groups interleaved
    packed = pack_gptq(codes, zeros, scales, g_idx, bits)
    back_codes, back_zeros = unpack_gptq(packed["qweight"], packed["qzeros"], bits)
    assert torch.equal(back_codes, codes.to(torch.int32)) and torch.equal(back_zeros, zeros.to(torch.int32))
    scales16 = scales.half().float()  # the checkpoint stores fp16 scales
    want = torch.stack([(codes[:, i] - zeros[g_idx[i]]) * scales16[g_idx[i]] for i in range(in_f)], 1)
    torch.testing.assert_close(dequantize_gptq(**packed, bits=bits), want.float())


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="bits=9"):
        pack_rows(torch.zeros(32, 1, dtype=torch.int64), 9)
    codes = torch.arange(32, dtype=torch.int64)[:, None] % 32  # 5 bits: the stream packs it as it packs 3
    assert torch.equal(unpack_rows(pack_rows(codes, 5), 5).long(), codes)
    with pytest.raises(ValueError, match=r"\[1, 15\]"):
        pack_gptq(torch.zeros(1, 8), torch.zeros(1, 1), torch.ones(1, 1), torch.zeros(8), 4)


@pytest.mark.parametrize("bits,group_size,bias", [(4, 32, True), (3, 64, False), (2, -1, True), (8, 48, False)])
def test_quant_linear_computes_with_the_packed_weight(bits, group_size, bias):
    from llmshrink.gptq.algorithm import rtn_quantize
    from llmshrink.gptq.linear import QuantLinear

    g = torch.Generator().manual_seed(bits)
    W = torch.randn(64, 96, generator=g)
    b = torch.randn(64, generator=g) if bias else None
    r = rtn_quantize(W, bits, group_size, sym=False)
    module = QuantLinear.from_packed(pack_gptq(r.codes, r.zeros, r.scales, r.g_idx, bits), bits, group_size,
                                     bias=b, dtype=torch.float32)
    x = torch.randn(5, 96, generator=g)
    want = x @ dequantize_gptq(module.qweight, module.qzeros, module.scales, module.g_idx, bits).t()
    if bias:
        want = want + b
    torch.testing.assert_close(module(x), want)
    assert set(module.state_dict()) == {"qweight", "qzeros", "scales", "g_idx"} | ({"bias"} if bias else set())
    # Only fp16 rounding of the scales separates the module from the quantizer's own result.
    torch.testing.assert_close(module.dequantized_weight(), r.dequantized, rtol=2e-3, atol=2e-3)
