"""Mixed precision under a budget (`target_bits`), rotation inside quantize (`rotate`), and `dynamic` checks."""

import itertools
import json
import random
from collections import Counter

import pytest
import torch

from llmshrink import UsageError
from llmshrink.gptq.config import GPTQConfig
from llmshrink.hub import model_card
from llmshrink.gptq.linear import QuantLinear
from llmshrink.gptq.load import load_quantized
from llmshrink.gptq.mixed import allocate, plan_rules, stored_bits
from llmshrink.gptq.packing import dequantize_gptq
from llmshrink.gptq.quantize import quantize, quantize_checkpoint
from test_gptq_apply import _calib, _save_tiny


def test_stored_bits_is_what_the_packed_tensors_take():
    for bits, group_size, (i, o) in [(2, 16, (64, 32)), (3, 32, (96, 64)), (4, -1, (64, 96)), (8, 16, (32, 32))]:
        layer = QuantLinear(i, o, bits, group_size, bias=False)
        on_disk = sum(layer.get_buffer(n).numel() * layer.get_buffer(n).element_size() * 8
                      for n in ("qweight", "qzeros", "scales", "g_idx"))
        assert stored_bits(bits, group_size, i, o) == on_disk


def _brute_force(options, budget):
    names = list(options)
    best = None
    for combo in itertools.product(*[list(options[n]) for n in names]):
        size = sum(options[n][b][0] for n, b in zip(names, combo))
        loss = sum(options[n][b][1] for n, b in zip(names, combo))
        if size <= budget and (best is None or loss < best[0]):
            best = (loss, dict(zip(names, combo)))
    return best


def test_allocation_meets_the_budget_and_is_near_the_exact_optimum():
    rng = random.Random(0)
    gaps = []
    for _ in range(40):
        options = {}
        for m in range(4):
            n, scale = rng.choice([1000, 3000, 8000]), rng.lognormvariate(0, 2)
            options[f"m{m}"] = {b: (n * b + 50, scale * 4.0 ** (-b) * rng.uniform(0.8, 1.2)) for b in (2, 3, 4, 8)}
        smallest = sum(min(s for s, _ in o.values()) for o in options.values())
        largest = sum(max(s for s, _ in o.values()) for o in options.values())
        budget = rng.uniform(smallest, largest)
        plan = allocate(options, budget)
        assert sum(options[n][b][0] for n, b in plan.items()) <= budget
        exact_loss, _ = _brute_force(options, budget)
        loss = sum(options[n][b][1] for n, b in plan.items())
        gaps.append(loss / exact_loss)
    assert max(gaps) < 1.35 and sorted(gaps)[len(gaps) // 2] < 1.01  # the median case is optimal


def test_allocation_gives_the_bits_to_the_sensitive_linear():
    options = {"calm": {b: (1000 * b, 1.0 * 4.0 ** -b) for b in (2, 3, 4, 8)},
               "touchy": {b: (1000 * b, 100.0 * 4.0 ** -b) for b in (2, 3, 4, 8)}}
    plan = allocate(options, 7000)
    assert plan["touchy"] > plan["calm"] and plan["touchy"] + plan["calm"] <= 7
    with pytest.raises(ValueError):
        allocate(options, 3999)


def test_plan_rules_name_every_linear_off_the_most_common_width():
    base, rules = plan_rules({"a.x": 4, "a.y": 4, "b.x": 2})
    assert base == 4 and rules == {r"+:b\.x": {"bits": 2}}


def test_target_bits_writes_a_plan_that_the_loader_reads(tmp_path):
    original = _save_tiny(tmp_path / "src", "llama")
    config = GPTQConfig(bits=4, group_size=16, target_bits=5.5)
    out = quantize_checkpoint(tmp_path / "src", config, _calib(), tmp_path / "q", progress=False)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    record = json.loads((out / "mixed_precision.json").read_text())
    plan = record["plan"]
    assert len(plan) == 21 and len(set(plan.values())) > 1  # every layer linear, not one width for all
    assert qc["llmshrink"]["mixed_precision"]["achieved_bits"] <= 5.5 == record["target_bits"]
    assert all(k.startswith("+:") for k in qc["dynamic"]) and qc["bits"] == plan_rules(plan)[0]
    loaded = load_quantized(out)
    bits = {n: m.bits for n, m in loaded.named_modules() if isinstance(m, QuantLinear)}
    assert bits == plan
    stored = sum(m.qweight.numel() * 32 + m.qzeros.numel() * 32 + m.scales.numel() * 16 + m.g_idx.numel() * 32
                 for m in loaded.modules() if isinstance(m, QuantLinear))
    weights = sum(m.in_features * m.out_features for m in loaded.modules() if isinstance(m, QuantLinear))
    assert stored / weights == pytest.approx(qc["llmshrink"]["mixed_precision"]["achieved_bits"], abs=1e-3)
    with torch.no_grad():  # the checkpoint computes with what it stores, at each linear's own width
        for name, m in loaded.named_modules():
            if isinstance(m, QuantLinear):
                original.get_submodule(name).weight.copy_(dequantize_gptq(m.qweight, m.qzeros, m.scales, m.g_idx, m.bits))
        for name, p in loaded.named_parameters():  # embeddings and norms as stored (fp16)
            original.get_parameter(name).copy_(p)
        ids = _calib(2, 16)
        assert torch.allclose(loaded(ids).logits, original(ids).logits, atol=1e-4)

    card = model_card(out, "me/tiny-mixed")
    counts = ", ".join(f"{n} linears at {b} bits" for b, n in sorted(Counter(plan.values()).items()))
    assert f"Mixed precision: {record['achieved_bits']:.3f} bits per weight" in card and counts in card

    again = quantize_checkpoint(tmp_path / "src", GPTQConfig(bits=4, group_size=16, target_bits=5.5), _calib(),
                                tmp_path / "again", progress=False, sensitivity=out)
    assert json.loads((again / "mixed_precision.json").read_text())["plan"] == plan
    assert (again / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()
    bigger = quantize_checkpoint(tmp_path / "src", GPTQConfig(bits=4, group_size=16, target_bits=7), _calib(),
                                 tmp_path / "bigger", progress=False, sensitivity=out / "mixed_precision.json")
    big_plan = json.loads((bigger / "mixed_precision.json").read_text())["plan"]
    assert sum(big_plan.values()) > sum(plan.values())


def test_budget_and_sensitivity_mistakes_fail_before_any_work(tmp_path):
    _save_tiny(tmp_path / "src", "llama")
    with pytest.raises(UsageError, match=r"target_bits=2.5 is below .* group size 16"):
        quantize_checkpoint(tmp_path / "src", GPTQConfig(group_size=16, target_bits=2.5), _calib(), tmp_path / "a",
                            progress=False)
    for bad in (1.5, 8.5):
        with pytest.raises(UsageError, match="outside 2..8"):
            GPTQConfig(target_bits=bad)
    with pytest.raises(UsageError, match="keep only '-:' skip rules"):
        GPTQConfig(target_bits=4, dynamic={"re:.*down_proj": {"group_size": 32}})
    out = quantize_checkpoint(tmp_path / "src", GPTQConfig(group_size=16, target_bits=6), _calib(), tmp_path / "q",
                              progress=False)
    _save_tiny(tmp_path / "other", "llama", seed=1)
    with pytest.raises(UsageError, match="measured on another model"):
        quantize_checkpoint(tmp_path / "other", GPTQConfig(group_size=16, target_bits=6), _calib(), tmp_path / "b",
                            progress=False, sensitivity=out)
    with pytest.raises(UsageError, match="at group size 16, not 32"):
        quantize_checkpoint(tmp_path / "src", GPTQConfig(group_size=32, target_bits=6), _calib(), tmp_path / "c",
                            progress=False, sensitivity=out)
    assert not any((tmp_path / n).exists() for n in "abc")


def test_a_dynamic_rule_that_matches_nothing_fails_before_any_work(tmp_path):
    _save_tiny(tmp_path / "src", "llama")
    with pytest.raises(UsageError, match=r"dynamic rule 're:.*mlp\.down_prj' matches no linear .*model\.layers\.0"):
        quantize_checkpoint(tmp_path / "src", GPTQConfig(group_size=16, dynamic={"re:.*mlp.down_prj": {"bits": 8}}),
                            _calib(), tmp_path / "q", progress=False)
    assert not (tmp_path / "q").exists() and not (tmp_path / "q.partial").exists()


def test_rotate_inside_quantize_gives_a_standard_checkpoint_of_the_rotated_model(tmp_path):
    original = _save_tiny(tmp_path / "src", "llama", tie_word_embeddings=False)
    ids = _calib(2, 16)
    out = quantize(str(tmp_path / "src"), GPTQConfig(bits=8, group_size=16, rotate="hadamard"), tmp_path / "q",
                   calibration=_calib(), progress=False)
    config = json.loads((out / "config.json").read_text())
    assert "Quantized after a hadamard rotation folded into the weights" in model_card(out, "me/tiny-rot")
    assert config["llmshrink_rotate"]["config"]["kind"] == "hadamard" and config["quantization_config"]["llmshrink"]["config"]["rotate"] == "hadamard"
    plain = quantize(str(tmp_path / "src"), GPTQConfig(bits=8, group_size=16), tmp_path / "plain",
                     calibration=_calib(), progress=False)
    with torch.no_grad():
        want = original(ids).logits
        rotated, unrotated = load_quantized(out)(ids).logits, load_quantized(plain)(ids).logits
    # the same function at 8 bits: the rotated checkpoint's logits are as close to the original's as the plain one's
    assert (rotated - want).abs().max() < 3 * (unrotated - want).abs().max() + 1e-3
    assert not torch.allclose(load_quantized(out).model.layers[0].self_attn.q_proj.qweight,
                              load_quantized(plain).model.layers[0].self_attn.q_proj.qweight)


def test_a_recipe_step_takes_rotate_target_bits_and_fp_target(tmp_path):  # embed_bits: tests/unit/test_embed_bits.py
    from conftest import tiny_with_calibration
    from llmshrink.pipeline import load_recipe, run_recipe

    tiny = tiny_with_calibration(tmp_path)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {tiny['base']}\nseed: 0\ncalibration: {{source: {tiny['calib']}, nsamples: 4, seqlen: 32}}\n"
                      "steps:\n  - {method: gptq, group_size: 16, rotate: hadamard, target_bits: 6, fp_target: 0.5}\n"
                      f"out: {tmp_path / 'run'}\n")
    run_recipe(load_recipe(recipe), progress=False)
    out = tmp_path / "run" / "model"
    config = json.loads((out / "config.json").read_text())
    record = config["quantization_config"]["llmshrink"]
    assert config["llmshrink_rotate"]["config"]["kind"] == "hadamard" and record["config"]["fp_target"] == 0.5
    assert record["mixed_precision"]["target_bits"] == 6 and record["mixed_precision"]["achieved_bits"] <= 6
    model = load_quantized(out)
    assert {m.bits for m in model.modules() if isinstance(m, QuantLinear)} == set(
        json.loads((out / "mixed_precision.json").read_text())["plan"].values())
