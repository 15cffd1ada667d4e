"""Downstream task definitions, written to match lm-evaluation-harness 0.4.13's built-in tasks.

Each task turns a document into loglikelihood requests `(context, continuation)` exactly as
lm-eval does (same prompt, same target delimiter " ", same text clean-up), so numbers compare
with published ones. Multiple-choice tasks report `acc` (argmax of summed log-likelihood) and,
where lm-eval does, `acc_norm` (log-likelihood divided by the choice's length in characters,
lm-eval's `completion_len`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

__all__ = ["Item", "Task", "TASKS", "PPL_TASKS"]


@dataclass(frozen=True)
class Item:
    """One document as requests: `requests[i]` is scored for choice i."""

    requests: list[tuple[str, str]]  # (context, continuation)
    gold: int
    choices: list[str]  # lm-eval's doc_to_choice, whose lengths normalise acc_norm


@dataclass(frozen=True)
class Task:
    name: str
    build: Callable[[dict], Item]
    metrics: tuple[str, ...]  # acc, acc_norm for multiple choice; acc (greedy) + ppl for lambada
    kind: str = "multiple_choice"  # or "greedy": one request, acc = every token is the argmax


def _choices(context: str, choices: list[str], gold: int) -> Item:
    return Item([(context, " " + c) for c in choices], gold, list(choices))


def _piqa(doc: dict) -> Item:
    return _choices(f"Question: {doc['goal']}\nAnswer:", [doc["sol1"], doc["sol2"]], int(doc["label"]))


def _hellaswag_clean(text: str) -> str:
    text = text.strip()
    text = text.replace(" [title]", ". ")  # WikiHow artifacts
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def _hellaswag(doc: dict) -> Item:
    ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
    query = _hellaswag_clean(doc["activity_label"] + ": " + ctx)
    return _choices(query, [_hellaswag_clean(e) for e in doc["endings"]], int(doc["label"]))


def _arc(doc: dict) -> Item:
    gold = doc["choices"]["label"].index(doc["answerKey"])
    return _choices(f"Question: {doc['question']}\nAnswer:", doc["choices"]["text"], gold)


def _winogrande(doc: dict) -> Item:
    # Partial scoring: the option fills the blank in the context; the shared suffix is scored.
    blank = doc["sentence"].index("_")
    suffix = doc["sentence"][blank + 1:].strip()
    contexts = [doc["sentence"][:blank] + opt for opt in (doc["option1"], doc["option2"])]
    return Item([(c, " " + suffix) for c in contexts], {"1": 0, "2": 1}[doc["answer"]], contexts)


def _boolq(doc: dict) -> Item:
    return _choices(f"{doc['passage']}\nQuestion: {doc['question']}?\nAnswer:", ["no", "yes"],
                    int(bool(doc["answer"])))


def _lambada(doc: dict) -> Item:
    return Item([(doc["context"], doc["continuation"])], 0, [doc["continuation"]])


TASKS: dict[str, Task] = {
    t.name: t
    for t in [
        Task("piqa", _piqa, ("acc", "acc_norm")),
        Task("hellaswag", _hellaswag, ("acc", "acc_norm")),
        Task("arc_easy", _arc, ("acc", "acc_norm")),
        Task("arc_challenge", _arc, ("acc", "acc_norm")),
        Task("winogrande", _winogrande, ("acc",)),
        Task("boolq", _boolq, ("acc",)),
        Task("lambada", _lambada, ("acc", "ppl"), kind="greedy"),
    ]
}

# Perplexity tasks: task name -> corpus name (see data.CORPORA).
PPL_TASKS: dict[str, str] = {"wiki": "wiki", "lambada_ppl": "lambada"}
