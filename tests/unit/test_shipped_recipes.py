"""Every YAML pipeline in recipes/ is valid as shipped, and the method recipes run end to end
(`llmshrink run`'s code) on a tiny model, shrunk by --set overrides only."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

import llmshrink
from conftest import tiny_with_calibration
from llmshrink.pipeline import load_recipe, run_recipe

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
# the pipelines (heal_lora.yaml and heal_qlora.yaml are recipes/heal.py's configs, not pipelines)
SHIPPED = sorted(p for p in RECIPES.glob("*.yaml") if isinstance(yaml.safe_load(p.read_text()).get("steps"), list))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_with_calibration(tmp_path_factory.mktemp("recipes"))


def test_the_method_recipes_are_shipped():
    names = {p.name for p in SHIPPED}
    assert {"quickstart.yaml", "prune-heal-quantize.yaml", "finetune-delta.yaml", "deep_compression.yaml",
            "factorize-gptq.yaml", "width-prune-heal.yaml", "gradual-prune.yaml"} <= names


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_each_shipped_recipe_is_valid_as_written(path, tmp_path):
    written = [step["method"] for step in yaml.safe_load(path.read_text())["steps"]]
    recipe = load_recipe(path, overrides=[f"out={tmp_path / 'run'}"])
    assert [step.to_dict()["method"] for step in recipe.steps] == written


def run(tiny, name: str, tmp_path: Path, *sets: str) -> tuple[dict, Path]:
    out = tmp_path / "run"
    base = [f"model={tiny['base']}", f"out={out}", f"calibration.source={tiny['calib']}", "calibration.nsamples=4",
            "calibration.seqlen=32", "evaluate=null"]
    state = run_recipe(load_recipe(RECIPES / name, overrides=base + list(sets)), progress=False)
    return state, out / state["final"]


def ids() -> torch.Tensor:
    return torch.arange(2 * 16).reshape(2, 16) % 97


def test_factorize_gptq_recipe_writes_quantized_factors_that_load(tiny, tmp_path):
    state, final = run(tiny, "factorize-gptq.yaml", tmp_path, "steps.1.group_size=16")
    assert [(s["method"], s["kind"]) for s in state["steps"]] == [("factorize", "factorized"), ("gptq", "quantized")]
    model = llmshrink.AutoModelForCausalLM.from_pretrained(final)
    with torch.no_grad():
        assert torch.isfinite(model(ids()).logits).all()


def test_width_prune_heal_recipe_writes_a_smaller_plain_checkpoint(tiny, tmp_path):
    heal = [f"steps.1.{kv}" for kv in ("steps=2", "seqlen=32", "batch_size=2", "rank=4", "lora_alpha=8", "nsamples=4",
                                       f"calibration={tiny['calib']}", "eval_docs=2", "eval_seqlen=32", "eval_windows=1")]
    state, final = run(tiny, "width-prune-heal.yaml", tmp_path, "steps.0.multiple=16", *heal)
    assert [(s["method"], s["kind"]) for s in state["steps"]] == [("width_prune", "dense"), ("heal", "dense")]
    config = json.loads((final / "config.json").read_text())
    assert config["intermediate_size"] == config["llmshrink_width_prune"]["widths"]["intermediate_size"] < 128
    import transformers  # a plain checkpoint: transformers alone loads it

    with torch.no_grad():
        assert torch.isfinite(transformers.AutoModelForCausalLM.from_pretrained(final)(ids()).logits).all()


def test_gradual_prune_recipe_reaches_its_sparsity_in_its_rounds(tiny, tmp_path):
    state, final = run(tiny, "gradual-prune.yaml", tmp_path, "steps.0.heal_steps=3")
    record = json.loads((final / "config.json").read_text())["llmshrink_prune"]
    assert len(record["rounds"]) == 3 and sum(r["steps_done"] for r in record["rounds"]) == 3
    assert record["sparsity"] == pytest.approx(0.6, abs=0.02)
