"""The default model rotated (576 = 8 x 72 Hadamard, tied head untied by the final norm's scale):
the same logits to float tolerance, through a saved folder plain transformers loads."""

import pytest
import torch
from transformers import AutoModelForCausalLM

import llmshrink
from llmshrink.rotate import RotateConfig

pytestmark = pytest.mark.real


def test_the_rotated_default_model_has_the_original_logits(tmp_path, real_model):
    model, tokenizer, resolved = real_model
    ids = tokenizer("The history of the city begins with the ancient city of", return_tensors="pt").input_ids
    out = llmshrink.compress(resolved, RotateConfig(), tmp_path / "rotated", progress=False)
    rotated = AutoModelForCausalLM.from_pretrained(out)
    assert rotated.config.llmshrink_rotate["untied"] is True and rotated.config.tie_word_embeddings is False
    with torch.no_grad():
        a, b = model(ids).logits, rotated(ids).logits
    torch.testing.assert_close(b, a, rtol=1e-3, atol=2e-3)
    assert torch.equal(a[0].argmax(-1), b[0].argmax(-1))
