"""Delta compression of a real (small) fine-tune of the packaged model: size, quality, loading."""

import json

import pytest
import torch

from llmshrink import AutoModelForCausalLM, DeltaConfig, DeltaModel, UsageError, compress_delta, load_tokenizer
from llmshrink.delta.load import META_FILE
from llmshrink.evals import perplexity_of_ids
from llmshrink.finetune import FinetuneConfig, domain_eval_text, finetuned_model
from llmshrink.io import folder_size
from llmshrink.safetensors_io import TensorIndex

pytestmark = pytest.mark.real

WINDOWS, SEQLEN = 12, 512


@pytest.fixture(scope="module")
def pair(real_model):
    _, tokenizer, base = real_model
    finetuned = str(finetuned_model(FinetuneConfig.small()))
    ids = torch.tensor(tokenizer(domain_eval_text()).input_ids[: WINDOWS * SEQLEN], dtype=torch.long)
    return base, finetuned, ids


def _ppl(model, ids):
    return perplexity_of_ids(model.eval(), ids, seqlen=SEQLEN).ppl


def test_bitdelta_is_14x_smaller_than_fp16_and_keeps_the_gain(pair, tmp_path, real_model):
    base, finetuned, ids = pair
    out = compress_delta("smollm2-135m", finetuned, DeltaConfig(), tmp_path / "d", progress=False)
    index = TensorIndex(finetuned)
    fp16 = sum(2 * t.numel() for t in map(index.get, index.keys()))
    ratio = fp16 / folder_size(out)
    assert ratio >= 14, f"bitdelta is only {ratio:.1f}x smaller than an fp16 copy"
    meta = json.loads((out / META_FILE).read_text())
    assert meta["base"]["name"] == "smollm2-135m"  # found again by name, wherever the cache is
    ppl_base = _ppl(real_model[0], ids)
    ppl_ft = _ppl(AutoModelForCausalLM.from_pretrained(finetuned), ids)
    delta_model = AutoModelForCausalLM.from_pretrained(out)
    ppl_delta = _ppl(delta_model, ids)
    assert ppl_ft < ppl_base, "the small fine-tune should improve the domain perplexity"
    kept = (ppl_base - ppl_delta) / (ppl_base - ppl_ft)
    assert kept > 0.8, f"bitdelta kept {kept:.0%} of the fine-tune's gain ({ppl_base:.3f} -> {ppl_delta:.3f} vs {ppl_ft:.3f})"
    # served from the compact delta on a shared base: the same logits as the applied delta
    served = DeltaModel("smollm2-135m")
    served.add("books", out)
    x = ids[:64].unsqueeze(0)
    with torch.no_grad(), served.use("books"):
        torch.testing.assert_close(served(x).logits, delta_model(x).logits, rtol=1e-3, atol=1e-3)
    # a delta applied to the wrong base fails, naming both hashes
    with pytest.raises(UsageError, match="but the delta was made from smollm2-135m with sha256"):
        AutoModelForCausalLM.from_pretrained(out, base_model=finetuned)


def test_cli_eval_reads_a_delta_folder_with_the_base_tokenizer(pair, tmp_path):
    from llmshrink.cli import main

    base, finetuned, _ = pair
    out = tmp_path / "d"
    assert main(["delta", "compress", "--base", base, "--finetuned", finetuned, "--out", str(out),
                 "--method", "lowrank", "--rank", "8"]) == 0
    assert load_tokenizer(str(out)).vocab_size == load_tokenizer(base).vocab_size
    assert main(["eval", "--model", str(out), "--tasks", "wiki", "--limit", "3", "--seqlen", "256",
                 "--gen-tokens", "0", "--output", str(tmp_path / "r.json")]) == 0
    assert json.loads((tmp_path / "r.json").read_text())["results"]["wiki"]["ppl"] > 1
