import torch

from llmshrink.evals.loglikelihood import encode_pair, loglikelihoods


def _one_by_one(model, tok, requests):
    out = []
    for ctx, cont in requests:
        c, x = encode_pair(tok, ctx, cont)
        ids = torch.tensor([c + x])
        with torch.no_grad():
            logp = model(ids).logits[0, len(c) - 1:-1].double().log_softmax(-1)
        target = torch.tensor(x)
        out.append((logp.gather(-1, target[:, None]).sum().item(), bool((logp.argmax(-1) == target).all())))
    return out


def test_trailing_context_spaces_move_to_the_continuation(tiny):
    _, tok = tiny
    ctx, cont = encode_pair(tok, "Answer: ", "yes")
    assert ctx == tok.encode("Answer:") and cont == tok.encode(" yes")


def test_left_padded_batches_equal_unbatched_scores(tiny):
    model, tok = tiny
    requests = [("Question: what is red?\nAnswer:", " an apple"), ("Q:", " a"),
                ("A much longer context that goes on and on for a while", " and ends here."),
                ("", "no context at all"), ("mid", " dle of the road")]
    want = _one_by_one(model, tok, requests)
    got = loglikelihoods(model, tok, requests, batch_tokens=256, max_batch=3)
    for (g, gg), (w, wg) in zip(got, want):
        assert abs(g - w) < 1e-4 and gg == wg
    alone = [loglikelihoods(model, tok, [r], max_batch=1)[0] for r in requests]
    for (g, _), (a, _) in zip(got, alone):
        assert abs(g - a) < 1e-4
    assert all(ll < 0 for ll, _ in got)


def test_truncation_keeps_the_last_tokens(tiny):
    model, tok = tiny
    long_ctx = "x" * 300  # longer than the model's 256 positions
    (ll, _), = loglikelihoods(model, tok, [(long_ctx, " end")])
    (ll_short, _), = loglikelihoods(model, tok, [(long_ctx[-(256 - 4 + 1):], " end")], max_length=256)
    assert abs(ll - ll_short) < 1e-4
