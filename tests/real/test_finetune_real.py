"""The fine-tuned test model: a full fine-tune of the default model that saves, reloads and helps.

Runs `FinetuneConfig.small()` (about a minute on 2 CPU cores) once for the module.
"""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from llmshrink import UsageError, resolve_model
from llmshrink.finetune import RECORD, FinetuneConfig, domain_perplexity, domain_texts, finetune, finetuned_model

pytestmark = pytest.mark.real


@pytest.fixture(scope="module")
def small_finetune(tmp_path_factory):
    config = FinetuneConfig.small()
    out = finetune("smollm2-135m", config, tmp_path_factory.mktemp("ft") / "small", progress=False)
    return out, config


def test_domain_split_is_disjoint_and_in_file_order():
    train, held_out = domain_texts()
    assert (len(train), len(held_out)) == (4653, 500)
    assert not set(train) & set(held_out)


def test_saved_folder_is_a_changed_finite_fp32_checkpoint(small_finetune):
    from transformers import AutoModelForCausalLM

    out, config = small_finetune
    record = json.loads((out / RECORD).read_text())
    assert FinetuneConfig.from_dict(record["config"]) == config
    assert record["steps_done"] == config.steps and record["base_folder"] == resolve_model("smollm2-135m")

    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # still tied
    tuned = load_file(str(out / "model.safetensors"))
    base = load_file(str(resolve_model("smollm2-135m") + "/model.safetensors"))
    assert tuned.keys() == base.keys()
    for name, weight in tuned.items():
        assert weight.dtype == torch.float32, name
        assert torch.isfinite(weight).all(), name
        assert not torch.equal(weight, base[name]), f"{name} did not train"  # all parameters, norms included


def test_domain_perplexity_dropped_and_survives_reload(small_finetune):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, config = small_finetune
    record = json.loads((out / RECORD).read_text())
    before, after = record["domain_ppl_before"], record["domain_ppl_after"]  # measured in finetune()
    assert math.isfinite(before) and after < 0.97 * before, (before, after)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    reloaded = domain_perplexity(model, AutoTokenizer.from_pretrained(out), seqlen=config.eval_seqlen,
                                 limit_windows=config.eval_windows)
    assert reloaded == pytest.approx(after, rel=1e-4)  # the saved weights are the trained ones


def test_finetuned_model_reuses_the_cache(small_finetune, tmp_path, monkeypatch):
    import os
    import shutil

    import llmshrink.finetune.run as ft  # where finetuned_model looks up resolve_model, _cache_name, finetune

    out, config = small_finetune
    base = resolve_model("smollm2-135m")
    monkeypatch.setenv("LLMSHRINK_CACHE", str(tmp_path))
    monkeypatch.setattr(ft, "resolve_model", lambda name: base)  # the base stays in the real cache
    expected = tmp_path / "models" / ft._cache_name(config, "smollm2-135m", base)
    assert expected.name.startswith("finetune-smollm2-135m-")
    shutil.copytree(out, expected, copy_function=os.link)  # hard links: no 0.5 GB copy

    def no_training(*args, **kwargs):
        raise AssertionError("finetuned_model trained again instead of reusing the cache")

    monkeypatch.setattr(ft, "finetune", no_training)
    assert finetuned_model(config) == expected
    other = FinetuneConfig.small()
    other.seed = 1
    assert ft._cache_name(other, "smollm2-135m", str(expected)) != expected.name


@pytest.mark.parametrize("change, message", [
    ({"steps": 0}, "steps >= 1"),
    ({"lr": 0.0}, "positive learning rate"),
    ({"warmup": 99}, "between 0 and steps"),
    ({"mixed_precision": "fp16"}, "use one of no, bf16"),
])
def test_bad_configs_are_usage_errors(change, message):
    with pytest.raises(UsageError, match=message):  # refused when built (a registered MethodConfig)
        FinetuneConfig(**change)
    config = FinetuneConfig()
    for key, value in change.items():  # and when changed after, by the functions that use it
        setattr(config, key, value)
    with pytest.raises(UsageError, match=message):
        finetune("smollm2-135m", config, "/nonexistent/never-written")
    with pytest.raises(UsageError, match=message):
        finetuned_model(config)


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_lr_schedule_warms_up_then_decays_without_reaching_zero(schedule):
    from llmshrink.finetune import lr_factor

    factors = [lr_factor(s, 10, 2, schedule) for s in range(10)]
    assert factors[:3] == [0.5, 1.0, factors[2]] and factors[2] < 1.0
    assert all(a > b for a, b in zip(factors[1:], factors[2:])) and factors[-1] > 0
