"""Perplexity protocols on the packaged model and corpora."""


import pytest
import torch

from llmshrink.evals import load_corpus, perplexity

pytestmark = pytest.mark.real


def test_sliding_equals_the_reference_loop(real_model, reference_perplexity):
    model, tokenizer, _ = real_model
    text = load_corpus("wiki", limit=12)
    ids = torch.tensor(tokenizer(text).input_ids)
    got = perplexity(model, tokenizer, text, seqlen=512, protocol="sliding", stride=256)
    want, count = reference_perplexity(model, ids, 512, 256)
    assert got.tokens_scored == count == len(ids) - 1
    assert abs(got.ppl - want) / want < 1e-4
    assert got.windows == len(range(0, len(ids) - 256, 256))


def test_gptq_equals_disjoint_windows_and_is_sane(real_model, reference_perplexity):
    model, tokenizer, _ = real_model
    text = load_corpus("wiki", limit=12)
    ids = torch.tensor(tokenizer(text).input_ids)
    got = perplexity(model, tokenizer, text, seqlen=512, protocol="gptq")
    n = len(ids) // 512
    want, count = reference_perplexity(model, ids[: n * 512], 512, 512)
    assert got.windows == n and got.tokens_scored == count == n * 511
    assert abs(got.ppl - want) / want < 1e-4
    # A 135M model on Wikipedia text: far better than uniform over 49k tokens, worse than 5.
    assert 5 < got.ppl < 60


def test_corpora_are_the_documented_text():
    wiki = load_corpus("wiki")
    passages = wiki.split("\n\n")
    assert len(passages) == len(set(passages)) > 2000  # unique BoolQ passages
    lambada = load_corpus("lambada", limit=3).split("\n\n")
    assert len(lambada) == 3 and lambada[0].endswith(" signs")
