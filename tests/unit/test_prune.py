"""Layer and weight pruning: the scores' math, planted redundancy found, checkpoints that load."""

import pytest
import torch

from llmshrink import LayerPruneConfig, UsageError, WeightPruneConfig, prune
from llmshrink.prune import algorithm as A
from llmshrink.prune import save_pruned

from conftest import tiny_llama

CALIB = torch.randint(0, 96, (8, 32), generator=torch.Generator().manual_seed(0))


def _silence(layer):
    """Make a decoder layer the identity: its attention and MLP add nothing to the residual."""
    with torch.no_grad():
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()


def test_cosine_scores_math():
    g = torch.Generator().manual_seed(0)
    h0 = torch.randn(10, 8, generator=g)
    states = [h0, h0.clone(), -h0, torch.randn(10, 8, generator=g)]
    cos = A.cosine_sums(states) / 10
    torch.testing.assert_close(cos.diagonal(), torch.ones(4, dtype=torch.float64))
    bi = A.block_influence(cos)
    assert bi[0].abs() < 1e-9 and abs(bi[1] - 2) < 1e-9  # identical -> 0; opposite -> 2
    ang = A.angular_distance(cos, 2)
    assert abs(ang[0] - 1) < 1e-6  # h0 vs -h0: pi / pi


def test_block_influence_and_angular_find_planted_identity_layers():
    model = tiny_llama(layers=6)
    _silence(model.model.layers[3])
    prune(model, LayerPruneConfig(layers=1, criterion="block_influence"), calibration=CALIB, progress=False)
    assert model.config.llmshrink_prune["removed"] == [3]
    model = tiny_llama(layers=6)
    _silence(model.model.layers[2])
    _silence(model.model.layers[3])
    prune(model, LayerPruneConfig(layers=2, criterion="angular"), calibration=CALIB, progress=False)
    record = model.config.llmshrink_prune
    assert record["removed"] == [2, 3] and min(record["angular"]) < 1e-3
    assert len(model.model.layers) == 4 and model.config.num_hidden_layers == 4


def test_removed_layers_renumber_the_cache_and_cut_per_layer_lists(tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_llama(layers=5)
    model.config.layer_types = ["full_attention"] * 4 + ["sliding_attention"]
    ids = torch.randint(0, 96, (1, 6), generator=torch.Generator().manual_seed(1))
    prune(model, LayerPruneConfig(layers=2, criterion="last"), progress=False)
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1, 2]
    assert model.config.layer_types == ["full_attention"] * 3
    with torch.no_grad():
        want = model(ids).logits
        generated = model.generate(ids, max_new_tokens=4, do_sample=False)  # the KV cache works
    save_pruned(model, None, tmp_path / "p")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "p")  # plain transformers, no llmshrink code
    assert loaded.config.num_hidden_layers == 3
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, want)
        assert torch.equal(loaded.generate(ids, max_new_tokens=4, do_sample=False), generated)


def test_weight_pruning_masks():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(6, 16, generator=g)
    keep = A.prune_mask(w.abs(), 0.5, "unstructured")
    assert keep.sum(1).tolist() == [8] * 6
    assert all(w.abs()[r][keep[r]].min() >= w.abs()[r][~keep[r]].max() for r in range(6))  # per row, the largest
    two_four = A.prune_mask(w.abs(), 0.5, "2:4")
    assert two_four.reshape(6, 4, 4).sum(-1).eq(2).all()
    with pytest.raises(UsageError, match="divisible by 4"):
        A.two_four_mask(torch.randn(2, 6))


@pytest.mark.parametrize("config", [WeightPruneConfig(score="magnitude"), WeightPruneConfig(),
                                    WeightPruneConfig(pattern="2:4"), WeightPruneConfig(scope="global", sparsity=0.3)],
                         ids=["magnitude", "wanda", "2:4", "global"])
def test_weight_pruning_reaches_the_sparsity(config):
    model = tiny_llama(layers=2)
    embed = model.model.embed_tokens.weight.clone()
    prune(model, config, calibration=CALIB, progress=False)
    linears = [m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n]
    zeros = sum(int((m.weight == 0).sum()) for m in linears) / sum(m.weight.numel() for m in linears)
    assert abs(zeros - config.sparsity) < 0.01 and abs(model.config.llmshrink_prune["sparsity"] - zeros) < 1e-6
    assert torch.equal(model.model.embed_tokens.weight, embed)  # only decoder linears are pruned


def test_wanda_weighs_by_input_norms():
    model = tiny_llama(layers=1)
    layer = model.model.layers[0].mlp.down_proj
    magnitude = tiny_llama(layers=1)
    prune(model, WeightPruneConfig(score="wanda"), calibration=CALIB, progress=False)
    prune(magnitude, WeightPruneConfig(score="magnitude"), calibration=CALIB, progress=False)
    assert not torch.equal(layer.weight == 0, magnitude.model.layers[0].mlp.down_proj.weight == 0)


@pytest.mark.parametrize("make,message", [
    (lambda: LayerPruneConfig(layers=2, criterion="entropy"), "criterion='entropy' is not known"),
    (lambda: LayerPruneConfig(layers=0), "removes nothing"),
    (lambda: WeightPruneConfig(sparsity=1.0), r"sparsity=1.0 must be in \[0, 1\)"),
    (lambda: WeightPruneConfig(sparsity=-0.5), r"sparsity=-0.5 must be in \[0, 1\)"),
    (lambda: WeightPruneConfig(pattern="2:4", scope="global"), "no global threshold"),
])
def test_bad_configs(make, message):
    with pytest.raises(UsageError, match=message):
        make()


def test_removing_every_layer_is_refused():
    model = tiny_llama(layers=3)
    with pytest.raises(UsageError, match="removing 3 of 3 decoder layers leaves none; remove at most 2"):
        prune(model, LayerPruneConfig(layers=3), calibration=CALIB, progress=False)
    assert len(model.model.layers) == 3


def test_cli_prune_writes_checkpoint_and_chart(tmp_path, monkeypatch, capsys):
    from llmshrink.cli import main

    model = tiny_llama(layers=4)
    model.save_pretrained(tmp_path / "src")
    import llmshrink.models as models

    class Tok:  # the CLI loads a tokenizer: stand in with token ids as calibration text
        def save_pretrained(self, path):
            pass

    monkeypatch.setattr(models, "load_model", lambda name: (tiny_llama(layers=4), Tok(), str(tmp_path / "src")))
    import importlib

    monkeypatch.setattr(importlib.import_module("llmshrink.prune.apply"), "_calibration", lambda *a, **k: CALIB)
    out = tmp_path / "pruned"
    assert main(["prune", "--model", str(tmp_path / "src"), "--layers", "1", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "layer scores" in text and "checkpoint written to" in text
    assert (tmp_path / "pruned-scores.png").stat().st_size > 1000 and (out / "config.json").is_file()
    assert main(["prune", "--layers", "1", "--sparsity", "0.5", "--out", str(tmp_path / "x")]) == 2
    assert "not both or neither" in capsys.readouterr().err
    assert main(["prune", "--sparsity", "0.5", "--pattern", "2:4", "--scope", "global", "--out", str(tmp_path / "y")]) == 2
    assert main(["prune", "--layers", "1", "--out", str(out)]) == 2  # not empty
