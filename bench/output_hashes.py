"""The bytes llmshrink writes for the default model, as sha256 per file: record them, or check them.

A refactor that must not change what users get (issue 17) is checked by recording the hashes
before it and comparing after:

    python bench/output_hashes.py --record bench/output_hashes.json    # before the change
    python bench/output_hashes.py --check bench/output_hashes.json     # after: exit 1 on any difference

Each command runs as the CLI runs it (`python -m llmshrink ...`, a fresh process, fixed seeds,
2 threads) on the packaged default model: quantize (gptq and rtn), prune (layers and wanda),
delta compress (bitdelta and lowrank, of a seeded perturbation of the model standing in for a
fine-tune) and pack (of the gptq checkpoint). Small calibration (16 x 256) keeps it to minutes.
Files are hashed whole, safetensors with their header's keys sorted (see `file_sha256`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

NSAMPLES, SEQLEN = ["--nsamples", "16"], ["--calib-seqlen", "256"]

# name -> CLI arguments; {work} is the scratch folder, {finetuned} the stand-in fine-tune
COMMANDS: dict[str, list[str]] = {
    "quantize-gptq": ["quantize", "--out", "{work}/quantize-gptq", *NSAMPLES, *SEQLEN],
    "quantize-rtn": ["quantize", "--method", "rtn", "--out", "{work}/quantize-rtn", *NSAMPLES, *SEQLEN],
    "prune-layers": ["prune", "--layers", "4", "--out", "{work}/prune-layers", "--plot", "{work}/scores.png",
                     *NSAMPLES, *SEQLEN],
    "prune-wanda": ["prune", "--sparsity", "0.5", "--out", "{work}/prune-wanda", *NSAMPLES, *SEQLEN],
    "delta-bitdelta": ["delta", "compress", "--base", "smollm2-135m", "--finetuned", "{finetuned}",
                       "--out", "{work}/delta-bitdelta"],
    "delta-lowrank": ["delta", "compress", "--method", "lowrank", "--rank", "8", "--base", "smollm2-135m",
                      "--finetuned", "{finetuned}", "--out", "{work}/delta-lowrank"],
    "pack": ["pack", "{work}/quantize-gptq", "--out", "{work}/pack", "--threads", "2"],
}


def make_finetuned(folder: Path) -> None:
    """A seeded stand-in for a fine-tune: every decoder weight plus 1% of its std in noise."""
    import torch

    from llmshrink import load_model

    model, tokenizer, _ = load_model("smollm2-135m")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".layers." in name and p.dim() == 2:
                p.add_(torch.randn(p.shape, generator=gen) * (0.01 * p.std()))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def file_sha256(path: Path) -> str:
    """sha256 of the file's bytes; for safetensors, of its header with keys sorted and then its data.

    safetensors writes `__metadata__` from a Rust HashMap, whose order changes from process to
    process (seen on delta folders, whose files carry several metadata keys): the same tensors,
    offsets and metadata come out in different bytes. Sorting the header's keys hashes what the
    file holds and nothing else.
    """
    data = path.read_bytes()
    if path.suffix != ".safetensors":
        return hashlib.sha256(data).hexdigest()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    return hashlib.sha256(json.dumps(header, sort_keys=True).encode() + data[8 + n:]).hexdigest()


def hashes(folder: Path) -> dict[str, str]:
    return {str(f.relative_to(folder)): file_sha256(f) for f in sorted(p for p in folder.rglob("*") if p.is_file())}


def run_all(work: Path, only: list[str]) -> dict[str, dict[str, str]]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2", "PYTHONHASHSEED": "0"}
    finetuned = work / "finetuned"
    if any(n.startswith("delta") for n in only):
        make_finetuned(finetuned)
    record = {}
    for name in only:
        args = [a.format(work=work, finetuned=finetuned) for a in COMMANDS[name]]
        print(f"[{name}] llmshrink {' '.join(args)}", flush=True)
        subprocess.run([sys.executable, "-m", "llmshrink", *args], env=env, check=True)
        record[name] = hashes(work / name)
    return record


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    what = ap.add_mutually_exclusive_group(required=True)
    what.add_argument("--record", type=Path, help="write the hashes to this JSON file")
    what.add_argument("--check", type=Path, help="compare against this JSON file; exit 1 on a difference")
    ap.add_argument("--only", default=",".join(COMMANDS), help="comma-separated subset of: " + ", ".join(COMMANDS))
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "llmshrink-output-hashes",
                    help="scratch folder, emptied first (default the one the record was made in: a delta folder records "
                         "its fine-tune's path, so --check needs the same --work as --record)")
    args = ap.parse_args()
    only = [n for n in args.only.split(",") if n]
    unknown = [n for n in only if n not in COMMANDS]
    if unknown:
        ap.error(f"unknown command name(s) {unknown}; use some of {list(COMMANDS)}")
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    record = run_all(args.work.resolve(), only)
    if args.record:
        args.record.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
        print(f"{sum(len(v) for v in record.values())} file hashes of {len(record)} commands written to {args.record}")
        return 0
    expected = json.loads(args.check.read_text())
    bad = 0
    for name in only:
        want, got = expected.get(name, {}), record[name]
        for f in sorted(set(want) | set(got)):
            if want.get(f) != got.get(f):
                bad += 1
                print(f"DIFFERENT {name}/{f}: recorded {want.get(f, 'absent')[:12]}, now {got.get(f, 'absent')[:12]}")
        print(f"{name}: {'same bytes' if all(want.get(f) == got.get(f) for f in set(want) | set(got)) else 'CHANGED'} "
              f"({len(got)} files)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
