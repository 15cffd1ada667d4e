"""The packaged default model: converted once, offline, safely, and equal to the GGUF weights."""

import json

import pytest
import torch

from llmshrink import UsageError, resolve_model
from llmshrink.models import PACKAGED_MODELS, _packaged_gguf, convert_gguf

pytestmark = pytest.mark.real


def test_cached_folder_is_a_plain_transformers_checkpoint(real_model):
    model, tokenizer, resolved = real_model
    from pathlib import Path

    folder = Path(resolved)
    assert (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "llama"
    assert "Q4_1" in (folder / "llmshrink_source.json").read_text()
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied
    assert resolve_model("smollm2-135m") == resolved == resolve_model(None)  # reused, not reconverted


def test_converted_weights_equal_the_gguf_dequantized_weights(real_model):
    from transformers import AutoModelForCausalLM

    model, tokenizer, _ = real_model
    gguf = _packaged_gguf(PACKAGED_MODELS["smollm2-135m"])
    direct = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32).eval()
    ids = torch.tensor([tokenizer("The capital of France is").input_ids])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, direct(ids).logits, rtol=0, atol=0)


def test_interrupted_conversion_leaves_nothing(tmp_path, monkeypatch):
    from transformers import PreTrainedTokenizerBase

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(PreTrainedTokenizerBase, "save_pretrained", boom)
    out = tmp_path / "models" / "converted"
    with pytest.raises(KeyboardInterrupt):
        convert_gguf(_packaged_gguf(PACKAGED_MODELS["smollm2-135m"]), out)
    assert not out.exists()
    assert list((tmp_path / "models").iterdir()) == []  # no temp folder left either


def test_unknown_names_are_clear_errors(tmp_path):
    with pytest.raises(UsageError, match="known names: smollm2-135m"):
        resolve_model("./no/such/folder")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="has no config.json"):
        resolve_model(str(tmp_path / "empty"))
