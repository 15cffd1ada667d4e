"""Adding a method is one folder: a toy method and its own output format, registered from this file
alone, run through `llmshrink run` (validation, order checks, plan, run folder, report), through
the CLI, through `llmshrink.compress`, and load back with `from_pretrained`.

The toy scales every decoder MLP's down projection by `factor` and writes a dense checkpoint
marked by `llmshrink_toy.json`, a new kind ("toy") that only its own method may follow.
"""

from __future__ import annotations

import dataclasses
import json
import textwrap
from pathlib import Path

import pytest
import torch

import llmshrink
from llmshrink.auto import load_model
from llmshrink.calibration import Calibration
from llmshrink.cli import main as cli_main
from llmshrink.cliargs import add_method_command
from llmshrink.config import MethodConfig
from llmshrink.errors import UsageError
from llmshrink.formats import FORMATS, Format, register_format
from llmshrink.methods import METHODS, Method, load_builtin_methods, register
from llmshrink.pipeline import load_recipe, plan_lines, run_recipe
from llmshrink.pipeline.recipe import STATE_FILE

from conftest import save_tiny

MARK = "llmshrink_toy.json"
IDS = torch.randint(1, 97, (2, 20), generator=torch.Generator().manual_seed(1))


@dataclasses.dataclass
class ToyConfig(MethodConfig):
    """Scale the MLP down projections.

    Args:
        factor: what every down_proj weight is multiplied by.
        note: a label written into the marker file.
    """

    METHOD = "scale_toy"
    factor: float = 0.5
    note: str = "toy"

    def validate(self) -> None:
        if not 0 < self.factor <= 2:
            raise UsageError(f"factor={self.factor} is outside (0, 2]; use e.g. 0.5")


def scaled(model, factor: float):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("mlp.down_proj.weight"):
                p.mul_(factor)
    return model


def run_toy(source, config: ToyConfig, out: Path, context) -> None:
    model, tokenizer, _ = load_model(source)
    scaled(model, config.factor).save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / MARK).write_text(json.dumps({"factor": config.factor, "note": config.note, "seed": context.seed}))


def load_toy(folder: Path, request):
    model = FORMATS["dense"].load(folder, request)
    model.toy = json.loads((folder / MARK).read_text())
    return model


@pytest.fixture
def toy():
    """The toy method and its format, registered for one test (the registries are restored after)."""
    load_builtin_methods()  # the built-in ones stay registered after the test
    saved = dict(FORMATS), dict(METHODS)
    register_format(Format(name="toy", priority=45, detect=lambda folder: (folder / MARK).is_file(), load=load_toy,
                           describe=lambda folder: ("transformers", ["toy-scaled"]),
                           refusal="{name} cannot follow {before}: only scale_toy reads a toy folder"))
    yield register(Method(config=ToyConfig, run=run_toy, output="toy", accepts=("dense", "toy"),
                          headline=("factor",), hub_tags=("toy",),
                          add_cli=lambda sub: add_method_command(sub, METHODS["scale_toy"], "scale-toy",
                                                                 "scale the MLP down projections (a toy)")))
    for registry, before in zip((FORMATS, METHODS), saved):
        registry.clear()
        registry.update(before)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    model = save_tiny(root / "tiny", layers=2, seed=4)
    return {"root": root, "model": str(model)}


def expected_logits(folder: str, factor: float) -> torch.Tensor:
    model, _, _ = load_model(folder)
    with torch.no_grad():
        return scaled(model, factor)(IDS).logits


def logits_of(folder) -> torch.Tensor:
    with torch.no_grad():
        return llmshrink.AutoModelForCausalLM.from_pretrained(folder)(IDS).logits


def recipe(tmp: Path, tiny, out: Path, steps: str, evaluate: str = "") -> Path:
    path = tmp / "toy.yaml"
    path.write_text(f"model: {tiny['model']}\nseed: 0\nsteps:\n{textwrap.dedent(steps)}{evaluate}out: {out}\n")
    return path


def test_a_toy_method_runs_through_a_recipe(toy, tiny, tmp_path):
    out = tmp_path / "run"
    path = recipe(tmp_path, tiny, out, """\
          - {method: scale_toy, factor: 0.25}
          - {method: scale_toy}
        """, evaluate="evaluate: {tasks: [wiki], limit: 4, seqlen: 64, gen_tokens: 0, every_step: false}\n")
    loaded = load_recipe(path)
    plan = plan_lines(loaded)
    assert "1. scale_toy    factor=0.25  -> toy" in plan[1] and "2. scale_toy    factor=0.5  -> toy" in plan[2]
    state = run_recipe(loaded, progress=False)
    assert [s["kind"] for s in state["steps"]] == ["toy", "toy"]
    assert (out / "steps" / "01-scale_toy" / MARK).is_file()
    final = out / state["final"]
    model = llmshrink.AutoModelForCausalLM.from_pretrained(final)
    assert model.toy["factor"] == 0.5
    torch.testing.assert_close(logits_of(final), expected_logits(tiny["model"], 0.25 * 0.5))
    assert json.loads((out / STATE_FILE).read_text())["evals"]["2. scale_toy"]["results"]["wiki"]["ppl"] > 1
    assert "scale_toy" in (out / "report.md").read_text()


def test_recipes_validate_the_toy_step_and_its_kind(toy, tiny, tmp_path):
    bad = recipe(tmp_path, tiny, tmp_path / "x", "  - {method: scale_toy, factr: 2}\n")
    with pytest.raises(UsageError, match=r"toy\.yaml:4: steps\[0\] \(scale_toy\): unknown key 'factr'; "
                                         r"did you mean 'factor'\?"):
        load_recipe(bad)
    bad = recipe(tmp_path, tiny, tmp_path / "x", "  - {method: scale_toy, factor: 9.0}\n")
    with pytest.raises(UsageError, match=r"toy\.yaml:4: .*factor=9\.0 is outside"):
        load_recipe(bad)
    after = recipe(tmp_path, tiny, tmp_path / "x", "  - {method: scale_toy}\n  - {method: rtn, bits: 8, clip_search: false}\n")
    with pytest.raises(UsageError, match=r"steps\[1\] \(rtn\) cannot follow steps\[0\] \(scale_toy\): only "
                                         r"scale_toy reads a toy folder"):
        load_recipe(after)
    packed = recipe(tmp_path, tiny, tmp_path / "x", "  - {method: scale_toy}\n  - {method: pack}\n")
    assert len(load_recipe(packed).steps) == 2  # pack accepts any kind, the new one too


def test_the_toy_method_has_a_cli_from_its_config_and_compress_runs_it(toy, tiny, tmp_path, capsys):
    out = tmp_path / "cli"
    assert cli_main(["scale-toy", "--model", tiny["model"], "--out", str(out), "--factor", "0.75",
                     "--note", "cli"]) == 0
    assert "scale_toy output written to" in capsys.readouterr().out
    assert json.loads((out / MARK).read_text())["note"] == "cli"
    torch.testing.assert_close(logits_of(out), expected_logits(tiny["model"], 0.75))
    assert cli_main(["scale-toy", "--model", tiny["model"], "--out", str(out), "--factor", "5"]) == 2
    assert "factor=5.0 is outside" in capsys.readouterr().err

    again = llmshrink.compress(tiny["model"], ToyConfig(factor=1.5), tmp_path / "api",
                               calibration=Calibration(nsamples=2, seqlen=16))
    torch.testing.assert_close(logits_of(again), expected_logits(tiny["model"], 1.5))
    with pytest.raises(UsageError, match="is not empty"):
        llmshrink.compress(tiny["model"], ToyConfig(), again)


def test_the_card_reads_the_toy_format_and_method(toy, tiny, tmp_path):
    from llmshrink.hub import model_card

    out = llmshrink.compress(tiny["model"], ToyConfig(), tmp_path / "card")
    assert "toy-scaled" in model_card(out, "org/toy")
