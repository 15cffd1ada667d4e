"""Low-rank factorization: the whitening math on planted inputs, the rank allocation as a pure
function, and tiny Llama folders factorized -> saved -> loaded in a fresh process (llmshrink and
plain transformers), merged, run from the CLI and from a recipe; a score map written once and
cut at many ratios, each cut equal to a dedicated run without `sequential`."""

from __future__ import annotations

import dataclasses
import itertools
import json
import textwrap

import pytest
import torch

import llmshrink
from llmshrink.auto import load_model
from llmshrink.cli import main as cli_main
from llmshrink.errors import UsageError
from llmshrink.evals.data import corpus_documents
from llmshrink.factorize import (FactorizeConfig, FactorizedLinear, allocate_ranks, direction_importance, error_curve,
                                 factorize, factorize_weight, save_factorized, save_score_map, truncation_errors,
                                 uniform_ranks, whitened_spectrum, whitened_svd, whitening)
from llmshrink.factorize.allocate import allocation_cost, max_saving_rank
from llmshrink.formats import detect
from llmshrink.pipeline import load_recipe, run_recipe
from llmshrink.safetensors_io import tensors_sha256

from conftest import fresh_logits, save_tiny, tiny_with_calibration

IDS = torch.randint(1, 97, (2, 24), generator=torch.Generator().manual_seed(7))


def correlated_inputs(tokens: int, width: int, seed: int = 0) -> torch.Tensor:
    """[tokens, width] inputs with a few strong, correlated directions (as activations have)."""
    g = torch.Generator().manual_seed(seed)
    scales = torch.logspace(1, -2, width, dtype=torch.float64)
    basis, _ = torch.linalg.qr(torch.randn(width, width, generator=g, dtype=torch.float64))
    return (torch.randn(tokens, width, generator=g, dtype=torch.float64) * scales) @ basis.T


def output_error(W: torch.Tensor, approx: torch.Tensor, X: torch.Tensor) -> float:
    return float(((W - approx) @ X.T).pow(2).sum())


# ----------------------------------------------------------------------------- whitening


def test_whitened_truncation_beats_plain_svd_on_output_error_and_predicts_it():
    g = torch.Generator().manual_seed(1)
    W = torch.randn(40, 48, generator=g, dtype=torch.float64)
    X = correlated_inputs(600, 48)
    H = X.T @ X
    _, sigma, _ = whitened_svd(W, whitening(H, damp=0.0))
    torch.testing.assert_close(whitened_spectrum(W, whitening(H, damp=0.0)), sigma)
    predicted = truncation_errors(sigma)
    for rank in (2, 8, 16, 32):
        U, V = factorize_weight(W, H, rank, damp=0.0)
        Up, Vp = factorize_weight(W, None, rank)
        whitened, plain = output_error(W, U @ V, X), output_error(W, Up @ Vp, X)
        assert whitened < (0.7 if rank == 2 else 0.2) * plain, (rank, whitened, plain)  # measured .62, .13, .02, .001
        assert whitened == pytest.approx(float(predicted[rank]), rel=1e-6)  # the curve is the measured error
    assert predicted[0] == pytest.approx(output_error(W, torch.zeros_like(W), X), rel=1e-9)


def test_the_factors_are_balanced_and_multiply_back_at_full_rank():
    g = torch.Generator().manual_seed(2)
    W = torch.randn(24, 16, generator=g, dtype=torch.float64)
    X = correlated_inputs(100, 16, seed=3)
    U, V = factorize_weight(W, X.T @ X, 16, damp=0.01)
    torch.testing.assert_close(U @ V, W, rtol=1e-9, atol=1e-9)
    _, sigma, _ = whitened_svd(W, whitening(X.T @ X, 0.01))
    U, V = factorize_weight(W, X.T @ X, 5, damp=0.01)
    # sqrt(sigma) on each side: U^T U = sigma_r = (V S)(V S)^T
    S, _ = whitening(X.T @ X, 0.01)
    torch.testing.assert_close(U.T @ U, torch.diag(sigma[:5]), rtol=1e-8, atol=1e-8)
    torch.testing.assert_close((V @ S) @ (V @ S).T, torch.diag(sigma[:5]), rtol=1e-8, atol=1e-8)


def test_rank_deficient_inputs_whiten_finitely_and_are_fit_exactly_at_their_rank():
    g = torch.Generator().manual_seed(4)
    W = torch.randn(32, 48, generator=g, dtype=torch.float64)
    X = correlated_inputs(10, 48, seed=5)  # 10 tokens, 48 inputs: H has rank 10
    for damp in (0.0, 0.01):
        S, S_inv = whitening(X.T @ X, damp)
        assert torch.isfinite(S).all() and torch.isfinite(S_inv).all()
    U, V = factorize_weight(W, X.T @ X, 10, damp=0.0)
    assert output_error(W, U @ V, X) < 1e-8 * output_error(W, torch.zeros_like(W), X)
    S, S_inv = whitening(torch.zeros(8, 8), 0.01)  # inputs that are all zero: plain SVD
    torch.testing.assert_close(S, torch.eye(8, dtype=torch.float64))


# ----------------------------------------------------------------------------- allocation


def curve(decay: float, k: int) -> torch.Tensor:
    return truncation_errors(torch.tensor([decay ** i for i in range(k)], dtype=torch.float64).sqrt())


def test_the_allocation_meets_the_ratio_and_prefers_fast_decaying_spectra():
    shapes = {"fast": (64, 64), "slow": (64, 64), "wide": (128, 64)}
    errors = {"fast": curve(0.5, 64), "slow": curve(0.99, 64), "wide": curve(0.9, 64)}
    total = sum(o * i for o, i in shapes.values())
    for ratio in (0.2, 0.4, 0.6):
        ranks = allocate_ranks(errors, shapes, ratio)
        cost = allocation_cost(ranks, shapes)
        assert cost <= ratio * total
        assert cost > ratio * total - 2 * (128 + 64)  # no step that would still fit is left
        kept = {n: min(shapes[n]) if r is None else r for n, r in ranks.items()}  # dense: full rank
        assert kept["fast"] < kept["slow"], ranks
    assert allocate_ranks(errors, shapes, 1.0) == {name: None for name in shapes}


def test_the_allocation_beats_uniform_ranks_and_finds_the_optimum_of_a_small_case():
    shapes = {"a": (8, 8), "b": (8, 8), "c": (8, 12)}
    errors = {"a": curve(0.3, 8), "b": curve(0.95, 8), "c": curve(0.7, 8)}
    total = sum(o * i for o, i in shapes.values())

    def summed(ranks):
        return sum(float(errors[n][r]) if r is not None else 0.0 for n, r in ranks.items())

    options = {n: list(range(1, max_saving_rank(s) + 1)) + [None] for n, s in shapes.items()}
    for ratio in (0.3, 0.5, 0.7):
        greedy = allocate_ranks(errors, shapes, ratio)
        feasible = [dict(zip(shapes, combo)) for combo in itertools.product(*options.values())
                    if allocation_cost(dict(zip(shapes, combo)), shapes) <= ratio * total]
        best = min(summed(r) for r in feasible)
        uniform = uniform_ranks(shapes, ratio)
        assert allocation_cost(uniform, shapes) <= ratio * total
        assert summed(greedy) <= summed(uniform) + 1e-12
        assert summed(greedy) == pytest.approx(best, rel=1e-9), (ratio, greedy)


def test_linears_that_rank_cannot_shrink_stay_dense_and_a_ratio_below_rank_one_is_refused():
    shapes = {"tiny": (2, 2), "big": (64, 64)}
    assert max_saving_rank((2, 2)) == 0 and max_saving_rank((64, 64)) == 31
    ranks = allocate_ranks({"tiny": curve(0.5, 2), "big": curve(0.9, 64)}, shapes, 0.3)
    assert ranks["tiny"] is None and 1 <= ranks["big"] <= 31
    with pytest.raises(UsageError, match=r"ratio=0\.01 is below what rank 1 everywhere holds.*use a ratio of at least"):
        allocate_ranks({"tiny": curve(0.5, 2), "big": curve(0.9, 64)}, shapes, 0.01)
    assert uniform_ranks(shapes, 1.0) == {"tiny": None, "big": None}
    assert uniform_ranks(shapes, 0.5) == {"tiny": None, "big": 16}


@pytest.mark.parametrize("kwargs, message", [
    ({"ratio": 0}, r"ratio=0 is outside \(0, 1\]"), ({"ratio": 1.5}, r"ratio=1\.5 is outside \(0, 1\]"),
    ({"allocate": "even"}, r"allocate='even' is not known"), ({"damp": -1.0}, r"damp=-1\.0 is outside"),
    ({"targets": "("}, r"targets='\(' is not a regular expression"),
])
def test_bad_configs_are_one_line_errors(kwargs, message):
    with pytest.raises(UsageError, match=message):
        FactorizeConfig(**kwargs)


# ----------------------------------------------------------------------------- tiny models


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_with_calibration(tmp_path_factory.mktemp("factorize"))


def factorized_in_memory(tiny, config: FactorizeConfig):
    model, tokenizer, _ = load_model(tiny["base"])
    record = factorize(model, config, calibration=tiny["calib"], tokenizer=tokenizer, nsamples=4, seqlen=32,
                       progress=False)
    return model, tokenizer, record


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def test_a_factorized_folder_loads_in_a_fresh_process_with_the_in_memory_logits(tiny, tmp_path):
    model, tokenizer, record = factorized_in_memory(tiny, FactorizeConfig(ratio=0.6))
    assert record["ranks"] and record["parameters"]["ratio"] <= 0.6
    assert all(isinstance(model.get_submodule(n), FactorizedLinear) and model.get_submodule(n).rank == r
               for n, r in record["ranks"].items())
    out = save_factorized(model, tokenizer, tmp_path / "f")
    assert detect(out).name == "factorized"
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"] == {"quant_method": "llmshrink_factorized"}
    assert config["llmshrink_factorize"]["ranks"] == record["ranks"]
    from safetensors import safe_open
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    name, rank = next(iter(record["ranks"].items()))
    assert {f"{name}.U.weight", f"{name}.V.weight"} <= keys and f"{name}.weight" not in keys
    expected = logits(model)
    torch.testing.assert_close(fresh_logits(out, IDS, "llmshrink", tmp_path), expected)
    torch.testing.assert_close(fresh_logits(out, IDS, "transformers+llmshrink.factorize", tmp_path), expected)


def test_plain_transformers_without_llmshrink_names_the_format_it_cannot_load(tiny, tmp_path):
    """The known hazard (hf.py): transformers alone skips the unknown quant_method with a warning
    and loads the factorized linears as random weights; the warning must name the format."""
    model, tokenizer, _ = factorized_in_memory(tiny, FactorizeConfig(ratio=0.6))
    out = save_factorized(model, tokenizer, tmp_path / "f")
    done = fresh_logits(out, IDS, "transformers", tmp_path, check=False)
    assert "llmshrink_factorized" in done.stderr and "MISSING" in done.stderr, done.stderr[-2000:]


def test_a_merged_export_is_a_standard_folder_with_the_factorized_logits(tiny, tmp_path):
    factorized, _, record = factorized_in_memory(tiny, FactorizeConfig(ratio=0.6))
    out = llmshrink.compress(tiny["base"], FactorizeConfig(ratio=0.6, merge=True), tmp_path / "merged",
                             calibration=tiny["calibration"], progress=False)
    config = json.loads((out / "config.json").read_text())
    assert detect(out).name == "dense" and "quantization_config" not in config
    assert config["llmshrink_factorize"]["merged"] and config["llmshrink_factorize"]["ranks"] == record["ranks"]
    torch.testing.assert_close(fresh_logits(out, IDS, "transformers", tmp_path), logits(factorized), rtol=1e-4, atol=1e-4)


def test_ratio_one_keeps_every_weight_exactly(tiny, tmp_path):
    base, _, _ = load_model(tiny["base"])
    out = llmshrink.compress(tiny["base"], FactorizeConfig(ratio=1.0), tmp_path / "one",
                             calibration=tiny["calibration"], progress=False)
    record = json.loads((out / "config.json").read_text())["llmshrink_factorize"]
    assert record["ranks"] == {} and len(record["dense"]) == 3 * 7
    torch.testing.assert_close(logits(llmshrink.AutoModelForCausalLM.from_pretrained(out)), logits(base),
                               rtol=0, atol=0)


def test_whitening_and_allocation_lower_the_output_error_of_the_tiny_model(tiny):
    """On held-out text, whitened + allocated logits are closer to the original's than plain SVD
    of the raw weights at uniform ranks, at no more parameters."""
    base, tokenizer, _ = load_model(tiny["base"])
    text = "\n\n".join(corpus_documents("wiki")[:20])
    ids = torch.tensor(tokenizer(text).input_ids[:256]).reshape(8, 32)

    def gap(config):
        model, _, record = factorized_in_memory(tiny, config)
        with torch.no_grad():
            return record["parameters"], float((model(ids).logits - base(ids).logits).pow(2).mean())

    plain_size, plain = gap(FactorizeConfig(ratio=0.7, whiten=False, allocate="uniform"))
    size, whitened = gap(FactorizeConfig(ratio=plain_size["ratio"]))
    assert size["kept"] <= plain_size["kept"]
    assert whitened < plain, (whitened, plain)


def test_targets_choose_the_linears_and_sequential_whitening_runs(tiny):
    model, _, record = factorized_in_memory(tiny, FactorizeConfig(ratio=0.5, targets=r"mlp\.", sequential=True))
    assert record["ranks"] and all(".mlp." in n for n in record["ranks"]) and len(record["dense"]) + len(
        record["ranks"]) == 3 * 3
    assert all(isinstance(m, torch.nn.Linear) for n, m in model.named_modules() if n.endswith(("q_proj", "o_proj")))
    with pytest.raises(UsageError, match=r"targets='nothing' finds none of the decoder linears"):
        factorized_in_memory(tiny, FactorizeConfig(targets="nothing"))


def test_a_ratio_no_allocation_can_meet_is_refused_before_calibrating(tiny, monkeypatch):
    def no_work(*args, **kwargs):
        raise AssertionError("calibration was read")

    monkeypatch.setattr("llmshrink.factorize.apply.resolve_calibration", no_work)
    model, tokenizer, _ = load_model(tiny["base"])
    with pytest.raises(UsageError, match=r"ratio=0\.01 is below what rank 1 everywhere holds"):
        factorize(model, FactorizeConfig(ratio=0.01), tokenizer=tokenizer)


def test_the_cli_runs_factorize_and_refuses_a_bad_ratio_before_any_work(tiny, tmp_path, capsys, monkeypatch):
    out = tmp_path / "cli"
    assert cli_main(["factorize", "--model", tiny["base"], "--ratio", "0.7", "--out", str(out), "--calib-file",
                     tiny["calib"], "--nsamples", "4", "--calib-seqlen", "32"]) == 0
    assert "factorize output written to" in capsys.readouterr().out
    assert json.loads((out / "config.json").read_text())["llmshrink_factorize"]["parameters"]["ratio"] <= 0.7

    def no_work(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr("llmshrink.factorize.method.load_model", no_work)
    for ratio in ("0", "1.5", "-0.2"):
        assert cli_main(["factorize", "--model", tiny["base"], "--ratio", ratio, "--out", str(tmp_path / "bad")]) == 2
        err = capsys.readouterr().err.strip()
        assert f"ratio={float(ratio)} is outside (0, 1]" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "bad").exists()


def test_a_recipe_step_factorizes_and_later_steps_need_a_merged_model(tiny, tmp_path):
    def recipe(steps: str, out):
        path = tmp_path / "r.yaml"
        path.write_text(f"model: {tiny['base']}\nseed: 0\ncalibration: {{source: {tiny['calib']}, nsamples: 4, "
                        f"seqlen: 32}}\nsteps:\n{textwrap.dedent(steps)}out: {out}\n")
        return path

    with pytest.raises(UsageError, match=r"steps\[1\] \(weight_prune\) cannot follow steps\[0\] \(factorize\): its "
                                         r"linears are stored as low-rank factors; set merge: true"):
        load_recipe(recipe("  - {method: factorize}\n  - {method: weight_prune, sparsity: 0.5}\n", tmp_path / "x"))
    state = run_recipe(load_recipe(recipe("""\
          - {method: factorize, ratio: 0.7, merge: true}
          - {method: rtn, bits: 8, group_size: -1, clip_search: false}
        """, tmp_path / "run")), progress=False)
    assert [s["kind"] for s in state["steps"]] == ["dense", "quantized"]
    state = run_recipe(load_recipe(recipe("  - {method: factorize, ratio: 0.7}\n", tmp_path / "run2")), progress=False)
    final = tmp_path / "run2" / state["final"]
    assert state["steps"][0]["kind"] == "factorized" and detect(final).name == "factorized"
    loaded = llmshrink.AutoModelForCausalLM.from_pretrained(final)
    ranks = json.loads((final / "config.json").read_text())["llmshrink_factorize"]["ranks"]
    assert ranks and all(isinstance(loaded.get_submodule(n), FactorizedLinear) for n in ranks)


# ----------------------------------------------------------------------------- any size from one score map


def test_direction_importance_is_the_relative_error_curve():
    sigma = torch.tensor([4.0, 2.0, 1.0, 0.5], dtype=torch.float64)
    importance, energy = direction_importance(sigma)
    assert energy == pytest.approx(21.25) and float(importance.sum()) == pytest.approx(1.0)
    torch.testing.assert_close(error_curve(importance, energy), truncation_errors(sigma) / energy)
    torch.testing.assert_close(error_curve(importance, energy, relative=False), truncation_errors(sigma))
    zero, energy = direction_importance(torch.zeros(3, dtype=torch.float64))
    assert energy == 0 and not error_curve(zero, energy).any()


@pytest.fixture(scope="module")
def score_map(tiny):
    model, tokenizer, _ = load_model(tiny["base"])
    return save_score_map(model, FactorizeConfig(), tiny["root"] / "map", calibration=tiny["calib"],
                          tokenizer=tokenizer, nsamples=4, seqlen=32, progress=False)


def cut_in_memory(tiny, config: FactorizeConfig):
    model, _, _ = load_model(tiny["base"])
    return model, factorize(model, config, progress=False)


def test_the_map_holds_the_factors_up_to_break_even_and_every_direction(tiny, score_map):
    meta = json.loads((score_map / "scores.json").read_text())
    assert meta["format"] == "llmshrink-factorize-scores" and meta["version"] == 1 and meta["whiten"]
    assert meta["source"]["sha256"] == tensors_sha256(tiny["base"]) and meta["calibration"]["nsamples"] == 4
    assert len(meta["linears"]) == 3 * 7 and sorted(p.name for p in score_map.iterdir()) == [
        "scores-00000.safetensors", "scores-00001.safetensors", "scores-00002.safetensors", "scores.json"]
    from safetensors.torch import load_file

    tensors = load_file(str(score_map / "scores-00001.safetensors"))
    for name, entry in meta["linears"].items():
        if ".layers.1." not in name:
            continue
        (out, inp), k = entry["shape"], entry["max_rank"]
        assert k == max_saving_rank((out, inp)) and k * (out + inp) < out * inp <= (k + 1) * (out + inp)
        assert tensors[f"{name}.U"].shape == (out, k) and tensors[f"{name}.V"].shape == (k, inp)
        assert tensors[f"{name}.U"].dtype == torch.float32
        importance = tensors[f"{name}.importance"]
        assert importance.shape == (min(out, inp),) and float(importance.sum()) == pytest.approx(1.0)
        assert (importance[:-1] >= importance[1:]).all()  # descending, as the singular values


def test_a_cut_equals_a_run_without_sequential_at_the_same_ratio(tiny, score_map):
    for ratio in (0.8, 0.5):
        dedicated, _, expected = factorized_in_memory(tiny, FactorizeConfig(ratio=ratio, sequential=False))
        cut, record = cut_in_memory(tiny, FactorizeConfig(ratio=ratio, scores=str(score_map)))
        assert record["ranks"] == expected["ranks"] and record["dense"] == expected["dense"]
        assert record["parameters"] == expected["parameters"] and record["scores"] == str(score_map)
        assert record["relative_error"] == pytest.approx(expected["relative_error"], abs=2e-6)
        for name in expected["ranks"]:
            for factor in ("U", "V"):
                torch.testing.assert_close(getattr(cut.get_submodule(name), factor).weight,
                                           getattr(dedicated.get_submodule(name), factor).weight, rtol=0, atol=0)
        torch.testing.assert_close(logits(cut), logits(dedicated), rtol=0, atol=0)


def test_the_cut_factors_are_the_whitened_svd_of_the_measured_inputs(tiny, score_map):
    """Against the math directly: the second moment of layer 0's q_proj inputs (the original
    model's, which every cut uses), its whitened SVD, truncated at the cut's rank."""
    from llmshrink.calibration import resolve_calibration

    model, tokenizer, _ = load_model(tiny["base"])
    calib, _ = resolve_calibration(tokenizer, tiny["calib"], 4, 32, 0)
    captured = []
    layer0 = model.model.layers[0].self_attn.q_proj
    handle = layer0.register_forward_pre_hook(lambda module, args: captured.append(args[0].detach()))
    with torch.no_grad():
        model(calib)
    handle.remove()
    X = torch.cat([x.reshape(-1, x.shape[-1]) for x in captured]).double()
    cut, record = cut_in_memory(tiny, FactorizeConfig(ratio=0.5, scores=str(score_map)))
    name = "model.layers.0.self_attn.q_proj"
    U, V = factorize_weight(layer0.weight, X.T @ X, record["ranks"][name], damp=0.01)
    torch.testing.assert_close(cut.get_submodule(name).U.weight @ cut.get_submodule(name).V.weight,
                               (U @ V).float(), rtol=1e-4, atol=1e-5)


def test_many_ratios_from_one_map_are_monotone_and_meet_each_ratio_without_calibration(tiny, score_map, monkeypatch):
    def no_work(*args, **kwargs):
        raise AssertionError("calibration was read")

    monkeypatch.setattr("llmshrink.factorize.apply.resolve_calibration", no_work)
    sizes = []
    for ratio in (0.95, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4):
        _, record = cut_in_memory(tiny, FactorizeConfig(ratio=ratio, scores=str(score_map)))
        kept, dense = record["parameters"]["kept"], record["parameters"]["dense"]
        assert ratio * dense - 2 * (128 + 64) < kept <= ratio * dense, (ratio, kept, dense)
        sizes.append(kept)
    assert sizes == sorted(sizes, reverse=True) and len(set(sizes)) == len(sizes)
    _, uniform = cut_in_memory(tiny, FactorizeConfig(ratio=0.6, allocate="uniform", scores=str(score_map)))
    assert uniform["parameters"]["kept"] <= 0.6 * uniform["parameters"]["dense"] and uniform["ranks"]


def test_a_cut_folder_loads_in_a_fresh_process_and_merges(tiny, score_map, tmp_path):
    config = FactorizeConfig(ratio=0.6, scores=str(score_map))
    cut, record = cut_in_memory(tiny, config)
    out = llmshrink.compress(tiny["base"], config, tmp_path / "cut", progress=False)
    assert detect(out).name == "factorized"
    assert json.loads((out / "config.json").read_text())["llmshrink_factorize"]["ranks"] == record["ranks"]
    torch.testing.assert_close(fresh_logits(out, IDS, "llmshrink", tmp_path), logits(cut))
    merged = llmshrink.compress(tiny["base"], FactorizeConfig(ratio=0.6, scores=str(score_map), merge=True),
                                tmp_path / "merged", progress=False)
    assert detect(merged).name == "dense"
    torch.testing.assert_close(fresh_logits(merged, IDS, "transformers", tmp_path), logits(cut), rtol=1e-4, atol=1e-4)


def test_save_scores_with_an_output_writes_the_map_and_the_cut_from_it(tiny, score_map, tmp_path):
    out = llmshrink.compress(tiny["base"], FactorizeConfig(ratio=0.7, save_scores=str(tmp_path / "m")),
                             tmp_path / "out", calibration=tiny["calibration"], progress=False)
    from safetensors.torch import load_file

    for name in ("scores-00002.safetensors",):
        fresh, first = load_file(str(tmp_path / "m" / name)), load_file(str(score_map / name))
        assert fresh.keys() == first.keys() and all(torch.equal(fresh[k], first[k]) for k in fresh)
    record = json.loads((out / "config.json").read_text())["llmshrink_factorize"]
    assert record["scores"] == str(tmp_path / "m") and record["config"]["scores"] == str(tmp_path / "m")
    assert record["ranks"] == cut_in_memory(tiny, FactorizeConfig(ratio=0.7, scores=str(score_map)))[1]["ranks"]


def test_a_map_of_another_model_is_refused_by_hash_before_the_model_loads(tiny, score_map, tmp_path, monkeypatch):
    other = save_tiny(tmp_path / "other", layers=3, seed=6)  # same shapes, other weights
    model, _, _ = load_model(other)
    with pytest.raises(UsageError, match=r"was made from .*base \(tensors sha256 [0-9a-f]{16}\.\.\.\), not from "
                                         r".*other \(sha256 [0-9a-f]{16}\.\.\.\); cut it with that model, or score "
                                         r"this one with save_scores"):
        factorize(model, FactorizeConfig(ratio=0.6, scores=str(score_map)))

    def no_work(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr("llmshrink.factorize.method.load_model", no_work)
    with pytest.raises(UsageError, match=r"was made from .*base .*not from .*other"):
        llmshrink.compress(other, FactorizeConfig(ratio=0.6, scores=str(score_map)), tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_the_cli_scores_once_then_cuts(tiny, tmp_path, capsys):
    maps = tmp_path / "map"
    assert cli_main(["factorize", "--model", tiny["base"], "--save-scores", str(maps), "--calib-file", tiny["calib"],
                     "--nsamples", "4", "--calib-seqlen", "32"]) == 0
    assert f"factorize score map written to {maps}" in capsys.readouterr().out
    assert (maps / "scores.json").is_file() and not (tmp_path / "out").exists()
    for ratio in ("0.9", "0.6"):
        out = tmp_path / f"cut-{ratio}"
        assert cli_main(["factorize", "--model", tiny["base"], "--scores", str(maps), "--ratio", ratio,
                         "--out", str(out)]) == 0
        assert "factorize output written to" in capsys.readouterr().out
        record = json.loads((out / "config.json").read_text())["llmshrink_factorize"]
        assert record["scores"] == str(maps) and record["parameters"]["ratio"] <= float(ratio)


@pytest.mark.parametrize("args, message", [
    ("--scores {map} --ratio 0 --out o", r"ratio=0.0 is outside (0, 1]"),
    ("--scores {map} --ratio 1.5 --out o", r"ratio=1.5 is outside (0, 1]"),
    ("--scores {map} --ratio 0.01 --out o", "ratio=0.01 is below what rank 1 everywhere holds"),
    ("--scores {root}/nowhere --out o", "score map {root}/nowhere does not exist; write one with `llmshrink "
                                        "factorize --model MODEL --save-scores {root}/nowhere`"),
    ("--scores {root} --out o", "is not a score map (it has no scores.json)"),
    ("--scores {v2} --out o", "has format version 2; this llmshrink reads version 1: upgrade llmshrink"),
    ("--scores {v0} --out o", "has format version 0; this llmshrink reads version 1: score the model again"),
    ("--scores {map} --save-scores m2 --out o", "cuts from a map and save_scores='m2' measures one"),
    ("--scores {map} --no-whiten --out o", "was measured with whiten=True, and a cut takes the map's; "
                                           "whiten=False contradicts it"),
    ("--scores {map} --damp 0.1 --out o", "was measured with damp=0.01"),
    ("--scores {mlp} --out o", "holds no scores for model.layers.0.self_attn.q_proj (it was measured with "
                               "targets='mlp'); give targets='mlp'"),
    ("--scores {map} --calib-file {calib} --out o", "reads no calibration text; drop --calib-file"),
    ("--ratio 0.5", "factorize needs --out, the folder to write"),
    ("--save-scores {map}", "exists and is not empty; choose another --save-scores or pass --overwrite"),
])
def test_bad_score_map_input_is_one_line_before_any_work(tiny, score_map, tmp_path, monkeypatch, capsys, args,
                                                          message):
    import shutil

    for name, version in (("v2", 2), ("v0", 0)):
        shutil.copytree(score_map, tmp_path / name)
        meta = json.loads((tmp_path / name / "scores.json").read_text())
        (tmp_path / name / "scores.json").write_text(json.dumps({**meta, "version": version}))
    shutil.copytree(score_map, tmp_path / "mlp")
    meta = json.loads((tmp_path / "mlp" / "scores.json").read_text())
    meta.update(targets="mlp", linears={n: e for n, e in meta["linears"].items() if ".mlp." in n})
    (tmp_path / "mlp" / "scores.json").write_text(json.dumps(meta))

    def no_work(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr("llmshrink.factorize.method.load_model", no_work)
    monkeypatch.chdir(tmp_path)
    names = {"map": score_map, "root": tmp_path, "v2": tmp_path / "v2", "v0": tmp_path / "v0",
             "mlp": tmp_path / "mlp", "calib": tiny["calib"]}
    assert cli_main(["factorize", "--model", tiny["base"], *args.format(**names).split()]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message.format(**names) in err, err
    assert not (tmp_path / "o").exists() and not (tmp_path / "m2").exists()


def test_a_recipe_cuts_from_a_map_without_calibration(tiny, score_map, tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(f"model: {tiny['base']}\nsteps:\n  - {{method: factorize, scores: {score_map}, ratio: 0.7}}\n"
                    f"out: {tmp_path / 'run'}\n")  # no calibration block: a cut reads none
    state = run_recipe(load_recipe(path), progress=False)
    final = tmp_path / "run" / state["final"]
    record = json.loads((final / "config.json").read_text())["llmshrink_factorize"]
    assert detect(final).name == "factorized" and record["scores"] == str(score_map)
    assert record["ranks"] == cut_in_memory(tiny, FactorizeConfig(ratio=0.7, scores=str(score_map)))[1]["ranks"]


# ----------------------------------------------------------------------------- healing a factorized model

def test_heal_trains_lora_on_both_factors_and_merges_into_a_factorized_folder(tiny, tmp_path):
    from llmshrink.heal import HealConfig, heal

    model, tokenizer, record = factorized_in_memory(tiny, FactorizeConfig(ratio=0.6))
    source = save_factorized(model, tokenizer, tmp_path / "f")
    config = HealConfig(steps=3, seqlen=32, batch_size=2, rank=4, lora_alpha=8, warmup=1, nsamples=8, lr=1e-2,
                        calibration=tiny["calib"])
    adapter = heal(source, config, tmp_path / "adapter", teacher=tiny["base"], progress=False)
    merged = heal(source, dataclasses.replace(config, merge=True), tmp_path / "merged",
                  teacher=tiny["base"], progress=False)
    names = set(json.loads((adapter / "adapter_config.json").read_text())["target_modules"])
    assert {"U", "V"} <= names  # the factors are the LoRA targets, not the dense linear they replaced
    assert detect(merged).name == "factorized"
    stored = json.loads((merged / "config.json").read_text())["llmshrink_factorize"]["ranks"]
    assert stored == record["ranks"]  # merging LoRA into U and V keeps each rank
    healed = fresh_logits(adapter, IDS, "llmshrink", tmp_path)
    assert not torch.allclose(healed, logits(model), atol=1e-4)  # it trained
    torch.testing.assert_close(fresh_logits(merged, IDS, "llmshrink", tmp_path), healed, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(fresh_logits(merged, IDS, "transformers+llmshrink.factorize", tmp_path), healed,
                               atol=1e-4, rtol=1e-4)


def test_a_full_heal_trains_the_factors_and_writes_a_factorized_folder(tiny, tmp_path):
    from llmshrink.heal import HealConfig, heal

    model, tokenizer, record = factorized_in_memory(tiny, FactorizeConfig(ratio=0.6))
    source = save_factorized(model, tokenizer, tmp_path / "f")
    config = HealConfig(adapter="full", steps=3, seqlen=32, batch_size=2, warmup=1, nsamples=8, lr=1e-3,
                        calibration=tiny["calib"])
    out = heal(source, config, tmp_path / "full", teacher=tiny["base"], progress=False)
    assert detect(out).name == "factorized"
    assert json.loads((out / "config.json").read_text())["llmshrink_factorize"]["ranks"] == record["ranks"]
    healed = fresh_logits(out, IDS, "llmshrink", tmp_path)
    assert not torch.allclose(healed, logits(model), atol=1e-4)  # it trained
    torch.testing.assert_close(fresh_logits(out, IDS, "transformers+llmshrink.factorize", tmp_path), healed)


def test_a_recipe_heals_a_factorized_step_and_keeps_it_factorized(tiny, tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(f"model: {tiny['base']}\nseed: 0\ncalibration: {{source: {tiny['calib']}, nsamples: 4, seqlen: 32}}\n"
                    "steps:\n  - {method: factorize, ratio: 0.7}\n"
                    f"  - {{method: heal, steps: 2, seqlen: 32, batch_size: 2, rank: 4, nsamples: 8, warmup: 1, "
                    f"calibration: {tiny['calib']}, merge: true}}\nout: {tmp_path / 'run'}\n")
    state = run_recipe(load_recipe(path), progress=False)
    assert [s["kind"] for s in state["steps"]] == ["factorized", "factorized"]
    assert detect(tmp_path / "run" / state["final"]).name == "factorized"


def test_gptq_quantizes_both_factors_and_the_checkpoint_loads_in_a_fresh_process(tiny, tmp_path):
    """GPTQ sees each factorized linear as its two factors (V with its step, U a step of its own),
    pads the rank with zeros to what 4-bit packing needs, and writes a GPTQ folder that llmshrink
    and transformers after `import llmshrink` load with the same logits."""
    from safetensors import safe_open

    from llmshrink import GPTQConfig

    model, tokenizer, record = factorized_in_memory(tiny, FactorizeConfig(ratio=0.6))
    source = save_factorized(model, tokenizer, tmp_path / "f")
    out = llmshrink.quantize(str(source), GPTQConfig(bits=4, group_size=32), tmp_path / "q", calibration=tiny["calib"],
                             nsamples=4, seqlen=32, progress=False)
    assert detect(out).name == "quantized"
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    stored = qc["llmshrink"]["factorized"]["ranks"]
    assert set(stored) == set(record["ranks"])
    assert all(stored[n] % 8 == 0 and 0 <= stored[n] - r < 8 for n, r in record["ranks"].items())
    assert qc["llmshrink"]["vllm_servable"] is False and "low-rank factors" in qc["llmshrink"]["vllm_limit"]
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    for name in record["ranks"]:
        assert {f"{name}.V.qweight", f"{name}.U.qweight"} <= keys and not any(k.startswith(f"{name}.weight") for k in keys)
    loaded = llmshrink.AutoModelForCausalLM.from_pretrained(out)  # the default load dtype, as the fresh loads
    name = next(iter(record["ranks"]))
    module = loaded.get_submodule(name)
    assert isinstance(module, FactorizedLinear) and module.rank == stored[name]
    dense = model.get_submodule(name)
    V = module.V.dequantized_weight().float()
    assert V.shape == (stored[name], dense.in_features)
    assert (V[record["ranks"][name]:] == 0).all()  # the padded rows stay zero
    expected = logits(loaded)
    torch.testing.assert_close(fresh_logits(out, IDS, "llmshrink", tmp_path), expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(fresh_logits(out, IDS, "transformers+llmshrink", tmp_path), expected, atol=1e-4,
                               rtol=1e-4)
    # 4-bit factors stay close to the factorized model: far closer than the factorized model is to random logits
    factorized = logits(model)
    err = (expected.float() - factorized).norm() / factorized.norm()
    assert err < 0.25 * ((factorized - factorized.roll(1, dims=-1)).norm() / factorized.norm())


def test_gptq_on_a_factorized_folder_refuses_what_needs_dense_linears(tiny, tmp_path, capsys):
    model, tokenizer, _ = factorized_in_memory(tiny, FactorizeConfig(ratio=0.6))
    source = save_factorized(model, tokenizer, tmp_path / "f")
    capsys.readouterr()
    assert cli_main(["quantize", "--model", str(source), "--calib-file", tiny["calib"], "--nsamples", "4",
                     "--calib-seqlen", "32", "--target-bits", "4", "--out", str(tmp_path / "q")]) == 2
    assert cli_main(["quantize", "--model", str(source), "--bits", "4", "--rotate", "hadamard", "--out",
                     str(tmp_path / "q")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "is factorized: give --bits, or quantize a merged model" in err[-2]
    assert "rotates dense linears" in err[-1] and "is factorized: quantize it without rotate" in err[-1]
    assert not (tmp_path / "q").exists()
