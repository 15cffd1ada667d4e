"""Weight sharing: the weighted k-means as a pure function on heavy-tailed rows (against plain
k-means and uniform RTN at the same bits, pruned zeros, exact small codebooks), the packed
codes, and tiny Llama folders shared -> saved -> loaded in a fresh process (llmshrink and plain
transformers), run from the CLI and from the shipped Deep Compression recipe."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open

import llmshrink
from llmshrink import ShareConfig
from llmshrink.auto import load_model
from llmshrink.cli import main as cli_main
from llmshrink.errors import UsageError
from llmshrink.formats import detect
from llmshrink.gptq.algorithm import rtn_quantize
from llmshrink.hub import model_card
from llmshrink.pipeline import load_recipe, run_recipe
from llmshrink.pipeline.report import print_summary
from llmshrink.share import (SharedLinear, dequantize_shared, pack_codes, save_shared, share, share_weight,
                             unpack_codes, weighted_error, weighted_kmeans)
from llmshrink.share.kmeans import reconstruct

from conftest import fresh_logits, tiny_with_calibration

IDS = torch.randint(1, 97, (2, 24), generator=torch.Generator().manual_seed(11))
RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "deep_compression.yaml"


def heavy_rows(rows: int = 48, n: int = 192, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(x [rows, n] Student-t(3) values, w [1, n] skewed channel weights), as LLM weights and
    their inputs' second moments are: a few large weights, a few loud channels."""
    torch.manual_seed(seed)  # torch.distributions draws from the global generator
    x = torch.distributions.StudentT(3.0).sample((rows, n)) * 0.02
    w = torch.rand(1, n) ** 4 * 10
    return x, w


# ----------------------------------------------------------------------------- the k-means


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_weighted_kmeans_has_the_least_weighted_error_of_plain_kmeans_and_uniform_rtn(bits):
    x, w = heavy_rows()
    W = w.expand_as(x)
    centroids, codes = weighted_kmeans(x, 2 ** bits, w)
    plain_c, plain_codes = weighted_kmeans(x, 2 ** bits)
    weighted = weighted_error(x, W, centroids, codes)
    plain = weighted_error(x, W, plain_c, plain_codes)
    rtn = ((x - rtn_quantize(x, bits, group_size=-1, sym=False).dequantized).double().pow(2) * W).sum(1)
    assert (weighted <= plain * (1 + 1e-9)).all()  # never worse, row by row
    assert weighted.sum() < 0.9 * plain.sum(), (weighted.sum(), plain.sum())  # measured .76 .72 .62
    assert weighted.sum() < 0.5 * rtn.sum(), (weighted.sum(), rtn.sum())  # measured .33 .27 .40
    assert (centroids[:, 1:] >= centroids[:, :-1]).all() and codes.min() >= 0 and codes.max() < 2 ** bits


def test_pruned_zeros_keep_a_centroid_of_their_own_and_stay_zeros():
    x, w = heavy_rows(seed=1)
    x[x.abs() < x.abs().median()] = 0  # half of every row pruned, by magnitude
    x[0] = torch.linspace(-1, 1, x.shape[1])  # one dense row: all of its centroids are free
    centroids, codes = weighted_kmeans(x, 8, w)
    values = reconstruct(centroids, codes)
    assert torch.equal(values[x == 0], torch.zeros(int((x == 0).sum())))
    assert ((centroids[1:] == 0).sum(1) == 1).all() and not (centroids[0] == 0).any()
    # without the fixed slot some zeros would round to a nonzero centroid: the slot is what keeps them
    free_c, free_codes = weighted_kmeans(x, 8, w, keep_zeros=False)
    assert (reconstruct(free_c, free_codes)[x == 0] != 0).any()


def test_rows_with_few_distinct_values_are_stored_exactly_and_no_slot_is_wasted():
    x = torch.tensor([[0.5, -1.0, 0.5, 2.0, 0.0, -1.0, 3.0, 7.0],  # 6 distinct
                      [1.0] * 8,  # one value
                      [0.0] * 8,  # all pruned
                      [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]])  # 8 distinct: exact at k = 8, not at 4
    for k in (4, 8):
        centroids, codes = weighted_kmeans(x, k, torch.rand(1, 8, generator=torch.Generator().manual_seed(k)))
        exact = torch.tensor([len(set(r.tolist())) <= k for r in x])
        torch.testing.assert_close(reconstruct(centroids, codes)[exact], x[exact], rtol=0, atol=0)
    # k + 1 distinct values: the best k-means merges two of them and uses every centroid
    row = torch.tensor([[0.0, 1.0, 2.0, 3.0, 10.0] * 20])
    centroids, codes = weighted_kmeans(row, 4, keep_zeros=False)
    assert len(set(centroids[0].tolist())) == 4 and codes.unique().numel() == 4
    assert float(weighted_error(row, None, centroids, codes)) == pytest.approx(20 * 0.5)  # 0,1 (or 2,3) merged
    codes, codebook = share_weight(x, None, 3, per="tensor")  # 11 distinct values over the whole tensor
    assert codebook.shape == (1, 8) and codes.shape == x.shape


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
def test_codes_pack_and_unpack_exactly_at_every_width(bits):
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 2 ** bits, (24, 40), generator=g)  # 40 inputs: padded to whole words
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.int32 and packed.shape[1] == 24
    assert torch.equal(unpack_codes(packed, bits, 40), codes)
    codebook = torch.randn(24, 2 ** bits, generator=g).half()
    torch.testing.assert_close(dequantize_shared(packed, codebook, 40), codebook.float().gather(1, codes))
    layer = SharedLinear.from_codes(codes, codebook)
    x = torch.randn(3, 40, generator=g)
    torch.testing.assert_close(layer(x), x @ codebook.float().gather(1, codes).T)


@pytest.mark.parametrize("kwargs, message", [
    ({"bits": 1}, r"bits=1 is outside 2-8"), ({"bits": 9}, r"bits=9 is outside 2-8"),
    ({"bits": True}, r"bits=True is outside 2-8"), ({"per": "column"}, r"per='column' is not known; use row"),
    ({"iters": 0}, r"iters=0 runs no k-means iteration"),
])
def test_bad_configs_are_one_line_errors(kwargs, message):
    with pytest.raises(UsageError, match=message):
        ShareConfig(**kwargs)


# ----------------------------------------------------------------------------- tiny models


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_with_calibration(tmp_path_factory.mktemp("share"))


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def shared_in_memory(tiny, config: ShareConfig):
    model, tokenizer, _ = load_model(tiny["base"])
    record = share(model, config, calibration=tiny["calib"], tokenizer=tokenizer, nsamples=4, seqlen=32,
                   progress=False)
    return model, tokenizer, record


def test_a_shared_folder_loads_in_a_fresh_process_with_the_in_memory_logits(tiny, tmp_path):
    model, tokenizer, record = shared_in_memory(tiny, ShareConfig())
    assert record["linears"] == 3 * 7 and record["calibration"]["nsamples"] == 4
    # 3-bit codes + an fp16 codebook of 8 per row: 3 + 128 / in (in = 64 or 128)
    assert 3 + 128 / 128 < record["bits_per_weight"] < 3 + 128 / 64
    out = save_shared(model, tokenizer, tmp_path / "s")
    assert detect(out).name == "shared"
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"] == {"quant_method": "llmshrink_shared"}
    assert config["llmshrink_share"]["config"] == ShareConfig().to_dict()
    name = "model.layers.1.mlp.down_proj"
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert f"{name}.weight" not in f.keys()
        assert f.get_slice(f"{name}.codes").get_dtype() == "I32"
        book = f.get_slice(f"{name}.codebook")
        assert book.get_dtype() == "F16" and book.get_shape() == [64, 8]
    tags = yaml.safe_load(model_card(out, "org/smol-shared").split("---")[1])["tags"]
    assert {"llmshrink", "shared", "weight-sharing"} <= set(tags)
    expected = logits(model)
    torch.testing.assert_close(fresh_logits(out, IDS, "llmshrink", tmp_path), expected, rtol=0, atol=0)
    torch.testing.assert_close(fresh_logits(out, IDS, "transformers+llmshrink", tmp_path), expected, rtol=0, atol=0)


def test_unweighted_per_tensor_sharing_reads_no_text(tiny, tmp_path, monkeypatch):
    def no_text(*args, **kwargs):
        raise AssertionError("calibration was read")

    monkeypatch.setattr("llmshrink.share.apply.resolve_calibration", no_text)
    out = llmshrink.compress(tiny["base"], ShareConfig(bits=4, per="tensor", weighted=False), tmp_path / "t",
                             progress=False)
    model = llmshrink.AutoModelForCausalLM.from_pretrained(out)
    layer = model.get_submodule("model.layers.0.self_attn.q_proj")
    assert isinstance(layer, SharedLinear) and layer.per == "tensor" and layer.codebook.shape == (1, 16)
    record = json.loads((out / "config.json").read_text())["llmshrink_share"]
    assert record["calibration"] is None  # 16 fp16 values per linear: 7 x 256 bits over 36864 weights a layer
    assert record["bits_per_weight"] == pytest.approx(4 + 7 * 256 / 36864, abs=1e-6)


def test_weighting_brings_the_logits_closer_to_the_original(tiny):
    """On held-out text, H-weighted 2-bit sharing moves the tiny model's logits less than plain
    k-means at the same bits."""
    base, tokenizer, _ = load_model(tiny["base"])
    from llmshrink.evals.data import corpus_documents

    ids = torch.tensor(tokenizer("\n\n".join(corpus_documents("wiki")[:20])).input_ids[:256]).reshape(8, 32)
    with torch.no_grad():
        reference = base(ids).logits

    def gap(weighted: bool) -> float:
        model, _, _ = shared_in_memory(tiny, ShareConfig(bits=2, weighted=weighted))
        with torch.no_grad():
            return float((model(ids).logits - reference).pow(2).mean())

    weighted, plain = gap(True), gap(False)
    assert weighted < plain, (weighted, plain)  # measured 0.0048 against 0.0064


def test_the_cli_shares_and_refuses_bad_values_before_any_work(tiny, tmp_path, capsys, monkeypatch):
    out = tmp_path / "cli"
    assert cli_main(["share", "--model", tiny["base"], "--bits", "4", "--out", str(out), "--calib-file", tiny["calib"],
                     "--nsamples", "4", "--calib-seqlen", "32", "--iters", "5"]) == 0
    assert "share output written to" in capsys.readouterr().out
    assert json.loads((out / "config.json").read_text())["llmshrink_share"]["config"]["bits"] == 4

    def no_work(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr("llmshrink.share.method.load_model", no_work)
    for flags, message in ((["--bits", "9"], "bits=9 is outside 2-8"), (["--per", "col"], "per='col' is not known")):
        assert cli_main(["share", "--model", tiny["base"], *flags, "--out", str(tmp_path / "bad")]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "bad").exists()


def test_the_deep_compression_recipe_prunes_shares_and_packs_with_each_stage_sized(tiny, tmp_path, capsys):
    sets = [f"model={tiny['base']}", f"out={tmp_path / 'run'}", f"calibration.source={tiny['calib']}",
            "calibration.nsamples=4", "calibration.seqlen=32", "evaluate=null"]
    state = run_recipe(load_recipe(RECIPE, overrides=sets), progress=False)
    run = tmp_path / "run"
    assert [(s["method"], s["kind"]) for s in state["steps"]] == [("weight_prune", "dense"), ("share", "shared"),
                                                                  ("pack", "packed")]
    sizes = [state["original_weight_bytes"]] + [s["weight_bytes"] for s in state["steps"]]
    # zeros are stored as zeros until they are shared
    assert sizes[1] == pytest.approx(sizes[0], rel=0.01) and sizes[3] < sizes[2] < sizes[1] / 3, sizes
    report = (run / "report.md").read_text()
    assert "| step | method | seconds | weights (MB) | output |" in report and f"| {sizes[3] / 2**20:.2f} |" in report
    print_summary(state)  # what `llmshrink run` prints after the run
    assert capsys.readouterr().out.startswith(f"weights on disk: original {sizes[0] / 2**20:.2f} MB -> 1. weight_prune ")
    pruned = llmshrink.AutoModelForCausalLM.from_pretrained(run / "steps" / "01-weight_prune")
    final = llmshrink.AutoModelForCausalLM.from_pretrained(run / "model")
    torch.testing.assert_close(logits(final), logits(llmshrink.AutoModelForCausalLM.from_pretrained(
        run / "steps" / "02-share")), rtol=0, atol=0)
    for name in ("model.layers.0.mlp.up_proj", "model.layers.2.self_attn.o_proj"):
        zeros = pruned.get_submodule(name).weight == 0
        assert zeros.float().mean() == pytest.approx(0.5, abs=0.02)
        assert (final.get_submodule(name).dequantized_weight()[zeros] == 0).all()  # the sparsity survived sharing


def test_only_pack_may_follow_share(tiny, tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(f"model: {tiny['base']}\ncalibration: {{source: {tiny['calib']}, nsamples: 4, seqlen: 32}}\n"
                    f"steps:\n  - {{method: share}}\n  - {{method: gptq}}\nout: {tmp_path / 'x'}\n")
    with pytest.raises(UsageError, match=r"steps\[1\] \(gptq\) cannot follow steps\[0\] \(share\): its linears are "
                                         r"stored as codes into shared values"):
        load_recipe(path)
