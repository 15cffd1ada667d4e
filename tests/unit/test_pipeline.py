"""Pipelines (`llmshrink run`) on a tiny Llama folder: recipe validation with file:line, the run
folder, the final model's recipe record, the report, and --resume after a crash."""

import dataclasses
import json
import logging
import textwrap
from pathlib import Path

import pytest
import torch
import yaml

import llmshrink
from llmshrink.cli import main as cli_main
from llmshrink.methods import METHODS, config_from_dict
from llmshrink.evals.data import corpus_documents
from llmshrink.pipeline import RecipeError, load_recipe, run_recipe
from llmshrink.pipeline.run import RECIPE_FILE, STATE_FILE

from conftest import save_tiny

IDS = torch.randint(1, 97, (2, 24), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    model = save_tiny(root / "tiny", layers=3, seed=3)
    calib = root / "calib.txt"
    calib.write_text("\n\n".join(corpus_documents("wiki")[-40:]))
    return {"root": root, "model": str(model), "calib": str(calib)}


def write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text).lstrip())
    return path


def recipe_text(tiny, out, steps: str, evaluate: str = "") -> str:
    return (f"model: {tiny['model']}\nseed: 0\ncalibration: {{source: {tiny['calib']}, nsamples: 4, seqlen: 32}}\n"
            f"steps:\n{textwrap.dedent(steps)}{evaluate}out: {out}\n")


def logits(model):
    with torch.no_grad():
        return model(IDS).logits


# ----------------------------------------------------------------------------- validation, before any work

@pytest.mark.parametrize("body, message", [
    ("steps:\n  - method: gptq\n    bitz: 3\n", r"r\.yaml:4: steps\[0\] \(gptq\): unknown key 'bitz'; did you mean 'bits'\?"),
    ("steps:\n  - method: gptq\n    bits: 5\n", r"r\.yaml:4: steps\[0\] \(gptq\): bits=5 is not supported"),
    ("steps:\n  - method: gptq\n    bits: four\n", r"r\.yaml:4: steps\[0\] \(gptq\): bits='four' should be int"),
    ("steps:\n  - method: gptq\n    damp_percent: 1e-2\n", r"r\.yaml:4: .*should be float \(YAML reads '1e-2' as text; "
                                                          r"write 0\.01\)"),
    ("steps:\n  - method: gtpq\n", r"r\.yaml:3: steps\[0\]: unknown method 'gtpq'; did you mean 'gptq'\?"),
    ("steps:\n  - bits: 4\n", r"r\.yaml:3: steps\[0\] needs a 'method' key"),
    ("stepz: []\n", r"r\.yaml:2: unknown key 'stepz'; did you mean 'steps'\?"),
    ("steps:\n  - {method: gptq}\n  - {method: weight_prune, score: magnitude}\n",
     r"r\.yaml:4: steps\[1\] \(weight_prune\) cannot follow steps\[0\] \(gptq\): it needs full-precision weights"),
    ("steps:\n  - {method: rtn, clip_search: false}\n  - {method: pack}\n  - {method: rtn, clip_search: false}\n",
     r"r\.yaml:5: steps\[2\] \(rtn\) follows pack; pack must be the last step"),
    ("steps:\n  - {method: gptq}\n  - {method: heal, merge: true}\n", r"r\.yaml:4: .*cannot merge into packed weights"),
    ("steps:\n  - {method: layer_prune, criterion: last}\n  - {method: heal}\n  - {method: gptq}\n",
     r"r\.yaml:5: steps\[2\] \(gptq\) follows a heal step that writes an adapter; set merge: true"),
    ("steps:\n  - {method: gptq}\nevaluate: {tasks: [wiki, piqq]}\n", r"r\.yaml:4: evaluate: unknown task 'piqq'"),
    ("steps:\n  - {method: gptq}\nevaluate: {limit: 0}\n", r"r\.yaml:4: evaluate: limit=0 selects nothing"),
    ("steps:\n  - method: gptq\n   bits: 4\n", r"r\.yaml:4: not valid YAML"),
    ("steps:\n  - {method: weight_prune, score: magnitude, pattern: 2:4}\n",
     r"r\.yaml:3: .*pattern=124 should be str \(quote it"),
    ("steps:\n  - {method: finetune}\n  - {method: layer_prune, criterion: last}\n  - {method: delta}\n",
     r"r\.yaml:5: steps\[2\] \(delta\) .* an earlier layer_prune changed the architecture"),
    ("steps:\n  - {method: gptq}\nevaluate: {dtype: float8}\n", r"r\.yaml:4: evaluate: dtype 'float8' is unknown"),
])
def test_bad_recipes_fail_with_file_and_line(tmp_path, body, message):
    path = write(tmp_path / "r.yaml", "model: smollm2-135m\n" + body + f"out: {tmp_path / 'x'}\n"
                 "calibration: {source: wiki}\n")
    with pytest.raises(RecipeError, match=message):
        load_recipe(path)
    assert not (tmp_path / "x").exists()  # validation writes nothing


def test_a_step_that_needs_calibration_without_any_is_refused(tmp_path):
    path = write(tmp_path / "r.yaml", """
        model: smollm2-135m
        steps:
          - {method: layer_prune, criterion: last}
          - {method: weight_prune, score: wanda}
        out: x
    """)
    with pytest.raises(RecipeError, match=r"r\.yaml:4: steps\[1\] \(weight_prune\) needs calibration text but the "
                                          r"recipe has none; add 'calibration: \{source: wiki"):
        load_recipe(path)
    assert load_recipe(path, ["steps.1.score=magnitude"]).steps[1].score == "magnitude"  # magnitude needs none


def test_heal_as_first_step_warns_and_overrides_apply(tmp_path, caplog):
    path = write(tmp_path / "r.yaml", """
        model: smollm2-135m
        calibration: {source: wiki, nsamples: 128, seqlen: 512}
        steps:
          - {method: heal, loss: ce, merge: true}
          - {method: gptq, bits: 4}
        out: x
    """)
    with caplog.at_level(logging.WARNING):
        recipe = load_recipe(path, ["steps.1.bits=3", "calibration.nsamples=8", "steps.0.lr=0.01"])
    assert "r.yaml:4: steps[0] (heal) is the first step" in caplog.text
    assert recipe.steps[1].bits == 3 and recipe.calibration.nsamples == 8 and recipe.steps[0].lr == 0.01
    with pytest.raises(RecipeError, match=r"--set steps\.5\.bits=3: steps\.5 does not exist \(the list has 2"):
        load_recipe(path, ["steps.5.bits=3"])
    with pytest.raises(RecipeError, match=r"--set steps\.1\.bitz=3: steps\[1\] \(gptq\): unknown key 'bitz'"):
        load_recipe(path, ["steps.1.bitz=3"])
    with pytest.raises(RecipeError, match="write it as KEY=VALUE"):
        load_recipe(path, ["steps.1.bits"])


def test_recipe_steps_are_the_configs_to_dict_form(tmp_path):
    path = write(tmp_path / "r.yaml", """
        model: smollm2-135m
        calibration: {source: wiki}
        steps:
          - {method: layer_prune, layers: 2, criterion: angular}
          - {method: weight_prune, sparsity: 0.5, pattern: "2:4"}
          - {method: rtn, bits: 8, version: 1}
          - {method: pack, level: 3}
        out: x
    """)
    recipe = load_recipe(path)
    for step in recipe.steps:
        assert config_from_dict(step.to_dict()) == step
    again = write(tmp_path / "again.yaml", yaml.safe_dump(recipe.to_dict()))  # the recipe re-reads itself
    assert load_recipe(again).to_dict() == recipe.to_dict()


def test_cli_dry_run_prints_the_plan_and_errors_are_one_line(tmp_path, capsys):
    path = write(tmp_path / "r.yaml", """
        model: smollm2-135m
        calibration: {source: wiki, nsamples: 16, seqlen: 256}
        steps:
          - {method: gptq, bits: 3}
        out: OUT
    """)
    assert cli_main(["run", str(path), "--dry-run", "--set", f"out={tmp_path / 'o'}"]) == 0
    printed = capsys.readouterr().out
    assert "1. gptq" in printed and "bits=3" in printed and "16 x 256 tokens" in printed and "dry run" in printed
    assert not (tmp_path / "o").exists()
    assert cli_main(["run", str(path), "--dry-run", "--set", "steps.0.bits=7"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "bits=7 is not supported" in err


# ----------------------------------------------------------------------------- running

def test_prune_prune_quantize_pack_run_writes_model_record_and_report(tiny):
    out = tiny["root"] / "run"
    path = write(tiny["root"] / "run.yaml", recipe_text(tiny, out, """
        - {method: layer_prune, layers: 1, criterion: block_influence}
        - {method: weight_prune, sparsity: 0.5, score: wanda}
        - {method: rtn, bits: 4, group_size: 16, clip_search: false}
        - {method: pack}
    """, "evaluate: {tasks: [wiki], limit: 2, seqlen: 32, gen_tokens: 2, every_step: true}\n"))
    recipe = load_recipe(path)
    state = run_recipe(recipe, progress=False)

    names = ["01-layer_prune", "02-weight_prune", "03-rtn", "04-pack"]
    assert sorted(p.name for p in (out / "steps").iterdir()) == names
    assert {"run.json", "report.md", "report.json", "pareto.png", "model"} <= {p.name for p in out.iterdir()}
    assert not list(out.rglob(".*.tmp-*"))
    final = llmshrink.AutoModelForCausalLM.from_pretrained(out / "model")
    assert final.config.num_hidden_layers == 2
    torch.testing.assert_close(logits(final), logits(llmshrink.AutoModelForCausalLM.from_pretrained(out / "steps" / names[2])))

    record = json.loads((out / "model" / RECIPE_FILE).read_text())
    assert record["recipe"] == recipe.to_dict() and record["seed"] == 0
    assert [s["method"] for s in record["steps"]] == ["layer_prune", "weight_prune", "rtn", "pack"]
    assert {"llmshrink", "torch", "transformers"} <= set(record["versions"])

    report = json.loads((out / "report.json").read_text())
    assert list(report["evals"]) == ["original", "1. layer_prune", "2. weight_prune", "3. rtn", "4. pack"]
    sizes = {k: v["stats"]["size_mb"] for k, v in report["evals"].items()}
    assert sizes["3. rtn"] < sizes["2. weight_prune"] < sizes["original"] and sizes["4. pack"] < sizes["3. rtn"]
    stages = [report["original_weight_bytes"]] + [s["weight_bytes"] for s in report["steps"]]  # evaluated or not
    assert [round(b / 2**20, 6) for b in stages] == [round(v, 6) for v in sizes.values()]
    ppl = {k: v["results"]["wiki"]["ppl"] for k, v in report["evals"].items()}
    assert ppl["4. pack"] == pytest.approx(ppl["3. rtn"], rel=1e-5)  # lossless
    md = (out / "report.md").read_text()
    assert "| metric | original | 4. pack | delta |" in md and "| step | method | seconds | weights (MB) | output |" in md and "![perplexity against size](pareto.png)" in md
    assert (out / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert state["final"] == "model"


def test_resume_after_a_crash_keeps_finished_steps(tiny, monkeypatch):
    out = tiny["root"] / "crash"
    path = write(tiny["root"] / "crash.yaml", recipe_text(tiny, out, """
        - {method: layer_prune, layers: 1, criterion: last}
        - {method: weight_prune, sparsity: 0.5, score: magnitude}
        - {method: rtn, bits: 4, group_size: 16, clip_search: false}
    """))
    calls = []
    real = {name: METHODS[name] for name in ("layer_prune", "weight_prune", "rtn")}

    def counting(name, crash=False):  # the registered method, counted (and crashing on request)
        def run(*args, **kwargs):
            calls.append(name)
            if crash:
                raise KeyboardInterrupt
            return real[name].run(*args, **kwargs)
        return dataclasses.replace(real[name], run=run)

    monkeypatch.setitem(METHODS, "layer_prune", counting("layer_prune"))
    monkeypatch.setitem(METHODS, "weight_prune", counting("weight_prune"))
    monkeypatch.setitem(METHODS, "rtn", counting("rtn", crash=True))
    with pytest.raises(KeyboardInterrupt, match="finished steps are kept in .*--resume to continue"):
        run_recipe(load_recipe(path), progress=False)
    state = json.loads((out / STATE_FILE).read_text())
    assert [s["method"] for s in state["steps"]] == ["layer_prune", "weight_prune"]
    assert not (out / "steps" / "03-rtn").exists() and not (out / "model").exists()
    with pytest.raises(llmshrink.UsageError, match="holds an earlier run; pass --resume to continue it"):
        run_recipe(load_recipe(path), progress=False)
    with pytest.raises(llmshrink.UsageError, match="is not an llmshrink run folder"):  # --overwrite spares it
        run_recipe(load_recipe(path, [f"out={tiny['root']}"]), overwrite=True, progress=False)
    assert Path(tiny["model"]).is_dir()

    monkeypatch.setitem(METHODS, "rtn", counting("rtn"))
    calls.clear()
    run_recipe(load_recipe(path), resume=True, progress=False)
    assert calls == ["rtn"]
    assert (out / "model" / "quantize_config.json").is_file()

    calls.clear()  # a changed step runs again from there on
    run_recipe(load_recipe(path, ["steps.1.sparsity=0.25"]), resume=True, progress=False)
    assert calls == ["weight_prune", "rtn"]
    with pytest.raises(llmshrink.UsageError, match="the recipe's seed changed"):
        run_recipe(load_recipe(path, ["seed=1"]), resume=True, progress=False)
    with pytest.raises(llmshrink.UsageError, match="nothing to resume"):
        run_recipe(load_recipe(path, [f"out={tiny['root'] / 'never'}"]), resume=True, progress=False)
    config = Path(tiny["model"]) / "config.json"  # the source model changed since the run began
    config.write_text(config.read_text() + "\n")
    with pytest.raises(llmshrink.UsageError, match="the recipe's model config.json has changed since the run began"):
        run_recipe(load_recipe(path), resume=True, progress=False)
