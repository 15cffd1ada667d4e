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
    """The criteria alone (candidates=1; on random tokens a random model's loss says nothing)."""
    model = tiny_llama(layers=6)
    _silence(model.model.layers[3])
    prune(model, LayerPruneConfig(layers=1, criterion="block_influence", candidates=1), calibration=CALIB,
          progress=False)
    assert model.config.llmshrink_prune["removed"] == [3]
    model = tiny_llama(layers=6)
    _silence(model.model.layers[2])
    _silence(model.model.layers[3])
    prune(model, LayerPruneConfig(layers=2, criterion="angular", candidates=1), calibration=CALIB, progress=False)
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
    import importlib

    class Tok:  # the CLI loads a tokenizer: stand in with token ids as calibration text
        def save_pretrained(self, path):
            pass

    monkeypatch.setattr(importlib.import_module("llmshrink.prune.cli"), "load_model",
                        lambda name: (tiny_llama(layers=4), Tok(), str(tmp_path / "src")))
    monkeypatch.setattr(importlib.import_module("llmshrink.prune.apply"), "resolve_calibration",
                        lambda *a, **k: (CALIB, {}))
    out = tmp_path / "pruned"
    assert main(["prune", "--model", str(tmp_path / "src"), "--layers", "1", "--out", str(out),
                 "--calib-seqlen", "32"]) == 0
    text = capsys.readouterr().out
    assert "layer scores" in text and "checkpoint written to" in text and "removals, measured" in text
    assert (tmp_path / "pruned-scores.png").stat().st_size > 1000 and (out / "config.json").is_file()
    assert main(["prune", "--layers", "1", "--sparsity", "0.5", "--out", str(tmp_path / "x")]) == 2
    assert "not both or neither" in capsys.readouterr().err
    assert main(["prune", "--sparsity", "0.5", "--pattern", "2:4", "--scope", "global", "--out", str(tmp_path / "y")]) == 2
    assert main(["prune", "--layers", "1", "--out", str(out)]) == 2  # not empty


def _planted_model(path):
    """A 4-layer model where the layer the proxy likes best (2: it barely changes its input) is the
    one that predicts: layers 0, 1 and 3 write large vectors into dimensions nothing reads (low
    cosine in/out, so block influence keeps them), layer 2 writes a small vector that the head
    amplifies into the next character of the cycle 'abcdefgh'. Saved with a one-char tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from conftest import char_tokenizer

    tokenizer = char_tokenizer()
    cycle = tokenizer.convert_tokens_to_ids(list("abcdefgh"))
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=16, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.zero_()
        for j, token in enumerate(cycle):
            model.model.embed_tokens.weight[token, j] = 1.0  # dims 0-7: which character
        for index, layer in enumerate(model.model.layers):
            mlp = layer.mlp
            if index == 2:  # the predictor: unit j fires on character j, writes a hint of j + 1 into dims 8-15
                for j in range(8):
                    mlp.gate_proj.weight[j, j] = mlp.up_proj.weight[j, j] = 1.0
                    mlp.down_proj.weight[8 + (j + 1) % 8, j] = 0.05
            else:  # large and harmless: one unit on every character, writing into its own unread dimension
                mlp.gate_proj.weight[0, :8] = mlp.up_proj.weight[0, :8] = 1.0
                mlp.down_proj.weight[24 + index, 0] = 0.1
        for j, token in enumerate(cycle):
            model.lm_head.weight[token, 8 + j] = 100.0
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_prune_measures_the_proxy_s_pick_and_avoids_a_layer_that_hurts(tmp_path, capsys, caplog):
    import json

    from llmshrink.cli import main

    src = _planted_model(tmp_path / "src")
    text = tmp_path / "cycle.txt"
    text.write_text("abcdefgh" * 400)
    common = ["--model", str(src), "--layers", "1", "--calib-file", str(text), "--nsamples", "8",
              "--calib-seqlen", "32", "--plot", str(tmp_path / "chart.png")]
    assert main(["prune", *common, "--out", str(tmp_path / "measured")]) == 0
    record = json.loads((tmp_path / "measured" / "config.json").read_text())["llmshrink_prune"]
    measured = record["measured"]
    assert measured["candidates"][0]["layers"] == [2]  # the proxy's favourite ...
    assert min(record["block_influence"]) == record["block_influence"][2]
    assert measured["candidates"][0]["calib_ppl"] > 20 * measured["calib_ppl_original"]  # ... breaks the model
    assert record["removed"] != [2] and measured["candidates"][measured["chosen"]]["layers"] == record["removed"]
    assert measured["candidates"][measured["chosen"]]["calib_ppl"] < 1.5 * measured["calib_ppl_original"]
    assert "removals, measured" in capsys.readouterr().out

    caplog.clear()
    assert main(["prune", *common, "--candidates", "1", "--out", str(tmp_path / "trusted")]) == 0
    record = json.loads((tmp_path / "trusted" / "config.json").read_text())["llmshrink_prune"]
    assert record["removed"] == [2]  # the proxy alone takes it, and the command says what it did
    assert any("may be broken" in r.getMessage() for r in caplog.records)


def test_angular_never_removes_the_final_layer():
    cos = torch.ones(7, 7, dtype=torch.float64)  # 6 layers
    cos[5, 6] = cos[6, 5] = 1.0  # the last layer's run is the most similar ...
    for i in range(6):
        for j in range(7):
            if (i, j) != (5, 6) and i != j:
                cos[i, j] = 0.5
    candidates = A.removal_candidates("angular", cos, 1, k=6)
    assert [5] not in [layers for layers, _ in candidates] and len(candidates) == 5
    assert all(max(layers) < 5 for layers, _ in A.removal_candidates("angular", cos, 3, k=6))
