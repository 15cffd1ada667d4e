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


@pytest.mark.parametrize("protocol", ["gptq", "sliding"])
def test_bos_auto_leaves_the_default_models_numbers_as_they_were(real_model, protocol):
    """SmolLM2's tokenizer adds no BOS: `auto` resolves to no BOS and the numbers are those of the
    text tokenized as before (`tokenizer(text)`, special tokens and all), bit for bit."""
    from llmshrink.evals import perplexity_of_ids
    from llmshrink.evals.perplexity import tokenizer_adds_bos

    model, tokenizer, _ = real_model
    text = load_corpus("wiki", limit=6)
    assert not tokenizer_adds_bos(tokenizer)
    got = perplexity(model, tokenizer, text, seqlen=512, protocol=protocol, stride=256)
    before = perplexity_of_ids(model, torch.tensor(tokenizer(text).input_ids), seqlen=512, protocol=protocol, stride=256)
    assert got.bos is False and got.to_dict() == before.to_dict()


def test_rolling_equals_lm_eval_on_the_default_model(real_model):
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from llmshrink.evals.data import corpus_documents

    model, tokenizer, _ = real_model
    docs = corpus_documents("wiki")[:3]
    got = perplexity(model, tokenizer, docs, protocol="rolling", seqlen=128)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, max_length=128, batch_size=4, device="cpu")
    lls = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (d,), i) for i, d in enumerate(docs)],
                                   disable_tqdm=True)
    assert got.nll == pytest.approx(-sum(lls), rel=1e-4) and got.windows > len(docs)
    assert got.bos is False and got.tokens_scored == sum(len(tokenizer(d).input_ids) for d in docs)
