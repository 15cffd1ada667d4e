"""The shared training loop (llmshrink.train) on a tiny bigram model: schedule, accumulation, evals, time limit."""

import logging
import math

import pytest
import torch
import torch.nn.functional as F

from llmshrink.train import LoopConfig, lr_factor, setup_accelerator, train_loop


class Bigram(torch.nn.Module):
    def __init__(self, vocab: int = 11):
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(vocab, 8)
        self.head = torch.nn.Linear(8, vocab)

    def forward(self, x):
        return self.head(self.emb(x))  # [batch, seq, vocab]


def bigram_loss(model, x):
    logits = model(x)[:, :-1]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))


DATA = torch.randint(0, 11, (8, 6), generator=torch.Generator().manual_seed(1))  # [rows, seqlen]


def run(loop: LoopConfig, rows_per_micro: int, **kw):
    accelerator, _ = setup_accelerator(rows_per_micro)
    model = Bigram()
    optimizer = torch.optim.SGD(model.parameters(), lr=loop.lr)

    def batch(step, micro):
        first = (step * loop.grad_accum + micro) * rows_per_micro
        return DATA[[(first + b) % len(DATA) for b in range(rows_per_micro)]]

    result = train_loop(accelerator, model, optimizer, loop, batch, bigram_loss, progress=False, **kw)
    return result, model


def test_lr_factor_warms_up_then_decays_without_reaching_zero():
    factors = [lr_factor(s, 10, 2, "cosine") for s in range(10)]
    assert factors[:2] == [0.5, 1.0]
    assert all(a > b for a, b in zip(factors[1:], factors[2:])) and factors[-1] > 0
    assert lr_factor(9, 10, 0, "linear") == pytest.approx(1 / 11)
    assert lr_factor(0, 10, 0, "cosine") == pytest.approx(0.5 * (1 + math.cos(math.pi / 11)))


def test_two_micro_batches_of_one_row_train_like_one_batch_of_two():
    one, a = run(LoopConfig(steps=3, lr=0.5, max_grad_norm=0), rows_per_micro=2)
    two, b = run(LoopConfig(steps=3, lr=0.5, grad_accum=2, max_grad_norm=0), rows_per_micro=1)
    assert one.losses == pytest.approx(two.losses, rel=1e-5)
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
    with torch.no_grad():
        assert bigram_loss(a, DATA) < bigram_loss(Bigram(), DATA)  # it trained


def test_evaluations_at_zero_every_n_and_at_the_end():
    seen = []

    def evaluate(model, step):
        seen.append(model.training)
        return {"loss": bigram_loss(model, DATA).item()}

    result, _ = run(LoopConfig(steps=5, lr=0.5, eval_every=2), rows_per_micro=2, evaluate=evaluate)
    assert [e["step"] for e in result.evals] == [0, 2, 4, 5] and len(result.losses) == 5
    assert result.evals[-1]["loss"] < result.evals[0]["loss"]


def test_time_limit_stops_after_the_first_step_without_changing_the_schedule(caplog):
    lrs = []

    def spy(model, x):
        lrs.append(optimizer_lr[0])
        return bigram_loss(model, x)

    optimizer_lr = [None]
    accelerator, _ = setup_accelerator(2)
    model = Bigram()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)

    def batch(step, micro):
        optimizer_lr[0] = optimizer.param_groups[0]["lr"]
        return DATA[:2]

    with caplog.at_level(logging.WARNING):
        result = train_loop(accelerator, model, optimizer, LoopConfig(steps=4, lr=0.5, warmup=0, max_minutes=1e-9),
                            batch, spy, progress=False)
    assert result.steps_done == 1 and len(result.losses) == 1
    assert lrs == [pytest.approx(0.5 * lr_factor(0, 4, 0, "cosine"))]
    assert "max_minutes=1e-09 reached: stopping after 1 of 4 steps" in caplog.text
