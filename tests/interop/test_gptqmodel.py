"""Interop with GPTQModel 7.6.0, both directions, on the packaged model.

GPTQModel pins numpy 2.2 and other packages llmshrink does not want, so it lives in its own venv:
set LLMSHRINK_GPTQMODEL_PYTHON to that venv's python (`scripts/setup.sh --interop` makes one at
.venv-gptqmodel). Without it these tests skip; the format is then proven by the layout tests in
tests/unit/test_gptq_packing.py, written from the published layout.
"""

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import llmshrink
from llmshrink.calibration import calibration_windows
from llmshrink.gptq.linear import QuantLinear

PEER = os.environ.get("LLMSHRINK_GPTQMODEL_PYTHON")
CHILD = Path(__file__).with_name("gptqmodel_child.py")
pytestmark = [
    pytest.mark.real,
    pytest.mark.skipif(not PEER, reason="set LLMSHRINK_GPTQMODEL_PYTHON to a python with gptqmodel==7.6.0"),
]


def _peer(*args):
    env = {**os.environ, "GPTQMODEL_CPU_WORKERS": "2", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([PEER, str(CHILD), *map(str, args)], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]


def _assert_same_logits(theirs, folder, ids):
    """GPTQModel's torch kernel runs in fp16 only, so both sides compute in fp16; what is left is
    fp16 rounding (measured: mean |diff| 0.016, max 0.13 on logits of magnitude ~20). A misread
    checkpoint (zero points off by one, a wrong g_idx) moves logits by ~1 on average."""
    model = llmshrink.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float16)
    assert isinstance(model.model.layers[0].self_attn.q_proj, QuantLinear)
    with torch.no_grad():
        mine = model(torch.tensor(ids)).logits.float()
    diff = (theirs - mine).abs()
    assert diff.mean() < 0.05 and diff.max() < 0.5, (diff.mean().item(), diff.max().item())
    assert (theirs.argmax(-1) == mine.argmax(-1)).float().mean() >= 0.9


@pytest.mark.parametrize("config", [
    llmshrink.GPTQConfig(),  # the defaults: act-order with static groups, g128 halved to whole g64 groups
    llmshrink.GPTQConfig(partial_groups=True),  # g128 kept: a partial last group on the 576-wide layers
    llmshrink.GPTQConfig(bits=4, group_size=64, desc_act=True, static_groups=False),  # non-monotone g_idx
    llmshrink.GPTQConfig(bits=8, group_size=-1, desc_act=False),
    llmshrink.GPTQConfig(rotate="hadamard"),  # the rotated model: an ordinary (untied) Llama, quantized
    llmshrink.GPTQConfig(algorithm="rtn", target_bits=3.5),  # per-linear 2/3/4/8 bits in `dynamic` (RTN: fast)
], ids=["defaults", "partial-groups", "g64-act-order", "8bit-per-channel", "rotated", "mixed-precision"])
# Not here: sym=False. GPTQModel 7.6 refuses asymmetric `checkpoint_format: gptq` (v1) checkpoints
# that it did not write itself ("only supported if produced by gptqmodel version >= 0.9.0"),
# because of the old v1 zero-point offset bug; ours clamp zero points to [1, 2**bits - 1], which
# the v1 offset stores exactly, and our own loader reads them (tests/unit).
def test_gptqmodel_loads_our_checkpoint_with_the_same_logits(tmp_path, real_model, config):
    _, tokenizer, _ = real_model
    out = llmshrink.quantize("smollm2-135m", config, tmp_path / "ours", nsamples=4, seqlen=128, progress=False)
    if config.target_bits is not None:  # a real mix, so GPTQModel has to read each linear's own bits
        plan = json.loads((out / "mixed_precision.json").read_text())["plan"]
        assert len(set(plan.values())) >= 2, plan
    ids = [tokenizer("The quick brown fox jumps over the lazy dog near the river bank.").input_ids]
    (tmp_path / "ids.json").write_text(json.dumps(ids))
    _peer("logits", out, tmp_path / "ids.json", tmp_path / "theirs.safetensors")
    theirs = load_file(str(tmp_path / "theirs.safetensors"))["logits"]
    _assert_same_logits(theirs, out, ids)


def test_we_load_a_checkpoint_gptqmodel_wrote(tmp_path, real_model):
    _, tokenizer, folder = real_model
    calib = calibration_windows(tokenizer, nsamples=4, seqlen=128, seed=0)
    (tmp_path / "calib.json").write_text(json.dumps(calib.tolist()))
    _peer("quantize", folder, tmp_path / "theirs", tmp_path / "calib.json")
    ids = [tokenizer("Paris is the capital and largest city of France.").input_ids]
    (tmp_path / "ids.json").write_text(json.dumps(ids))
    _peer("logits", tmp_path / "theirs", tmp_path / "ids.json", tmp_path / "logits.safetensors")
    theirs = load_file(str(tmp_path / "logits.safetensors"))["logits"]
    _assert_same_logits(theirs, tmp_path / "theirs", ids)
