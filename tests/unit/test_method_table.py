"""Every registered method, as a table of (method x config) cases in the way peft tests its tuners:
`llmshrink.compress` a tiny model -> the saved folder -> loaded here and in a fresh process ->
the same logits (and, for pruning, the same logits as the model pruned in memory)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import llmshrink
from llmshrink import (DeltaConfig, GPTQConfig, HealConfig, LayerPruneConfig, PackConfig, RTNConfig,
                       WeightPruneConfig)
from llmshrink.auto import load_model
from llmshrink.calibration import Calibration
from llmshrink.evals.data import corpus_documents
from llmshrink.factorize import FactorizeConfig
from llmshrink.methods import load_builtin_methods
from llmshrink.rotate import RotateConfig
from llmshrink.share import ShareConfig
from llmshrink.width_prune import WidthPruneConfig

from conftest import save_tiny

IDS = torch.randint(1, 97, (2, 24), generator=torch.Generator().manual_seed(2))

CASES = {
    "gptq-4bit-g16": GPTQConfig(bits=4, group_size=16),
    "gptq-3bit-asym-no-act-order": GPTQConfig(bits=3, group_size=32, sym=False, desc_act=False),
    "gptq-dynamic-8bit-down": GPTQConfig(bits=4, group_size=16, dynamic={"re:.*down_proj": {"bits": 8}}),
    "rtn-8bit-per-row": RTNConfig(bits=8, group_size=-1, clip_search=False),
    "layer_prune-last": LayerPruneConfig(layers=1, criterion="last"),
    "layer_prune-measured": LayerPruneConfig(layers=1, candidates=2),
    "weight_prune-wanda": WeightPruneConfig(sparsity=0.5),
    "weight_prune-2:4-magnitude": WeightPruneConfig(sparsity=0.5, score="magnitude", pattern="2:4"),
    "delta-bitdelta": DeltaConfig(min_numel=1000),
    "delta-lowrank": DeltaConfig(codec="lowrank", rank=4, min_numel=1000),
    "heal-lora": HealConfig(steps=2, seqlen=32, batch_size=2, rank=4, lora_alpha=8, warmup=0, nsamples=4,
                            eval_docs=2, eval_seqlen=32, eval_windows=1),
    "pack": PackConfig(threads=1),
    "rotate-hadamard": RotateConfig(),
    "rotate-random-no-heads": RotateConfig(kind="random", heads=False, seed=3),
    "factorize-0.7": FactorizeConfig(ratio=0.7),
    "width_prune-0.7": WidthPruneConfig(ratio=0.7, multiple=8),
    "share-3bit-row": ShareConfig(),
    "share-4bit-tensor-plain": ShareConfig(bits=4, per="tensor", weighted=False),
}


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """Every case compressed once: name -> (folder, logits loaded in this process)."""
    root = tmp_path_factory.mktemp("table")
    base = save_tiny(root / "base", layers=3, seed=5)
    tuned = root / "tuned"  # a stand-in fine-tune of base, for the delta cases
    model, tokenizer, _ = load_model(str(base))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    model.save_pretrained(tuned)
    tokenizer.save_pretrained(tuned)
    text = root / "calib.txt"
    text.write_text("\n\n".join(corpus_documents("wiki")[-40:]))
    calibration = Calibration(source=str(text), nsamples=4, seqlen=32)
    out = {}
    for name, config in CASES.items():
        if isinstance(config, HealConfig):
            config = HealConfig(**{**config.__dict__, "calibration": str(text)})
        source = tuned if isinstance(config, DeltaConfig) else base
        folder = llmshrink.compress(source, config, root / name, calibration=calibration, original=base,
                                    progress=False)
        with torch.no_grad():
            out[name] = (folder, llmshrink.AutoModelForCausalLM.from_pretrained(folder)(IDS).logits)
    return {"cases": out, "base": base, "root": root, "calibration": calibration}


def test_every_registered_method_has_a_case():
    assert {type(c).METHOD for c in CASES.values()} | {"finetune"} == set(load_builtin_methods())
    # finetune trains on the packaged domain text with the packaged tokenizer: tests/real covers it


def test_saved_outputs_load_the_same_in_a_fresh_process(made, tmp_path):
    folders = {name: str(folder) for name, (folder, _) in made["cases"].items()}
    result = tmp_path / "logits.safetensors"
    script = (
        "import json, sys, torch\n"
        "from safetensors.torch import save_file\n"
        "import llmshrink\n"
        "folders, ids = json.loads(sys.argv[1]), torch.tensor(json.loads(sys.argv[2]))\n"
        "with torch.no_grad():\n"
        "    save_file({n: llmshrink.AutoModelForCausalLM.from_pretrained(f)(ids).logits.contiguous()\n"
        "               for n, f in folders.items()}, sys.argv[3])\n")
    subprocess.run([sys.executable, "-c", script, json.dumps(folders), json.dumps(IDS.tolist()), str(result)],
                   check=True, timeout=600)
    fresh = load_file(str(result))
    for name, (_, logits) in made["cases"].items():
        torch.testing.assert_close(fresh[name], logits, msg=f"{name}: a fresh process loads other logits")


@pytest.mark.parametrize("name", ["layer_prune-last", "layer_prune-measured", "weight_prune-wanda",
                                  "weight_prune-2:4-magnitude"])
def test_pruned_folders_hold_the_model_pruned_in_memory(made, name):
    model, tokenizer, _ = load_model(str(made["base"]))
    c = made["calibration"]
    llmshrink.prune(model, CASES[name], calibration=c.source, tokenizer=tokenizer, nsamples=c.nsamples,
                    seqlen=c.seqlen, progress=False)
    with torch.no_grad():
        torch.testing.assert_close(made["cases"][name][1], model(IDS).logits)


def test_each_output_differs_from_the_base_where_the_method_changes_the_function(made):
    with torch.no_grad():
        base = llmshrink.AutoModelForCausalLM.from_pretrained(made["base"])(IDS).logits
    for name, (_, logits) in made["cases"].items():
        if name == "pack":  # lossless: the very same logits
            torch.testing.assert_close(logits, base, rtol=0, atol=0)
        elif name.startswith("rotate"):  # other weights, the same function (to float rounding)
            assert not torch.equal(logits, base)
            torch.testing.assert_close(logits, base, rtol=1e-4, atol=1e-4)
        else:
            assert not torch.equal(logits, base), f"{name} left the model unchanged"
