"""`llmshrink push` / `push_to_hub` against a local server speaking the Hub routes (tests/hub_server.py):
push, load back in a fresh process with a fresh cache, the model card, re-runs and bad input."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import llmshrink
from llmshrink import GPTQConfig, UsageError
from llmshrink.hub import model_card, push_folder

from conftest import save_tiny
from hub_server import LocalHub

TOKEN = "hf_llmshrink_test_token_123"
IDS = torch.randint(1, 97, (2, 16), generator=torch.Generator().manual_seed(0))


@pytest.fixture()
def hub(monkeypatch, tmp_path):
    import huggingface_hub.constants as constants

    with LocalHub(token=TOKEN) as server:
        monkeypatch.setattr(constants, "ENDPOINT", server.url)  # read at import; HF_ENDPOINT for subprocesses
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # no saved login from elsewhere
        yield server


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub")
    src = save_tiny(root / "tiny", layers=2)
    calib = torch.randint(1, 97, (4, 32), generator=torch.Generator().manual_seed(1))
    return llmshrink.quantize(str(src), GPTQConfig(bits=4, group_size=16), root / "q", calibration=calib,
                              progress=False)


def load_in_fresh_process(repo_id: str, url: str, home: Path) -> torch.Tensor:
    """Logits of `repo_id` loaded through llmshrink in a new interpreter with an empty Hub cache."""
    out = home / "logits.pt"
    code = ("import sys, torch, llmshrink\n"
            f"model = llmshrink.AutoModelForCausalLM.from_pretrained({repo_id!r})\n"
            f"ids = torch.tensor({IDS.tolist()})\n"
            f"torch.save(model(ids).logits.detach(), {str(out)!r})\n")
    env = {**os.environ, "HF_ENDPOINT": url, "HF_HUB_OFFLINE": "0", "HF_HOME": str(home / "hf"),
           "LLMSHRINK_CACHE": str(home / "llmshrink"), "HF_TOKEN": TOKEN}
    subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True, timeout=300)
    return torch.load(out, weights_only=True)


def test_push_then_load_back_in_a_fresh_process_gives_the_same_logits(hub, quantized, tmp_path):
    push_folder(quantized, "me/tiny-gptq")
    files = hub.files("me/tiny-gptq")
    local = {p.relative_to(quantized).as_posix() for p in Path(quantized).rglob("*") if p.is_file()}
    assert local | {"README.md"} == set(files)
    assert all(files[n] == (Path(quantized) / n).read_bytes() for n in local)
    with torch.no_grad():
        want = llmshrink.AutoModelForCausalLM.from_pretrained(quantized)(IDS).logits
    got = load_in_fresh_process("me/tiny-gptq", hub.url, tmp_path / "fresh")
    torch.testing.assert_close(got, want)
    assert len(hub.commits("me/tiny-gptq")) == 1 and not hub.repo("me/tiny-gptq")["private"]


def test_from_pretrained_loads_the_revision_asked_for(hub, tmp_path, monkeypatch):
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))  # nothing from earlier runs
    # file downloads use a URL template built from the endpoint at import (subprocesses get HF_ENDPOINT)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", hub.url + "/{repo_id}/resolve/{revision}/{filename}")
    first, second = save_tiny(tmp_path / "first", seed=0), save_tiny(tmp_path / "second", seed=1)
    push_folder(first, "me/revs")
    push_folder(second, "me/revs")
    old = hub.commits("me/revs")[0]["oid"]
    load = llmshrink.AutoModelForCausalLM.from_pretrained
    with torch.no_grad():
        want_old, want_new = load(first)(IDS).logits, load(second)(IDS).logits
        torch.testing.assert_close(load("me/revs", revision=old)(IDS).logits, want_old)
        torch.testing.assert_close(load("me/revs")(IDS).logits, want_new)
        torch.testing.assert_close(load("me/revs", revision="main", token=TOKEN)(IDS).logits, want_new)
    assert not torch.allclose(want_old, want_new)
    with pytest.raises(UsageError, match="model 'me/revs' has no revision 'nope': use a branch, tag or commit id"):
        load("me/revs", revision="nope")
    with pytest.raises(UsageError, match="is for Hub ids; .* is a local folder: drop revision="):
        load(first, revision=old)


def test_model_card_metadata_parses_and_carries_the_fields(hub, quantized):
    push_folder(quantized, "me/tiny-card", private=True)
    card = hub.files("me/tiny-card")["README.md"].decode()
    assert card.startswith("---\n")
    meta = yaml.safe_load(card.split("---")[1])
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "text-generation"
    assert {"llmshrink", "gptq", "4-bit"} <= set(meta["tags"])
    assert "base_model" not in meta  # a local folder has no Hub base to name
    assert "vllm serve me/tiny-card" in card and 'from_pretrained("me/tiny-card")' in card
    assert hub.repo("me/tiny-card")["private"]


def test_card_of_a_pipeline_model_names_base_recipe_and_scores(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "quantization_config": {
        "quant_method": "gptq", "bits": 3}}))
    record = {"recipe": {"model": "smollm2-135m", "steps": [{"method": "layer_prune"}, {"method": "gptq"}]},
              "steps": [{"method": "layer_prune"}, {"method": "gptq"}], "seed": 0, "versions": {"torch": "x"}}
    (folder / "llmshrink_recipe.json").write_text(json.dumps(record))
    scores = {"results": {"wiki": {"ppl": 20.0, "protocol": "gptq", "seqlen": 512, "tokens_scored": 100}},
              "stats": {"size_mb": 500.0}}
    (folder / "llmshrink_eval.json").write_text(json.dumps({"original": {"model": "original", **scores},
                                                            "compressed": {"model": "2. gptq", **scores}}))
    card = model_card(folder, "me/x")
    meta = yaml.safe_load(card.split("---")[1])
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert {"gptq", "3-bit", "pruned"} <= set(meta["tags"])
    assert "Pipeline: layer_prune -> gptq" in card and "| metric | original | 2. gptq | delta |" in card


def test_rerun_after_an_interrupted_push_finishes_without_duplicate_commits(hub, quantized):
    from huggingface_hub.errors import HfHubHTTPError

    hub.fail_next_commit = 1  # the commit request dies: nothing lands
    with pytest.raises(HfHubHTTPError, match="500"):
        push_folder(quantized, "me/tiny-retry")
    assert hub.commits("me/tiny-retry") == []
    push_folder(quantized, "me/tiny-retry")
    push_folder(quantized, "me/tiny-retry")  # nothing changed: no second commit
    assert len(hub.commits("me/tiny-retry")) == 1


def test_push_to_hub_on_a_loaded_model_uploads_its_folder(hub, quantized):
    model = llmshrink.AutoModelForCausalLM.from_pretrained(quantized)
    model.push_to_hub("me/from-model")
    assert hub.files("me/from-model")["quantize_config.json"] == (Path(quantized) / "quantize_config.json").read_bytes()


def test_bad_input_is_a_one_line_error_and_the_token_never_shows(hub, quantized, tmp_path, monkeypatch, capsys):
    with pytest.raises(UsageError, match="repo id 'me/bad name!' is not valid"):
        push_folder(quantized, "me/bad name!")
    with pytest.raises(UsageError, match="has no owner; use ORG/NAME"):
        push_folder(quantized, "tiny")
    with pytest.raises(UsageError, match="is not a model folder"):
        push_folder(tmp_path, "me/empty")
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(UsageError, match="no Hugging Face token: set HF_TOKEN or run `hf auth login`"):
        push_folder(quantized, "me/no-token")
    with pytest.raises(KeyError):  # refused before any request: the repo was never created
        hub.repo("me/no-token")

    monkeypatch.setenv("HF_TOKEN", TOKEN)
    from llmshrink.cli import main

    assert main(["push", str(quantized), "--repo-id", "me/cli"]) == 0
    printed = capsys.readouterr()
    assert "me/cli" in printed.out and TOKEN not in printed.out + printed.err
    assert not any(TOKEN.encode() in p.read_bytes() for p in Path(quantized).rglob("*") if p.is_file())
    assert not any(TOKEN.encode() in data for data in hub.files("me/cli").values())
