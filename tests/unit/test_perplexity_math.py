import pytest
import torch

from llmshrink.evals.perplexity import perplexity, plan_windows, window_nll


@pytest.mark.parametrize("n,seqlen,stride", [(100, 16, 8), (101, 16, 5), (16, 16, 16), (7, 16, 4), (300, 64, 63)])
def test_sliding_windows_score_every_token_but_the_first_once(n, seqlen, stride):
    scored = []
    for begin, end, score_from in plan_windows(n, seqlen, "sliding", stride):
        assert end - begin <= seqlen and score_from >= 1
        scored += range(begin + score_from, end)
    assert sorted(scored) == list(range(1, n))


def test_sliding_with_stride_equal_to_seqlen_skips_each_windows_first_token():
    windows = plan_windows(300, 64, "sliding", 64)
    scored = sorted(t for b, e, s in windows for t in range(b + s, e))
    assert scored == [t for t in range(300) if t % 64 != 0]


def test_gptq_windows_are_disjoint_full_windows():
    windows = plan_windows(100, 16, "gptq")
    assert windows == [(i * 16, (i + 1) * 16, 1) for i in range(6)]


def test_window_nll_matches_a_hand_computed_sum(tiny):
    model, _ = tiny
    torch.manual_seed(1)
    ids = torch.randint(1, 96, (2, 20))
    with torch.no_grad():
        logp = model(ids).logits.double().log_softmax(-1)
        want = torch.stack([-sum(logp[b, t - 1, ids[b, t]] for t in range(5, 20)) for b in range(2)])
        got = window_nll(model, ids, score_from=5, chunk=4)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("protocol", ["sliding", "gptq"])
def test_batched_perplexity_equals_one_window_at_a_time(tiny, protocol, reference_perplexity):
    model, tok = tiny
    text = "the quick brown fox jumps over the lazy dog. " * 9
    ids = torch.tensor(tok(text).input_ids)
    got = perplexity(model, tok, text, seqlen=64, protocol=protocol, stride=24, batch_tokens=256)
    if protocol == "sliding":
        want, count = reference_perplexity(model, ids, 64, 24)
    else:
        want, count = reference_perplexity(model, ids[: len(ids) // 64 * 64], 64, 64)
    assert got.tokens_scored == count
    assert got.ppl == pytest.approx(want, rel=1e-5)


def test_too_short_text_is_a_clear_error(tiny):
    model, tok = tiny
    with pytest.raises(ValueError, match="too few for one window"):
        perplexity(model, tok, "short", seqlen=64)
