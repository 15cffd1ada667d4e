"""factorize, width_prune and share on the default model: each output loads in a fresh process with
the in-memory model's logits, and each beats its naive baseline on held-out wiki text."""

import pytest
import torch

from llmshrink import load_model
from llmshrink.evals import load_corpus, perplexity_of_ids
from llmshrink.factorize import FactorizeConfig, factorize, save_factorized
from llmshrink.share import ShareConfig, save_shared, share
from llmshrink.width_prune import WidthPruneConfig, width_prune

from conftest import fresh_logits

pytestmark = pytest.mark.real

CALIB = dict(nsamples=8, seqlen=256, progress=False)  # small calibration: these are load-and-sanity checks


@pytest.fixture(scope="module")
def held_out(real_model):
    _, tokenizer, _ = real_model
    return torch.tensor(tokenizer(load_corpus("wiki", limit=40)).input_ids[: 4 * 256])


def ppl(model, ids) -> float:
    with torch.inference_mode():
        return perplexity_of_ids(model, ids, seqlen=256, protocol="gptq").ppl


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.fixture(scope="module")
def factorized(real_model, tmp_path_factory):
    """The default model factorized to 0.9 (whitened, allocated), in memory and saved."""
    _, tokenizer, resolved = real_model
    model, _, _ = load_model(resolved)
    factorize(model, FactorizeConfig(ratio=0.9), tokenizer=tokenizer, **CALIB)
    return model, save_factorized(model, tokenizer, tmp_path_factory.mktemp("factorized") / "f")


def test_factorize_whitened_beats_plain_svd_and_loads_in_a_fresh_process(real_model, factorized, held_out, tmp_path):
    _, tokenizer, resolved = real_model
    ids = held_out[None, :64]
    whitened, out = factorized
    plain, _, _ = load_model(resolved)
    factorize(plain, FactorizeConfig(ratio=0.9, whiten=False, allocate="uniform"), **CALIB)
    a, b = ppl(whitened, held_out), ppl(plain, held_out)
    assert a < 0.5 * b, f"whitened + allocated {a:.1f} is not well below plain SVD's {b:.1f}"
    torch.testing.assert_close(fresh_logits(out, ids, "llmshrink", tmp_path), logits(whitened, ids),
                               rtol=1e-4, atol=1e-4)


def test_gptq_of_the_factors_stays_near_the_factorized_model_and_loads_in_a_fresh_process(factorized, held_out,
                                                                                           tmp_path):
    """GPTQ 4-bit of a factorized folder (each factor a linear of its own): transformers after
    `import llmshrink` loads it with llmshrink's logits, and 4-bit factors cost a bounded share of
    the factorized model's perplexity (bench/factorize_gptq.py: +24.5% with 128 calibration windows)."""
    import llmshrink
    from llmshrink import GPTQConfig

    model, source = factorized
    ids = held_out[None, :64]
    out = llmshrink.quantize(str(source), GPTQConfig(bits=4, group_size=128), tmp_path / "q", calibration="wiki",
                             nsamples=CALIB["nsamples"], seqlen=CALIB["seqlen"], progress=False)
    quantized = llmshrink.AutoModelForCausalLM.from_pretrained(out)  # the default load dtype, as the fresh load
    a, b = ppl(quantized, held_out), ppl(model, held_out)
    assert a < 1.5 * b, f"4-bit factors {a:.1f} cost over 1.5x the factorized model's perplexity {b:.1f}"
    torch.testing.assert_close(fresh_logits(out, ids, "transformers+llmshrink", tmp_path), logits(quantized, ids),
                               rtol=1e-4, atol=1e-4)


def test_width_prune_output_is_a_plain_checkpoint_with_the_in_memory_logits(real_model, held_out, tmp_path):
    original, tokenizer, resolved = real_model
    ids = held_out[None, :64]
    # the least-squares refit (the default) against energy scores alone, with enough calibration for
    # the refit (32 x 256 tokens, 5 per MLP input; measured 49.7 against 55.6, the original 28.6)
    calib = dict(CALIB, nsamples=32)
    energy, _, _ = load_model(resolved)
    assert width_prune(energy, WidthPruneConfig(ratio=0.8, refit=False), tokenizer=tokenizer, **calib)["refit"] == []
    refit, _, _ = load_model(resolved)
    record = width_prune(refit, WidthPruneConfig(ratio=0.8), tokenizer=tokenizer, **calib)
    assert record["refit"] == ["mlp"] and refit.config.intermediate_size < original.config.intermediate_size
    with_refit, alone, base = ppl(refit, held_out), ppl(energy, held_out), ppl(original, held_out)
    assert with_refit < 0.95 * alone, f"refit ppl {with_refit:.2f} against {alone:.2f} for energy scores alone"
    assert with_refit < 4 * base, f"width-pruned perplexity {with_refit:.1f} is over 4x the original's {base:.1f}"
    refit.save_pretrained(tmp_path / "w")
    tokenizer.save_pretrained(tmp_path / "w")
    torch.testing.assert_close(fresh_logits(tmp_path / "w", ids, "transformers", tmp_path), logits(refit, ids),
                               rtol=1e-4, atol=1e-4)  # plain transformers, llmshrink not imported


def test_weighted_sharing_beats_rtn_at_3_bits_and_loads_in_a_fresh_process(real_model, held_out, tmp_path):
    import llmshrink
    from llmshrink import RTNConfig

    _, tokenizer, resolved = real_model
    ids = held_out[None, :64]
    shared, _, _ = load_model(resolved)
    share(shared, ShareConfig(bits=3), tokenizer=tokenizer, **CALIB)
    folder = llmshrink.compress(resolved, RTNConfig(bits=3, group_size=128, clip_search=False), tmp_path / "rtn",
                                progress=False)
    rtn = llmshrink.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    a, b = ppl(shared, held_out), ppl(rtn, held_out)
    assert a < b, f"3-bit sharing {a:.1f} does not beat 3-bit RTN {b:.1f}"
    out = save_shared(shared, tokenizer, tmp_path / "s")
    torch.testing.assert_close(fresh_logits(out, ids, "llmshrink", tmp_path), logits(shared, ids),
                               rtol=1e-4, atol=1e-4)
