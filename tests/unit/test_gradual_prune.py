"""Gradual weight pruning: prune -> heal rounds, the mask kept through merged healing, rewinding."""

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llmshrink import UsageError, WeightPruneConfig
from llmshrink.heal import RECORD
from llmshrink.prune import gradual, gradual_prune, prune

from conftest import tiny_llama, tiny_with_calibration


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_with_calibration(tmp_path_factory.mktemp("gradual"))


def linears(folder) -> dict[str, torch.Tensor]:
    weights = load_file(str(Path(folder) / "model.safetensors"))
    return {k: v for k, v in weights.items() if ".layers." in k and k.endswith("proj.weight")}


def fake_heal(calls):
    """heal() stand-in: record the student's weights, then 'merge' a dense update into every weight."""
    def heal(student, config, out, teacher=None, overwrite=False, progress=True):
        calls.append({"student": linears(student), "steps": config.steps, "teacher": teacher, "config": config})
        shutil.copytree(student, out, dirs_exist_ok=True)
        weights = load_file(str(Path(out) / "model.safetensors"))
        from safetensors.torch import save_file
        save_file({k: v + 0.01 for k, v in weights.items()}, str(Path(out) / "model.safetensors"),
                  metadata={"format": "pt"})
        (Path(out) / RECORD).write_text(json.dumps({"steps_done": config.steps, "train_seconds": 0.0, "loss_first": 1.0,
                                                   "loss_last": 0.5}))
        return Path(out)
    return heal


def test_schedules_end_at_the_sparsity_and_split_the_steps():
    c = WeightPruneConfig(sparsity=0.6, rounds=3, heal_steps=10)
    assert c.round_sparsities() == pytest.approx([0.6 * (1 - (2 / 3) ** 3), 0.6 * (1 - (1 / 3) ** 3), 0.6])
    assert WeightPruneConfig(sparsity=0.6, rounds=3, schedule="linear").round_sparsities() == pytest.approx([0.2, 0.4, 0.6])
    assert c.round_steps() == [3, 3, 4] and sum(c.round_steps()) == 10
    assert not WeightPruneConfig().gradual() and WeightPruneConfig(heal_steps=4).gradual()
    assert WeightPruneConfig().learning_rate() == 1e-3 and WeightPruneConfig(heal_method="full").learning_rate() == 1e-4
    assert WeightPruneConfig(heal_method="full", heal_lr=3e-5).learning_rate() == 3e-5


@pytest.mark.parametrize("kw,message", [
    (dict(rounds=0), "rounds=0 is not a positive whole number"),
    (dict(heal_steps=-1), "heal_steps=-1 is not a whole number >= 0"),
    (dict(rounds=3, heal_steps=2), "leaves a round of 3 without healing"),
    (dict(rewind=True), "heal_steps=0 heals nothing"),
    (dict(schedule="exp"), "schedule='exp' is not known"),
    (dict(pattern="2:4", rounds=2), "cannot be reached in rounds"),
    (dict(heal_steps=2, heal_lr=0), "heal_lr=0 does not train"),
    (dict(heal_steps=2, heal_method="dora"), "heal_method='dora' is not known"),
])
def test_bad_schedules_are_one_line_errors(kw, message):
    with pytest.raises(UsageError, match=message):
        WeightPruneConfig(**kw).validate()


def test_in_memory_prune_points_to_the_folder_api():
    with pytest.raises(UsageError, match="gradual_prune"):
        prune(tiny_llama(), WeightPruneConfig(rounds=2), calibration=torch.zeros(2, 8, dtype=torch.long))


@pytest.mark.parametrize("rewind", [False, True])
def test_rounds_grow_one_mask_keep_it_through_merges_and_rewind(tiny, tmp_path, monkeypatch, rewind):
    calls = []
    monkeypatch.setattr(gradual, "heal", fake_heal(calls))
    config = WeightPruneConfig(sparsity=0.5, rounds=3, heal_steps=6, rewind=rewind)
    out = gradual_prune(tiny["base"], config, tmp_path / "out", calibration=tiny["calib"], nsamples=4, seqlen=32,
                        progress=False)
    record = json.loads((out / "config.json").read_text())["llmshrink_prune"]
    assert [r["sparsity"] for r in record["rounds"]] == pytest.approx(config.round_sparsities(), abs=0.02)
    assert [c["steps"] for c in calls] == [2, 2, 2] and all(c["teacher"] == tiny["base"] for c in calls)
    final, base = linears(out), linears(tiny["base"])
    for name, w in final.items():
        zeros = w == 0
        assert zeros.float().mean().item() == pytest.approx(0.5, abs=0.02)
        for c in calls:  # each round's zeros are still zeros: the mask only grew
            assert zeros[c["student"][name] == 0].all()
        kept = calls[-1]["student"][name] != 0
        if rewind:  # the last round healed the input's own weights under the final mask
            torch.testing.assert_close(calls[-1]["student"][name][kept], base[name][kept])
            torch.testing.assert_close(w[kept], base[name][kept] + 0.01)
        else:  # three merged updates on the survivors
            torch.testing.assert_close(w[kept], base[name][kept] + 0.03)


def test_cli_heals_for_real_and_one_shot_is_the_same_code(tiny, tmp_path, capsys):
    from llmshrink.cli import main

    args = ["prune", "--model", tiny["base"], "--sparsity", "0.5", "--calib-file", tiny["calib"], "--nsamples", "4",
            "--calib-seqlen", "32", "--heal-steps", "2"]
    assert main(args + ["--rounds", "2", "--out", str(tmp_path / "gradual")]) == 0
    assert "in 2 round(s)" in capsys.readouterr().out
    assert main(args + ["--heal-method", "full", "--out", str(tmp_path / "oneshot")]) == 0
    for folder, method in (("gradual", "lora"), ("oneshot", "full")):
        record = json.loads((tmp_path / folder / "config.json").read_text())["llmshrink_prune"]
        assert record["config"]["heal_method"] == method
        # train_seconds rounds to 0.0 on a fast machine: count the steps the healer says it took instead
        assert sum(row["steps_done"] for row in record["rounds"]) == 2
        assert all(row["steps_done"] == row["heal_steps"] and row["loss_last"] is not None for row in record["rounds"])
        for w in linears(tmp_path / folder).values():
            assert (w == 0).float().mean().item() == pytest.approx(0.5, abs=0.02)
    assert main(["prune", "--model", tiny["base"], "--layers", "1", "--rounds", "2", "--out", str(tmp_path / "x")]) == 2
    assert "with --sparsity" in capsys.readouterr().err


def test_full_healing_is_sparse_fine_tuning_for_real(tiny, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(gradual, "heal", fake_heal(calls))
    config = WeightPruneConfig(sparsity=0.5, rounds=2, heal_steps=4, heal_method="full")
    gradual_prune(tiny["base"], config, tmp_path / "fake", calibration=tiny["calib"], nsamples=4, seqlen=32,
                  progress=False)
    assert all(c["config"].adapter == "full" and c["config"].keep_zeros and not c["config"].merge
               and c["config"].lr == 1e-4 for c in calls)
    monkeypatch.undo()  # now the real heal: every round's zeros must come out of its training still zero
    seen = []
    real = gradual.heal

    def watch(student, heal_config, out, **kw):
        healed = real(student, heal_config, out, **kw)
        seen.append((linears(student), linears(healed)))
        return healed
    monkeypatch.setattr(gradual, "heal", watch)
    out = gradual_prune(tiny["base"], dataclasses.replace(config, heal_lr=1e-2), tmp_path / "real",
                        calibration=tiny["calib"], nsamples=4, seqlen=32, progress=False)
    assert len(seen) == 2
    for before, after in seen:
        for name, w in before.items():
            assert torch.equal(after[name] == 0, w == 0) and not torch.equal(after[name], w), name
    record = json.loads((out / "config.json").read_text())["llmshrink_prune"]
    assert record["config"]["heal_method"] == "full" and record["sparsity"] == pytest.approx(0.5, abs=0.02)


def test_recipe_step_runs_the_rounds(tiny, tmp_path):
    from llmshrink.pipeline import load_recipe, run_recipe

    out = tmp_path / "run"
    path = tmp_path / "r.yaml"
    path.write_text(f"model: {tiny['base']}\nseed: 0\ncalibration: {{source: {tiny['calib']}, nsamples: 4, seqlen: 32}}\n"
                    "steps:\n  - {method: weight_prune, sparsity: 0.5, rounds: 2, heal_steps: 2, rewind: true}\n"
                    f"out: {out}\n")
    run_recipe(load_recipe(path), progress=False)
    record = json.loads((out / "model" / "config.json").read_text())["llmshrink_prune"]
    assert len(record["rounds"]) == 2 and record["config"]["rewind"] is True
    assert record["sparsity"] == pytest.approx(0.5, abs=0.02)
