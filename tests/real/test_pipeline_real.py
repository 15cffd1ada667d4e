"""The three shipped recipes run end to end on the default model, shortened by --set overrides."""

import json
from pathlib import Path

import pytest
import yaml

import llmshrink
from llmshrink.cli import main as cli_main
from llmshrink.hub import model_card

pytestmark = pytest.mark.real

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
SHORT_EVAL = ["evaluate.tasks=[wiki, piqa]", "evaluate.limit=4", "evaluate.seqlen=256", "evaluate.gen_tokens=4",
              "evaluate.every_step=false"]


def run(recipe: str, out: Path, *overrides: str) -> dict:
    args = ["run", str(RECIPES / recipe), "--no-progress", "--set", f"out={out}"]
    for o in [*overrides, *SHORT_EVAL]:
        args += ["--set", o]
    assert cli_main(args) == 0
    return json.loads((out / "report.json").read_text())


def test_quickstart_quantizes_evaluates_and_writes_a_report_and_card(real_model, tmp_path, capsys):
    report = run("quickstart.yaml", tmp_path / "qs", "calibration.nsamples=8", "calibration.seqlen=256")
    printed = capsys.readouterr().out
    assert "original" in printed and "1. gptq" in printed and "size on disk (MB)" in printed
    original, final = report["evals"]["original"], report["evals"]["1. gptq"]
    assert final["stats"]["size_mb"] < 0.3 * original["stats"]["size_mb"]
    assert final["results"]["wiki"]["ppl"] < 1.6 * original["results"]["wiki"]["ppl"]
    for name in ("report.md", "pareto.png", "model/llmshrink_recipe.json", "model/llmshrink_eval.json"):
        assert (tmp_path / "qs" / name).is_file(), name
    card = model_card(tmp_path / "qs" / "model", "me/smollm2-135m-gptq-4bit")
    meta = yaml.safe_load(card.split("---")[1])
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and meta["library_name"] == "transformers"
    assert {"llmshrink", "gptq", "4-bit"} <= set(meta["tags"]) and meta["pipeline_tag"] == "text-generation"
    assert "| metric | original | 1. gptq | delta |" in card and "vllm serve me/smollm2-135m-gptq-4bit" in card


def test_prune_heal_quantize_recipe(real_model, tmp_path):
    report = run("prune-heal-quantize.yaml", tmp_path / "phq", "steps.0.layers=2", "steps.1.steps=2",
                 "steps.1.nsamples=8", "steps.1.seqlen=64", "calibration.nsamples=8", "calibration.seqlen=256")
    assert [s["method"] for s in report["steps"]] == ["layer_prune", "heal", "gptq"]
    from llmshrink.gptq.linear import QuantLinear

    model = llmshrink.AutoModelForCausalLM.from_pretrained(tmp_path / "phq" / "model")
    assert model.config.num_hidden_layers == real_model[0].config.num_hidden_layers - 2
    quant = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert len(quant) == 7 * model.config.num_hidden_layers and {m.bits for m in quant} == {4}


def test_finetune_delta_recipe(real_model, tmp_path):
    report = run("finetune-delta.yaml", tmp_path / "fd", "steps.0.steps=2", "steps.0.seqlen=64",
                 "steps.0.eval_seqlen=128", "steps.0.eval_windows=2")
    assert [s["method"] for s in report["steps"]] == ["finetune", "delta"]
    final = report["evals"]["2. delta"]
    assert final["stats"]["size_mb"] < 0.2 * report["evals"]["original"]["stats"]["size_mb"]
    assert (tmp_path / "fd" / "model" / "delta.safetensors").is_file()
