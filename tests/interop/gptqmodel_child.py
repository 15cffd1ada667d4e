"""Run inside a venv that has GPTQModel 7.6.0 (a peer, for interop tests only).

    python gptqmodel_child.py logits FOLDER IDS.json OUT.safetensors   # load with GPTQModel (fp16), save logits
    python gptqmodel_child.py quantize SRC OUT IDS.json                # quantize with GPTQModel defaults
"""

import json
import sys

import torch
from gptqmodel import BACKEND, GPTQModel, QuantizeConfig
from safetensors.torch import save_file

if __name__ == "__main__":
    verb = sys.argv[1]
    if verb == "logits":
        folder, ids_file, out = sys.argv[2:5]
        # fp16: GPTQModel's default on CPU is bf16, whose rounding alone moves logits by ~1.
        model = GPTQModel.load(folder, device="cpu", backend=BACKEND.TORCH, dtype=torch.float16)
        ids = torch.tensor(json.load(open(ids_file)))
        with torch.no_grad():
            logits = model.model(input_ids=ids).logits.float()
        save_file({"logits": logits.contiguous()}, out)
    elif verb == "quantize":
        src, out, ids_file = sys.argv[2:5]
        calib = [{"input_ids": torch.tensor([row]), "attention_mask": torch.ones(1, len(row), dtype=torch.long)}
                 for row in json.load(open(ids_file))]
        model = GPTQModel.load(src, QuantizeConfig(bits=4, group_size=128), device="cpu")
        model.quantize(calib, batch_size=1, backend=BACKEND.TORCH)
        model.save(out)
