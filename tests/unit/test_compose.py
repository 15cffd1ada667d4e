"""Outputs compose: quantize -> pack and delta -> pack load back transparently through
`llmshrink.AutoModelForCausalLM`, with the same logits, and quantized codes compress."""

import pytest
import torch

import llmshrink
from llmshrink import DeltaConfig, GPTQConfig, compress_delta
from llmshrink.pack import pack_folder

from conftest import tiny_llama

IDS = torch.randint(0, 96, (2, 10), generator=torch.Generator().manual_seed(0))


@pytest.fixture()
def isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMSHRINK_CACHE", str(tmp_path / "cache"))  # materialize() decodes in here


def _logits(model):
    with torch.no_grad():
        return model(IDS).logits


def test_quantized_then_packed_loads_with_identical_logits(tmp_path, isolated_cache):
    model = tiny_llama(vocab_size=96, layers=2)
    model.save_pretrained(tmp_path / "src")
    calib = torch.randint(0, 96, (8, 32), generator=torch.Generator().manual_seed(1))
    q = llmshrink.quantize(str(tmp_path / "src"), GPTQConfig(bits=4, group_size=16), tmp_path / "q",
                           calibration=calib, progress=False)
    summary = pack_folder(q, tmp_path / "qp")
    assert summary.ratio > 1.05  # 4-bit codes in int32 words and fp16 scales still shrink
    want = _logits(llmshrink.AutoModelForCausalLM.from_pretrained(q))
    got = _logits(llmshrink.AutoModelForCausalLM.from_pretrained(tmp_path / "qp"))
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert list((tmp_path / "cache" / "unpacked").iterdir())  # decoded once into the cache


def test_delta_then_packed_loads_with_identical_logits(tmp_path, isolated_cache):
    base, ft = tiny_llama(seed=0), tiny_llama(seed=0)
    with torch.no_grad():
        for p in ft.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    base.save_pretrained(tmp_path / "base")
    ft.save_pretrained(tmp_path / "ft")
    d = compress_delta(tmp_path / "base", tmp_path / "ft", DeltaConfig(min_numel=1000), tmp_path / "d", progress=False)
    pack_folder(d, tmp_path / "dp")
    want = _logits(llmshrink.AutoModelForCausalLM.from_pretrained(d))
    torch.testing.assert_close(_logits(llmshrink.AutoModelForCausalLM.from_pretrained(tmp_path / "dp")), want,
                               rtol=0, atol=0)
