"""Healing the default model with its last decoder layers removed: LoRA + distillation from the
original lowers the held-out wiki perplexity, and the merged checkpoint scores what the adapter did."""

import json

import pytest
import torch

from llmshrink.heal import RECORD, HealConfig, heal
from llmshrink.heal.run import _held_out_ids
from llmshrink.prune import LayerPruneConfig, prune, save_pruned

pytestmark = pytest.mark.real


def test_lora_kd_heals_a_pruned_default_model_and_merges(real_model, tmp_path):
    from transformers import AutoModelForCausalLM

    from llmshrink.evals.perplexity import perplexity_of_ids

    model, tokenizer, resolved = real_model
    pruned = AutoModelForCausalLM.from_pretrained(resolved, dtype=torch.float32)
    prune(pruned, LayerPruneConfig(layers=4, criterion="last"), tokenizer=tokenizer, progress=False)
    save_pruned(pruned, tokenizer, tmp_path / "pruned")
    del pruned

    config = HealConfig(loss="ce+kd", alpha=0.5, steps=4, seqlen=64, batch_size=2, rank=8, lora_alpha=16,
                        lr=2e-3, warmup=1, nsamples=8, eval_every=4, eval_docs=10, eval_seqlen=128, eval_windows=2,
                        merge=True)
    out = heal(tmp_path / "pruned", config, tmp_path / "healed", teacher=resolved, progress=False)
    record = json.loads((out / RECORD).read_text())
    before, after = record["evals"][0]["ppl"], record["evals"][-1]["ppl"]
    assert [e["step"] for e in record["evals"]] == [0, 4]
    assert after < 0.85 * before, (before, after)

    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert merged.config.num_hidden_layers == model.config.num_hidden_layers - 4
    ppl = perplexity_of_ids(merged, _held_out_ids(tokenizer, config), seqlen=config.eval_seqlen, protocol="gptq").ppl
    assert ppl == pytest.approx(after, rel=1e-3)


def test_lora_on_a_3bit_checkpoint_of_the_default_model_lowers_its_perplexity(real_model, tmp_path):
    """LoRA trained on a GPTQ-format checkpoint (its packed QuantLinear modules as peft base layers)."""
    import llmshrink
    from llmshrink import GPTQConfig
    from llmshrink.evals.perplexity import perplexity_of_ids
    from llmshrink.gptq.linear import QuantLinear

    model, tokenizer, resolved = real_model
    q = llmshrink.quantize(resolved, GPTQConfig(bits=3, group_size=128, algorithm="rtn", clip_search=False),
                           tmp_path / "rtn3", progress=False)
    config = HealConfig(loss="ce+kd", steps=4, seqlen=64, batch_size=2, rank=8, lora_alpha=16, lr=2e-3, warmup=1,
                        nsamples=8, eval_every=4, eval_docs=10, eval_seqlen=128, eval_windows=2)
    out = heal(q, config, tmp_path / "adapter", teacher=resolved, progress=False)
    record = json.loads((out / RECORD).read_text())
    before, after = record["evals"][0]["ppl"], record["evals"][-1]["ppl"]
    assert after < 0.9 * before, (before, after)

    loaded = llmshrink.AutoModelForCausalLM.from_pretrained(out)  # the GPTQ base recorded in the adapter
    assert sum(isinstance(m, QuantLinear) for m in loaded.modules()) == 7 * model.config.num_hidden_layers
    ppl = perplexity_of_ids(loaded, _held_out_ids(tokenizer, config), seqlen=config.eval_seqlen, protocol="gptq").ppl
    assert ppl == pytest.approx(after, rel=1e-3)
