"""`llmshrink lm-eval`: lm-eval's own command line scores llmshrink's formats through `--model hf`
with exactly the numbers `llmshrink eval` gives (same items, both fp32)."""

import pytest

import llmshrink
from llmshrink.evals import EvalSpec, evaluate_model
from llmshrink.finetune import FinetuneConfig, finetuned_model

pytestmark = pytest.mark.real
TASKS, LIMIT = ["piqa", "arc_easy"], 50


@pytest.fixture(scope="module")
def folders(real_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("lm-eval")
    gptq = llmshrink.quantize("smollm2-135m", llmshrink.GPTQConfig(bits=4, algorithm="rtn", clip_search=False),
                              root / "q4", progress=False)  # a standard 4-bit GPTQ checkpoint; RTN keeps it quick
    delta = llmshrink.compress_delta("smollm2-135m", finetuned_model(FinetuneConfig.small()), llmshrink.DeltaConfig(),
                                     root / "delta", progress=False)
    return {"gptq": gptq, "delta": delta}


@pytest.mark.parametrize("kind", ["gptq", "delta"])
def test_lm_eval_through_llmshrink_scores_like_llmshrink_eval(folders, kind, tmp_path):
    pytest.importorskip("lm_eval")
    from transformers.utils import is_gptqmodel_available

    from llmshrink.evals.lm_eval_tasks import run_lm_eval

    assert not is_gptqmodel_available()  # lm-eval reads the GPTQ checkpoint through llmshrink alone
    theirs = run_lm_eval(str(folders[kind]), TASKS, LIMIT, tmp_path, through_llmshrink=True)
    ours = evaluate_model(EvalSpec(model=str(folders[kind]), tasks=tuple(TASKS), limit=LIMIT, dtype="float32",
                                   gen_tokens=0))["results"]
    for task in TASKS:
        assert ours[task]["n"] == LIMIT
        assert (theirs[task]["acc"], theirs[task]["acc_norm"]) == (ours[task]["acc"], ours[task]["acc_norm"]), task
