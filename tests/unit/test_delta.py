"""Delta compression: the codecs' math, the 1-bit kernel, the folder format, loading and serving."""

import json
import os

import pytest
import torch

from llmshrink import UsageError
from llmshrink.delta import DeltaConfig, DeltaModel, compress_delta, load_delta_model
from llmshrink.delta import algorithm as A
from llmshrink.delta.codecs import CODECS, KINDS
from llmshrink.delta.load import META_FILE, read_delta, tensors_sha256

from conftest import tiny_llama


# ---- pure math -----------------------------------------------------------------------------------

@pytest.mark.parametrize("n", [1, 31, 32, 33, 70])
def test_bits_pack_and_unpack_exactly(n):
    bits = torch.rand(5, n, generator=torch.Generator().manual_seed(n)) > 0.5
    words = A.pack_bits(bits)
    assert words.dtype == torch.int32 and words.shape == (5, -(-n // 32))
    assert torch.equal(A.unpack_bits(words, n), bits)


def test_bitdelta_scale_is_the_l2_optimal_one():
    d = torch.randn(64, 48, generator=torch.Generator().manual_seed(0))
    parts = A.bitdelta(d)
    assert torch.allclose(parts["scale"], d.abs().mean().reshape(1))
    err = lambda s: (A.signs(parts["sign"], 48) * s - d).norm()  # noqa: E731
    s = parts["scale"]
    assert err(s) < err(s * 1.05) and err(s) < err(s * 0.95)
    assert torch.equal(CODECS["bitdelta"].decode(parts, (64, 48)).sign(), torch.where(d >= 0, 1.0, -1.0))
    rows = A.bitdelta(d, "row")
    assert rows["scale"].shape == (64, 1)
    assert (CODECS["bitdelta"].decode(rows, (64, 48)) - d).norm() < (CODECS["bitdelta"].decode(parts, (64, 48)) - d).norm()


def test_lowrank_rank_and_energy():
    g = torch.Generator().manual_seed(1)
    d = torch.randn(40, 3, generator=g) @ torch.randn(3, 30, generator=g)  # rank 3
    parts = A.lowrank(d, rank=3)
    assert parts["u"].shape == (40, 3) and parts["v"].shape == (3, 30)
    assert torch.allclose(CODECS["lowrank"].decode(parts, (40, 30)), d, atol=2e-2 * d.abs().max())
    assert A.lowrank(d, energy=0.999999)["u"].shape[1] == 3  # the fewest directions holding the energy
    assert A.lowrank(d, energy=1e-6)["u"].shape[1] == 1
    with pytest.raises(UsageError, match="rank=31 is larger"):
        A.lowrank(d, rank=31)


def test_dare_drops_share_p_and_rescales_the_rest():
    d = torch.randn(200, 100, generator=torch.Generator().manual_seed(2))
    parts = A.dare(d, 0.75, torch.Generator().manual_seed(0))
    dense = CODECS["dare"].decode(parts, (200, 100))
    kept = dense != 0
    assert abs(kept.float().mean().item() - 0.25) < 0.01
    assert torch.allclose(dense[kept], (d[kept] / 0.25).half().float())
    assert torch.allclose(CODECS["dare"].decode(A.dare(d, 0.0, torch.Generator()), (200, 100)), d.half().float())


def test_mixed_bands_top_directions_get_more_bits():
    g = torch.Generator().manual_seed(3)
    d = torch.randn(64, 8, generator=g) @ torch.randn(8, 96, generator=g)
    errors = [(CODECS["mixed"].decode(A.mixed(d, ranks, bits), (64, 96), bits) - d).norm() / d.norm()
              for ranks, bits in (((2,), (8,)), ((2, 6), (8, 3)), ((8,), (8,)))]
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 0.02  # every direction kept at 8 bits: only rounding error


@pytest.mark.parametrize("kind", ["bitdelta", "lowrank", "dare", "mixed"])
def test_matmul_and_rows_from_the_compact_form_match_the_dense_delta(kind):
    g = torch.Generator().manual_seed(4)
    d = torch.randn(50, 70, generator=g)
    parts = {"bitdelta": lambda: A.bitdelta(d, "row"), "lowrank": lambda: A.lowrank(d, rank=10),
             "dare": lambda: A.dare(d, 0.5, g), "mixed": lambda: A.mixed(d, (2, 8), (8, 3))}[kind]()
    codec = CODECS[kind]
    dense = codec.decode(parts, (50, 70), (8, 3))
    x = torch.randn(3, 4, 70, generator=g)
    torch.testing.assert_close(codec.matmul(x, parts, (50, 70), (8, 3)), x @ dense.t(), rtol=1e-4, atol=1e-4)
    ids = torch.tensor([[0, 7], [49, 7]])
    torch.testing.assert_close(codec.rows(ids, parts, (50, 70), (8, 3)), dense[ids], rtol=1e-5, atol=1e-5)
    served, served_parts = codec.serving_form(parts, (50, 70), (8, 3), torch.zeros(50, 70))
    torch.testing.assert_close(served.matmul(x, served_parts, (50, 70), (8, 3)), x @ dense.t(), rtol=1e-4, atol=1e-4)
    base = torch.randn(50, 70, generator=g).bfloat16()
    assert torch.equal(codec.apply(base, parts, (50, 70), (8, 3)), (base.float() + dense).bfloat16())


def test_codecs_encode_with_their_own_config_fields_and_stored_tensors_apply_as_loading_does():
    g = torch.Generator().manual_seed(5)
    d = torch.randn(40, 64, generator=g)
    config = DeltaConfig(codec="mixed", scale_granularity="row", rank=4, p=0.5, mixed_ranks=(2, 4), mixed_bits=(8, 4))
    direct = {"bitdelta": A.bitdelta(d, "row"), "lowrank": A.lowrank(d, rank=4),
              "dare": A.dare(d, 0.5, torch.Generator().manual_seed(0)), "mixed": A.mixed(d, (2, 4), (8, 4))}
    for name, codec in CODECS.items():
        coded = codec.encode(d, config, torch.Generator().manual_seed(0))
        assert coded.keys() == direct[name].keys() and all(torch.equal(coded[k], direct[name][k]) for k in coded)
    base, finetuned = torch.randn(40, 64, generator=g), torch.randn(40, 64, generator=g).half()
    assert torch.equal(KINDS["full"].apply(base, {"full": finetuned}, (40, 64)), finetuned.float())
    exact = {"exact": (finetuned.float() - base).half()}
    assert torch.equal(KINDS["exact"].apply(base, exact, (40, 64)), base + exact["exact"].float())
    served, parts = KINDS["full"].serving_form({"full": finetuned}, (40, 64), (), base)
    assert served is KINDS["exact"] and torch.equal(parts["exact"], finetuned.float() - base)
    assert list(CODECS) == ["bitdelta", "lowrank", "dare", "mixed"]
    with pytest.raises(UsageError, match="use one of bitdelta, lowrank, dare, mixed"):
        DeltaConfig(codec="svd")


# ---- the 1-bit kernel ----------------------------------------------------------------------------

def _sign_case(rows, out, n, per_row, dtype, device):
    g = torch.Generator().manual_seed(rows * 1000 + n)
    d = torch.randn(out, n, generator=g)
    parts = A.bitdelta(d, "row" if per_row else "tensor")
    x = torch.randn(rows, n, generator=g).to(dtype)
    expected = (x.float() @ CODECS["bitdelta"].decode(parts, (out, n)).t()).to(dtype)
    return x.to(device), parts["sign"].to(device), parts["scale"].to(device), expected


@pytest.mark.parametrize("rows,out,n", [(1, 64, 96), (5, 100, 70), (17, 33, 256)])
@pytest.mark.parametrize("per_row", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_sign_matmul_kernels_match_the_dense_delta(rows, out, n, per_row, dtype):
    from llmshrink.kernels.onebit import sign_matmul_reference, sign_matmul_triton

    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("CPU tensors reach Triton only through its interpreter (the CUDA copy is below)")
    x, words, scale, expected = _sign_case(rows, out, n, per_row, dtype, "cpu")
    tol = dict(rtol=2e-2, atol=2e-2 * expected.float().abs().max().item()) if dtype != torch.float32 else dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(sign_matmul_reference(x, words, scale, n), expected, **tol)
    torch.testing.assert_close(sign_matmul_triton(x, words, scale, n), expected, **tol)


@pytest.mark.gpu
@pytest.mark.parametrize("rows,out,n", [(1, 4096, 4096), (16, 1000, 576), (256, 512, 1000)])
@pytest.mark.parametrize("per_row", [False, True])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_sign_matmul_triton_on_cuda(rows, out, n, per_row, dtype):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from llmshrink.kernels.onebit import sign_matmul

    x, words, scale, expected = _sign_case(rows, out, n, per_row, dtype, "cuda")
    torch.testing.assert_close(sign_matmul(x, words, scale, n).cpu().float(), expected.float(),
                               rtol=2e-2, atol=2e-2 * expected.float().abs().max().item())


# ---- configs -------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,message", [
    (dict(codec="zip"), "codec='zip' is not known"),
    (dict(p=1.0), r"p=1.0 must be in \[0, 1\)"),
    (dict(p=-0.1), r"p=-0.1 must be in \[0, 1\)"),
    (dict(codec="lowrank"), "exactly one of rank"),
    (dict(codec="lowrank", rank=0), "rank=0 must be >= 1"),
    (dict(codec="lowrank", energy=1.5), "energy=1.5"),
    (dict(mixed_ranks=(2, 4), mixed_bits=(8,)), "same, non-zero length"),
    (dict(exact_dtype="int8"), "exact_dtype='int8'"),
])
def test_bad_delta_configs_name_the_field(kwargs, message):
    with pytest.raises(UsageError, match=message):
        DeltaConfig(**kwargs)


def test_delta_config_round_trips():
    config = DeltaConfig(codec="mixed", mixed_ranks=(4, 8), mixed_bits=(8, 2), exact=("*embed*",))
    assert DeltaConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


# ---- folders: compress -> load, serve, bad input -----------------------------------------------

@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A tiny base and a 'fine-tune' whose delta is noise plus a low-rank part, saved as folders."""
    root = tmp_path_factory.mktemp("pair")
    base, ft = tiny_llama(seed=0), tiny_llama(seed=0)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in ft.parameters():
            if p.dim() == 2:
                p.add_(0.01 * torch.randn(p.shape, generator=g)
                       + 0.02 * torch.randn(p.shape[0], 2, generator=g) @ torch.randn(2, p.shape[1], generator=g))
            else:
                p.add_(0.01 * torch.randn(p.shape, generator=g))
    base.save_pretrained(root / "base")
    ft.save_pretrained(root / "ft")
    return root, base, ft


CASES = [
    DeltaConfig(codec="bitdelta", min_numel=1000),
    DeltaConfig(codec="bitdelta", min_numel=1000, scale_granularity="row", distill_steps=3),
    DeltaConfig(codec="lowrank", rank=2, min_numel=1000),
    DeltaConfig(codec="dare", p=0.0, min_numel=1000),
    DeltaConfig(codec="mixed", mixed_ranks=(2,), mixed_bits=(8,), min_numel=1000),
    DeltaConfig(codec="lowrank", energy=0.5, min_numel=1000, exact=("*embed_tokens*",), exact_format="full"),
]


@pytest.mark.parametrize("config", CASES, ids=lambda c: c.codec)
def test_compress_load_and_serve_agree(pair, tmp_path, config):
    root, base, ft = pair
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(0))
    out = compress_delta(root / "base", root / "ft", config, tmp_path / "d", progress=False,
                         calibration=torch.randint(0, 96, (4, 12)))
    meta = json.loads((out / META_FILE).read_text())
    assert meta["base"]["sha256"] == tensors_sha256(root / "base") and meta["config"]["codec"] == config.codec
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "delta.safetensors", META_FILE]
    loaded = load_delta_model(out)
    with torch.no_grad():
        got, want, before = loaded(ids).logits, ft(ids).logits, base(ids).logits
        assert (got - want).pow(2).mean() < (before - want).pow(2).mean()  # closer to the fine-tune than the base is
        if config.codec == "dare":  # p=0: every entry kept, in fp16
            torch.testing.assert_close(got, want, rtol=0, atol=2e-2 * want.abs().max().item())
        kinds = {v["kind"] for v in meta["tensors"].values()}
        assert "exact" in kinds or "full" in kinds  # norms are tiny: stored exactly
        served = DeltaModel(root / "base")
        served.add("ft", out)
        with served.use("ft"):
            torch.testing.assert_close(served(ids).logits, got, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(served(ids).logits, before, rtol=0, atol=0)  # base restored exactly


def test_delta_model_switches_between_fine_tunes_without_copying_the_base(pair, tmp_path):
    root, base, ft = pair
    a = compress_delta(root / "base", root / "ft", DeltaConfig(min_numel=1000), tmp_path / "a", progress=False)
    b = compress_delta(root / "base", root / "ft", DeltaConfig(codec="lowrank", rank=2, min_numel=1000),
                       tmp_path / "b", progress=False)
    served = DeltaModel(root / "base")
    pointers = {n: p.data_ptr() for n, p in served.model.named_parameters()}
    served.add("a", a)
    served.add("b", b)
    ids = torch.randint(0, 96, (1, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        outs = {}
        for name in ("a", "b", None, "a"):
            served.set_active(name)
            outs.setdefault(name, []).append(served(ids).logits)
        torch.testing.assert_close(outs["a"][0], outs["a"][1], rtol=0, atol=0)
        torch.testing.assert_close(outs["a"][0], load_delta_model(a)(ids).logits, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(outs["b"][0], load_delta_model(b)(ids).logits, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(outs[None][0], base(ids).logits, rtol=0, atol=0)
    assert sorted(p.data_ptr() for p in served.model.parameters()) == sorted(set(pointers.values()))  # nothing copied
    out = served.generate(ids, max_new_tokens=3, do_sample=False, delta="b")
    assert out.shape == (1, 13) and served.active == "a"  # per-call choice; the active one is restored
    with pytest.raises(UsageError, match="no delta named 'c'"):
        served.set_active("c")


def test_wrong_or_missing_base_is_a_clear_error(pair, tmp_path):
    root, _, _ = pair
    out = compress_delta(root / "base", root / "ft", DeltaConfig(min_numel=1000), tmp_path / "d", progress=False)
    with pytest.raises(UsageError, match=r"sha256 .*\.\.\., but the delta was made from .* sha256 .*base_model="):
        load_delta_model(out, base_model=root / "ft")
    meta = json.loads((out / META_FILE).read_text())
    meta["base"].update(name=str(tmp_path / "gone"), path=str(tmp_path / "gone"))
    (out / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(UsageError, match="cannot be found; pass base_model="):
        load_delta_model(out)
    load_delta_model(out, base_model=root / "base")  # the override finds it
    from llmshrink import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(out, base_model=root / "base").config.num_hidden_layers == 2


def test_mismatched_models_fail_before_writing(pair, tmp_path):
    root, _, _ = pair
    tiny_llama(layers=3).save_pretrained(tmp_path / "deeper")
    with pytest.raises(UsageError, match="differ in num_hidden_layers"):
        compress_delta(root / "base", tmp_path / "deeper", DeltaConfig(), tmp_path / "d", progress=False)
    with pytest.raises(UsageError, match="rank=40 is larger than"):
        compress_delta(root / "base", root / "ft", DeltaConfig(codec="lowrank", rank=40, min_numel=1000),
                       tmp_path / "d", progress=False)
    assert not (tmp_path / "d").exists() and not list(tmp_path.glob(".d.tmp*"))


def test_cli_delta_compress(pair, tmp_path, capsys):
    from llmshrink.cli import main

    root, _, _ = pair
    out = tmp_path / "cli"
    assert main(["delta", "compress", "--base", str(root / "base"), "--finetuned", str(root / "ft"),
                 "--out", str(out), "--method", "lowrank", "--rank", "2", "--min-numel", "1000"]) == 0
    assert "lowrank delta written to" in capsys.readouterr().out
    assert read_delta(out)[0]["config"]["rank"] == 2
    assert main(["delta", "compress", "--base", str(root / "base"), "--finetuned", str(root / "ft"),
                 "--out", str(tmp_path / "x"), "--method", "dare", "--p", "1.5"]) == 2
    assert "p=1.5 must be in [0, 1)" in capsys.readouterr().err
    assert main(["delta", "compress", "--base", str(root / "base"), "--finetuned", str(root / "ft"),
                 "--out", str(out)]) == 2  # exists, not empty
    assert "is not empty" in capsys.readouterr().err


def test_plain_transformers_loads_a_delta_folder_after_import_llmshrink(pair, tmp_path):
    import subprocess
    import sys

    root, _, ft = pair
    out = compress_delta(root / "base", root / "ft", DeltaConfig(codec="dare", p=0.0, min_numel=1000), tmp_path / "d",
                         progress=False)
    ids = torch.randint(0, 96, (1, 8), generator=torch.Generator().manual_seed(2))
    code = (f"import torch, transformers, llmshrink\n"
            f"m = transformers.AutoModelForCausalLM.from_pretrained({str(out)!r})\n"
            f"print(type(m).__name__, m(torch.tensor({ids.tolist()})).logits.abs().sum().item())")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    name, total = result.stdout.split()
    assert name == "LlamaForCausalLM"
    with torch.no_grad():
        assert abs(float(total) - ft(ids).logits.abs().sum().item()) < 1e-2 * float(total)
    # without llmshrink, transformers names the unknown model type
    bare = subprocess.run([sys.executable, "-c", f"import transformers; transformers.AutoModelForCausalLM."
                           f"from_pretrained({str(out)!r})"], capture_output=True, text=True)
    assert bare.returncode != 0 and "llmshrink_delta" in bare.stderr


def test_scale_distillation_trains_the_scales_and_lowers_the_kl(pair, tmp_path):
    root, _, _ = pair
    calib = torch.randint(0, 96, (8, 16), generator=torch.Generator().manual_seed(3))
    plain = compress_delta(root / "base", root / "ft", DeltaConfig(min_numel=1000), tmp_path / "a", progress=False)
    tuned = compress_delta(root / "base", root / "ft", DeltaConfig(min_numel=1000, distill_steps=30, distill_lr=5e-2),
                           tmp_path / "b", calibration=calib, progress=False)
    meta, parts = read_delta(tuned)
    assert meta["distill"]["steps"] == 30 and meta["distill"]["kl_last"] < meta["distill"]["kl_first"]
    before = read_delta(plain)[1]
    moved = [k for k, p in parts.items() if "scale" in p and not torch.equal(p["scale"], before[k]["scale"])]
    assert moved and all(torch.equal(parts[k]["sign"], before[k]["sign"]) for k in moved)  # only scales train
    # nothing to distil (every tensor below min_numel): a warning, not a crash
    out = compress_delta(root / "base", root / "ft", DeltaConfig(distill_steps=5), tmp_path / "c",
                         calibration=calib, progress=False)
    assert read_delta(out)[0]["distill"] is None


def test_tied_embeddings_and_re_adding_while_active(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    base = LlamaForCausalLM(config).eval()
    ft = LlamaForCausalLM(config).eval()
    ft.load_state_dict(base.state_dict())
    with torch.no_grad():
        for p in ft.parameters():
            p.add_(0.02 * torch.randn(p.shape))
    assert ft.lm_head.weight is ft.model.embed_tokens.weight
    base.save_pretrained(tmp_path / "base")
    ft.save_pretrained(tmp_path / "ft")
    config = DeltaConfig(codec="dare", p=0.0, min_numel=1000, exact=("*norm*",), exact_format="full")
    a = compress_delta(tmp_path / "base", tmp_path / "ft", config, tmp_path / "a", progress=False)
    b = compress_delta(tmp_path / "base", tmp_path / "ft", DeltaConfig(min_numel=1000), tmp_path / "b", progress=False)
    ids = torch.randint(0, 96, (1, 9), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        loaded = load_delta_model(a)
        assert loaded.lm_head.weight is loaded.model.embed_tokens.weight  # still tied
        torch.testing.assert_close(loaded(ids).logits, ft(ids).logits, rtol=0, atol=2e-2)
        served = DeltaModel(tmp_path / "base")
        served.add("a", a)
        served.set_active("a")
        served.add("b", b)  # norms of "a" are swapped in right now; b must still be built on the base
        with served.use("b"):
            torch.testing.assert_close(served(ids).logits, load_delta_model(b)(ids).logits, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(served(ids).logits, loaded(ids).logits, rtol=1e-4, atol=1e-4)  # "a" again


def test_more_bad_input(pair, tmp_path):
    root, _, _ = pair
    (tmp_path / "file").write_text("x")
    with pytest.raises(UsageError, match="is a file"):
        compress_delta(root / "base", root / "ft", DeltaConfig(), tmp_path / "file", progress=False)
    with pytest.raises(UsageError, match="not a folder that exists, a Hub id|not in the Hugging Face cache"):
        compress_delta("nobody/no-such-model", root / "ft", DeltaConfig(), tmp_path / "d", progress=False)
    d = torch.randn(64, 48, generator=torch.Generator().manual_seed(0))
    assert A.lowrank(d, energy=0.99999999)["u"].shape[1] <= 48  # fp32 sums below ~1: clamped, no rank error
