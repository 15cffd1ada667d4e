"""kill -9 in the middle of a long command, then the same command again: no stray folder is left and
the output has the same bytes as an uninterrupted run.

The kill is real (SIGKILL: no `finally`, no atexit) and lands at a chosen point: a child process
runs the CLI with one library function wrapped to kill the process when it is reached.
"""

import hashlib
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from llmshrink.cli import main
from llmshrink.io import atomic_dir, remove_stale_temps

from conftest import save_tiny

CHILD = textwrap.dedent("""
    import os, signal, sys
    import {module} as target
    real = target.{function}
    calls = [0]
    def killer(*args, **kwargs):
        calls[0] += 1
        if calls[0] == {at_call}:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*args, **kwargs)
    target.{function} = killer
    from llmshrink.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def run_cli(args: list[str], kill: tuple[str, str, int] | None = None, cwd: Path | None = None):
    if kill is None:
        code = "import sys; from llmshrink.cli import main; sys.exit(main(sys.argv[1:]))"
    else:
        module, function, at_call = kill
        code = CHILD.format(module=module, function=function, at_call=at_call)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=cwd, env=env)


def digest(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    root = tmp_path_factory.mktemp("kill")
    save_tiny(root / "tiny", layers=4)
    (root / "text.txt").write_text("\n\n".join(["Calibration text for a tiny model, repeated. " * 8] * 8))
    return root


QUANTIZE = ["quantize", "--model", "{root}/tiny", "--nsamples", "4", "--calib-seqlen", "32",
            "--calib-file", "{root}/text.txt", "--group-size", "32"]


@pytest.fixture(scope="module")
def quantized(source):
    """The uninterrupted run's checkpoint, made as the killed one is: by a fresh process."""
    out = source / "whole-q"
    whole = run_cli([*[a.format(root=source) for a in QUANTIZE], "--out", str(out)])
    assert whole.returncode == 0, whole.stderr[-2000:]
    return digest(out)


@pytest.mark.parametrize("kill", [
    ("llmshrink.gptq.resume", "save_tensors", 5),  # layer 2's weights: .partial holds layers 0-1
    ("llmshrink.gptq.write", "save_shards", 1),  # writing the checkpoint: a temp folder is left
], ids=["during-layers", "during-write"])
def test_quantize_killed_then_rerun(source, quantized, tmp_path, kill):
    args = [a.format(root=source) for a in QUANTIZE]
    killed = run_cli([*args, "--out", str(tmp_path / "q")], kill=kill)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert not (tmp_path / "q").exists()
    left = sorted(p.name for p in tmp_path.iterdir())
    assert "q.partial" in left  # the resume state
    if kill[1] == "save_shards":
        assert any(name.startswith(".q.tmp-") for name in left)  # what kill -9 leaves
    again = run_cli([*args, "--out", str(tmp_path / "q")])
    assert again.returncode == 0, again.stderr[-2000:]
    assert digest(tmp_path / "q") == quantized
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]


def test_pack_killed_then_rerun(source, tmp_path):
    assert main(["pack", str(source / "tiny"), "--out", str(tmp_path / "whole")]) == 0
    killed = run_cli(["pack", str(source / "tiny"), "--out", str(tmp_path / "p")],
                     kill=("llmshrink.pack.folder", "_copy", 1))  # the safetensors file is coded, copies not yet made
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    stray = [p for p in tmp_path.iterdir() if p.name.startswith(".p.tmp-")]
    assert stray and any(stray[0].rglob("*.llmpack")) and not (tmp_path / "p").exists()
    again = run_cli(["pack", str(source / "tiny"), "--out", str(tmp_path / "p")])
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"removed {stray[0]}" in again.stderr  # said in one log line
    assert digest(tmp_path / "p") == digest(tmp_path / "whole")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p", "whole"]


def test_a_live_writers_temp_folder_is_left_alone(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)  # exited: its pid is free
    (tmp_path / f".out.tmp-{dead_pid}-abcd1234").mkdir()
    (tmp_path / ".out.tmp-oldstyle").mkdir()  # written before temp names carried a pid
    (tmp_path / f".out.tmp-{os.getpid()}-live0000").mkdir()  # this process: still writing
    (tmp_path / f".other.tmp-{dead_pid}-abcd1234").mkdir()  # another output's
    removed = sorted(p.name for p in remove_stale_temps(tmp_path / "out"))
    assert removed == sorted([f".out.tmp-{dead_pid}-abcd1234", ".out.tmp-oldstyle"])
    with atomic_dir(tmp_path / "out") as tmp:
        assert tmp.name.startswith(f".out.tmp-{os.getpid()}-")
        (tmp / "f").write_text("x")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [".other.tmp-%d-abcd1234" % dead_pid, f".out.tmp-{os.getpid()}-live0000", "out"])
