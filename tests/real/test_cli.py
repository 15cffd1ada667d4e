"""The `llmshrink` command line as a user runs it: results, side-by-side compare, and bad input."""

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.real


def run(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "llmshrink", *args], capture_output=True, text=True, cwd=cwd)


def test_help_lists_the_subcommands():
    out = run("--help")
    assert out.returncode == 0 and "eval" in out.stdout and "prepare" in out.stdout


def test_eval_writes_a_complete_record(tmp_path, real_model):
    text = tmp_path / "notes.txt"
    text.write_text("\n\n".join(["Quantization stores each weight in fewer bits. " * 30] * 10))
    out = tmp_path / "results.json"
    proc = run("eval", "--tasks", "wiki,piqa,lambada", "--limit", "8", "--seqlen", "256",
               "--text-file", str(text), "--gen-tokens", "4", "--output", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    record = json.loads(out.read_text())
    assert record["model"] == "smollm2-135m"
    wiki = record["results"]["wiki"]
    assert wiki["protocol"] == "gptq" and wiki["seqlen"] == 256 and wiki["tokens_scored"] == wiki["windows"] * 255
    assert 1 < wiki["ppl"] < 100 and 1 < record["results"]["text"]["ppl"] < 100
    assert record["results"]["piqa"]["n"] == 8 and 0 <= record["results"]["piqa"]["acc_norm"] <= 1
    stats = record["stats"]
    assert stats["params_m"] == pytest.approx(134.5, abs=0.1) and stats["bits_per_param"] == pytest.approx(32, abs=0.1)
    assert stats["gen_tokens_per_s"] > 0 and stats["peak_rss_mb"] > 100
    assert record["config"]["limit"] == 8 and record["config"]["dtype"] == "float32"
    assert "wiki ppl" in proc.stdout and "piqa acc" in proc.stdout


def test_compare_puts_two_models_side_by_side(tmp_path, real_model):
    _, _, folder = real_model
    out = tmp_path / "cmp.json"
    proc = run("eval", "--tasks", "piqa", "--limit", "6", "--gen-tokens", "0", "--compare", folder,
               "--output", str(out), "--markdown")
    assert proc.returncode == 0, proc.stderr[-2000:]
    a, b = json.loads(out.read_text())["models"]
    assert a["results"]["piqa"] == b["results"]["piqa"]  # the same weights score the same
    assert b["model"] == folder and "delta" in proc.stdout and "| piqa acc (n=6) |" in proc.stdout


@pytest.mark.parametrize("args,message", [
    (["--model", "no-such-org/no-such-model"], "cannot load model"),
    (["--model", "./missing-folder"], "is not a folder that exists"),
    (["--tasks", "wiki,nope"], "unknown task 'nope'"),
    (["--tasks", "wiki", "--seqlen", "100000"], "longer than the model's context of 8192"),
    (["--limit", "0"], "selects nothing"),
    (["--output", "/no/such/folder/r.json"], "does not exist"),
    (["--text-file", "EMPTY"], "is empty"),
    (["--tasks", "wiki", "--limit", "1", "--seqlen", "4000"], "too few for one window"),
])
def test_bad_input_is_one_line_exit_2_nothing_written(tmp_path, args, message, real_model):
    (tmp_path / "EMPTY").write_text("")
    before = sorted(p.name for p in tmp_path.iterdir())
    proc = run("eval", "--tasks", "piqa", "--limit", "2", *args, cwd=tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("llmshrink: error:") and message in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_a_cached_hub_id_loads_offline(tmp_path, real_model):
    """A Hub id resolves through the Hugging Face cache, with no network (HF_HUB_OFFLINE=1)."""
    import os

    _, _, folder = real_model
    repo = tmp_path / "hub" / "models--llmshrink-test--smollm2"
    snapshot = repo / "snapshots" / "0123456789abcdef0123456789abcdef01234567"
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(snapshot.name)
    for f in os.listdir(folder):
        (snapshot / f).symlink_to(os.path.join(folder, f))
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    out = tmp_path / "hub.json"
    proc = subprocess.run([sys.executable, "-m", "llmshrink", "eval", "--model", "llmshrink-test/smollm2",
                           "--tasks", "arc_easy", "--limit", "3", "--gen-tokens", "0", "--output", str(out)],
                          capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    record = json.loads(out.read_text())
    assert record["resolved"] == "llmshrink-test/smollm2" and record["stats"]["size_mb"] > 500
