"""`llmshrink quantize` end to end on the packaged model: CLI, checkpoint, evaluation of the result."""

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.real


def run(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "llmshrink", *args], capture_output=True, text=True, cwd=cwd)


def test_quantize_then_evaluate_side_by_side(tmp_path, real_model):
    out = tmp_path / "q8"
    proc = run("quantize", "--method", "rtn", "--no-clip-search", "--bits", "8", "--group-size", "64",
               "--nsamples", "2", "--calib-seqlen", "64", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "gptq" and qc["bits"] == 8 and qc["group_size"] == 64
    assert (out / "tokenizer.json").is_file() and (out / "quantize_config.json").is_file()
    result = tmp_path / "cmp.json"
    proc = run("eval", "--model", str(out), "--compare", "smollm2-135m", "--tasks", "wiki", "--limit", "20",
               "--seqlen", "512", "--gen-tokens", "0", "--output", str(result))
    assert proc.returncode == 0, proc.stderr[-2000:]
    quant, base = json.loads(result.read_text())["models"]
    # 8-bit round-to-nearest barely moves perplexity; a broken pack/save/load would.
    assert quant["results"]["wiki"]["ppl"] == pytest.approx(base["results"]["wiki"]["ppl"], rel=0.01)
    assert quant["results"]["wiki"]["tokens_scored"] == base["results"]["wiki"]["tokens_scored"]
    assert quant["stats"]["params_m"] == pytest.approx(base["stats"]["params_m"], rel=1e-3)
    assert quant["stats"]["size_mb"] < 0.5 * base["stats"]["size_mb"]


@pytest.mark.parametrize("args,message", [
    (["--bits", "5"], "bits=5 is not supported"),
    (["--group-size", "0"], "group_size=0 is invalid"),
    (["--group-size", "-3"], "group_size=-3 is invalid"),
    (["--out", "FULL"], "exists and is not empty"),
    (["--calib-file", "EMPTY"], "is empty"),
])
def test_bad_quantize_input_is_one_line_exit_2(tmp_path, args, message, real_model):
    (tmp_path / "EMPTY").write_text("")
    (tmp_path / "FULL").mkdir()
    (tmp_path / "FULL" / "keep.txt").write_text("keep")
    base = ["quantize", "--out", "q", "--nsamples", "2", "--calib-seqlen", "32"]
    proc = run(*base, *args, cwd=tmp_path)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and message in lines[0], proc.stderr[-1500:]
    assert not (tmp_path / "q").exists() and not (tmp_path / "q.partial").exists()
    assert (tmp_path / "FULL" / "keep.txt").read_text() == "keep"
