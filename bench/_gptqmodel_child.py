"""Runs GPTQModel (a peer, for comparison only) in its own venv: quantize a folder with its defaults.

    GPTQMODEL_CPU_WORKERS=2 PY_GPTQMODEL -m ... bench/_gptqmodel_child.py SRC OUT BITS GROUP CALIB.json

Prints one JSON line: {"seconds": ..., "peak_rss_mb": ...}. CALIB.json holds a list of token-id lists.
"""

import json
import resource
import sys
import time

import torch
from gptqmodel import BACKEND, GPTQModel, QuantizeConfig


def main() -> None:
    src, out, bits, group, calib_file = sys.argv[1:6]
    calib = [{"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long)}
             for ids in json.load(open(calib_file))]
    start = time.perf_counter()
    model = GPTQModel.load(src, QuantizeConfig(bits=int(bits), group_size=int(group)), device="cpu")
    model.quantize(calib, batch_size=1, backend=BACKEND.TORCH)
    model.save(out)
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


if __name__ == "__main__":
    main()
