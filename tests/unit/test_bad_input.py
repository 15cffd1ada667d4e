"""Bad input to every verb: exit code 2, one `llmshrink: error:` line naming the problem and the fix,
no traceback, and nothing left on disk. One row per case: (command line, expected words).

The command line may name these, made fresh in each case's folder by `make`:
  {tiny}       a tiny Llama folder (2 layers, context 256) with its tokenizer
  {nan}        the same with a NaN in layer 1's up_proj
  {pickle}     a folder holding only pytorch_model.bin
  {badjson}    config.json that is not JSON
  {alien}      config.json with a model_type transformers does not know
  {truncated}  model.safetensors cut in half
  {file}       a plain file;  {full}  a non-empty folder;  {textdir}  an empty folder
  {utf16}      a UTF-16 text file;  {badjsonl}  a .jsonl whose second line is not JSON
  {recipe}     a recipe whose out folder cannot be written
The unwritable place is /sys, where even root cannot create a file.
"""

import json
import shutil
from pathlib import Path

import pytest

from llmshrink.cli import main

from conftest import save_tiny

READ_ONLY = "/sys/llmshrink-test-out"

CASES = [
    # output folders: checked before any work, through one helper
    ("quantize --model {tiny} --out " + READ_ONLY, "is not writable"),
    ("quantize --model {tiny} --out {file}", "is a file; give a folder path for --out"),
    ("quantize --model {tiny} --out {full}", "exists and is not empty; choose another --out or pass --overwrite"),
    ("prune --model {tiny} --layers 1 --out " + READ_ONLY, "is not writable"),
    ("prune --model {tiny} --layers 1 --out {file}", "is a file"),
    ("prune --model {tiny} --layers 1 --out p --plot {root}/missing/chart.png", "--plot folder"),
    ("heal --model {tiny} --out " + READ_ONLY, "is not writable"),
    ("heal --model {tiny} --adapter {tiny} --out " + READ_ONLY, "is not writable"),
    ("delta compress --base {tiny} --finetuned {tiny} --out " + READ_ONLY, "is not writable"),
    ("pack {tiny} --out " + READ_ONLY, "is not writable"),
    ("pack {tiny} --out {file}", "is a file"),
    ("unpack {tiny} --out u", "is not a packed folder"),
    ("run {recipe}", "is not writable"),
    ("eval --model {tiny} --tasks wiki --output {root}/missing/r.json", "does not exist"),
    # model folders: checked before any weight is read
    ("eval --model {pickle} --tasks piqa", "holds only pickle weights (pytorch_model.bin); llmshrink never unpickles"),
    ("quantize --model {pickle} --out q", "holds only pickle weights"),
    ("prune --model {pickle} --layers 1 --out p", "holds only pickle weights"),
    ("eval --model {badjson} --tasks piqa", "config.json is not valid JSON (Expecting"),
    ("eval --model {alien} --tasks piqa", "model_type 'no_such_family', which transformers"),
    ("eval --model {truncated} --tasks piqa", "model.safetensors is not a readable safetensors file"),
    ("eval --model {tiny} --compare {truncated} --tasks piqa", "truncated or corrupt"),
    ("quantize --model {truncated} --out q", "truncated or corrupt"),
    ("quantize --model {nan} --out q --nsamples 4 --calib-seqlen 32 --calib-file {text}",
     "up_proj.weight holds NaN or Inf"),
    # text files
    ("eval --model {tiny} --text-file {utf16}", "is not UTF-8 text (it starts with a UTF-16 byte-order mark)"),
    ("eval --model {tiny} --text-file {badjsonl}", "line 2 is not valid JSON"),
    ("eval --model {tiny} --text-file {textdir}", "is a folder; pass a .txt or .jsonl file"),
    ("quantize --model {tiny} --out q --calib-seqlen 32 --calib-file {utf16}", "is not UTF-8 text"),
    # options checked before the model is loaded
    ("eval --model {tiny} --gen-tokens -5", "-5 is negative"),
    ("quantize --model {tiny} --out q --calib-seqlen 100000", "longer than the model's context of 256 tokens"),
    ("prune --model {tiny} --layers 2 --out p", "removing 2 of 2 decoder layers leaves none"),
    ("heal --model {tiny} --method bogus --out h", "method='bogus' is unknown; use one of lora, qlora"),
    ("heal --model {tiny} --loss kd --teacher ./no-such-teacher --out h", "is not a folder that exists"),
    ("push {tiny} --repo-id org/name", "the Hub is offline here (HF_HUB_OFFLINE=1)"),
    ("rotate --model {tiny} --out " + READ_ONLY, "is not writable"),
    ("rotate --model {tiny} --out r --kind bogus", "kind='bogus' is not known; use one of hadamard, random"),
    ("rotate --model {pickle} --out r", "holds only pickle weights"),
    ("factorize --model {tiny} --out f --ratio 0", "ratio=0.0 is outside (0, 1]"),
    ("factorize --model {tiny} --out f --scores {textdir}", "is not a score map (it has no scores.json)"),
    ("factorize --model {tiny} --save-scores {full}", "exists and is not empty; choose another --save-scores"),
    ("width_prune --model {tiny} --out w --ratio 1.5", "ratio=1.5 is outside (0, 1]"),
    ("share --model {tiny} --out s --bits 9", "bits=9 is outside 2-8; a codebook holds 2^bits shared values"),
    ("share --model {tiny} --out s --per col", "per='col' is not known; use row"),
    ("share --model {tiny} --out " + READ_ONLY, "is not writable"),
    ("lm-eval --model hf --model_args pretrained={pickle} --tasks piqa", "holds only pickle weights"),
]


def make(root: Path) -> dict[str, str]:
    """The inputs the command lines name, in `root`."""
    tiny = save_tiny(root / "tiny")
    names = {"root": str(root), "tiny": str(tiny)}
    for name in ("nan", "pickle", "badjson", "alien", "truncated"):
        shutil.copytree(tiny, root / name)
        names[name] = str(root / name)
    from safetensors.torch import load_file, save_file

    state = load_file(str(root / "nan" / "model.safetensors"))
    state["model.layers.1.mlp.up_proj.weight"][0, 0] = float("nan")
    save_file(state, str(root / "nan" / "model.safetensors"), metadata={"format": "pt"})
    (root / "pickle" / "model.safetensors").unlink()
    (root / "pickle" / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    (root / "badjson" / "config.json").write_text('{"model_type": "llama",\n  oops}\n')
    config = json.loads((tiny / "config.json").read_text())
    (root / "alien" / "config.json").write_text(json.dumps({**config, "model_type": "no_such_family"}))
    data = (root / "truncated" / "model.safetensors").read_bytes()
    (root / "truncated" / "model.safetensors").write_bytes(data[: len(data) // 2])
    (root / "file").write_text("x")
    (root / "full").mkdir()
    (root / "full" / "keep.txt").write_text("x")
    (root / "textdir").mkdir()
    (root / "utf16.txt").write_bytes("Some calibration text.\n\nMore of it.\n".encode("utf-16"))
    (root / "bad.jsonl").write_text('{"text": "fine"}\n{"text": oops}\n')
    (root / "text.txt").write_text("\n\n".join(["Calibration text for a tiny model, repeated. " * 8] * 8))
    (root / "r.yaml").write_text(f"model: {tiny}\ncalibration: {{source: wiki, nsamples: 4, seqlen: 32}}\nsteps:\n  - method: rtn\n"
                                f"out: {READ_ONLY}\n")
    names.update(file=str(root / "file"), full=str(root / "full"), textdir=str(root / "textdir"),
                 utf16=str(root / "utf16.txt"), badjsonl=str(root / "bad.jsonl"), text=str(root / "text.txt"),
                 recipe=str(root / "r.yaml"))
    return names


def listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.mark.parametrize("command, message", CASES, ids=[c for c, _ in CASES])
def test_bad_input_is_one_line_exit_2_and_nothing_written(command, message, tmp_path, monkeypatch, capsys):
    root = tmp_path / "case"
    root.mkdir()
    names = make(root)
    monkeypatch.chdir(root)
    before = listing(root)
    code = main(command.format(**names).split())
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("llmshrink: error:")]
    assert code == 2, err[-3000:]
    assert len(errors) == 1 and message in errors[0], err[-3000:]
    assert err.strip().splitlines()[-1] == errors[0] and "Traceback" not in err
    assert listing(root) == before  # nothing written, no temp or .partial folder left
    assert not Path(READ_ONLY).exists()


def test_every_verb_has_a_case():
    from llmshrink.cli import build_parser

    verbs = set(build_parser()._subparsers._group_actions[0].choices) - {"prepare"}
    covered = {c.split()[0] for c, _ in CASES}
    assert verbs <= covered, f"no bad-input case for: {', '.join(sorted(verbs - covered))}"


def test_lm_eval_without_lm_eval_says_how_to_install_it(monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "lm_eval" else real(name, *a))
    assert main(["lm-eval", "--model", "hf", "--tasks", "piqa"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["llmshrink: error: llmshrink lm-eval runs lm-evaluation-harness, which is not installed; "
                   "install it with: pip install lm-eval==0.4.13"]


def test_the_tiny_inputs_are_good_apart_from_their_flaw(tmp_path):
    """The table's failures come from each planted flaw: the same tiny folder quantizes."""
    names = make(tmp_path)
    assert main(["quantize", "--model", names["tiny"], "--out", str(tmp_path / "q"), "--nsamples", "4",
                 "--calib-seqlen", "32", "--calib-file", names["text"], "--method", "rtn"]) == 0
    assert (tmp_path / "q" / "model.safetensors").is_file()
