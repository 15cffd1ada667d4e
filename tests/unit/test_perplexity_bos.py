"""BOS in the perplexity protocols, and the `rolling` protocol against lm-eval run side by side.

Tiny random Llamas with tokenizers built offline: a character tokenizer that adds BOS through
its post-processor, the default model's BPE tokenizer with add_bos_token=True, and a character
tokenizer that adds none (lm-eval then puts EOS in front)."""

import math

import pytest
import torch

from llmshrink.errors import UsageError
from llmshrink.evals import EvalSpec, evaluate
from llmshrink.evals.perplexity import perplexity, perplexity_of_ids, plan_windows, rolling_windows, tokenizer_adds_bos

from conftest import CHARS

DOCS = [
    "The quick brown fox jumps over the lazy dog.\nIt was not amused, and said so at length. " * 3,
    "short one",
    "x" * 31,  # exactly one window of predictions at seqlen 32 (with the prefix)
    "A third document  with   odd\tspacing, unicode é and a number 42 " * 2,
]
SEQLEN = 32


def _char_tokenizer(bos: bool):
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{c: i + 3 for i, c in enumerate(CHARS + ["\t", "é"])}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
        return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>")


def _bpe_tokenizer_with_bos():
    from transformers import AutoTokenizer

    from llmshrink import resolve_model

    return AutoTokenizer.from_pretrained(resolve_model("smollm2-135m"), add_bos_token=True)


TOKENIZERS = {"char-bos": lambda: _char_tokenizer(True), "bpe-bos": _bpe_tokenizer_with_bos,
              "char-eos-only": lambda: _char_tokenizer(False)}


@pytest.fixture(scope="module", params=list(TOKENIZERS))
def model_and_tokenizer(request):
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = TOKENIZERS[request.param]()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval(), tok, request.param


def _lm_eval_rolling(model, tok, docs, add_bos_token):
    """lm-eval 0.4.13's loglikelihood_rolling and its wikitext metrics on `docs`."""
    from lm_eval.api.instance import Instance
    from lm_eval.api.metrics import bits_per_byte, weighted_perplexity
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tok, max_length=SEQLEN, batch_size=3, device="cpu",
              add_bos_token=add_bos_token)
    requests = [Instance(request_type="loglikelihood_rolling", doc={}, arguments=(d,), idx=i) for i, d in enumerate(docs)]
    lls = lm.loglikelihood_rolling(requests, disable_tqdm=True)
    words = [(ll, ConfigurableTask.count_words(d)) for ll, d in zip(lls, docs)]
    nbytes = [(ll, ConfigurableTask.count_bytes(d)) for ll, d in zip(lls, docs)]
    return {"nll": -sum(lls), "word_perplexity": weighted_perplexity(words),
            "byte_perplexity": weighted_perplexity(nbytes), "bits_per_byte": bits_per_byte(nbytes)}


@pytest.mark.parametrize("bos", ["auto", "no"])
def test_rolling_equals_lm_eval_side_by_side(model_and_tokenizer, bos):
    pytest.importorskip("lm_eval")
    model, tok, name = model_and_tokenizer
    ours = perplexity(model, tok, DOCS, protocol="rolling", bos=bos, seqlen=SEQLEN, batch_tokens=128)
    theirs = _lm_eval_rolling(model, tok, DOCS, add_bos_token=None if bos == "auto" else False)
    assert ours.bos == (bos == "auto" and name != "char-eos-only")
    for key, want in theirs.items():
        got = ours.nll if key == "nll" else getattr(ours, key)
        assert got == pytest.approx(want, rel=1e-4), key
    assert ours.docs == len(DOCS) and ours.tokens_scored == ours.tokens_total
    assert ours.windows > len(DOCS)  # the long document takes several windows
    assert ours.ppl == pytest.approx(math.exp(ours.nll / ours.tokens_scored))


@pytest.mark.parametrize("n", [0, 1, 5, 32, 33, 64, 65, 100])
def test_rolling_windows_score_every_token_once_in_at_most_seqlen_inputs(n):
    windows = rolling_windows(n, SEQLEN)
    scored = [t for b, e, s in windows for t in range(b + s, e)]
    assert scored == list(range(1, n + 1))  # position 0 is the prefix token
    assert all(0 < e - 1 - b <= SEQLEN and s >= 1 for b, e, s in windows)
    assert all(e - 1 - b == SEQLEN for b, e, s in windows[1:])  # later windows take full context


def _reference_with_bos(model, ids, bos_id, seqlen, stride, drop_tail):
    """One window at a time: [BOS] + up to seqlen - 1 text tokens, labels of the BOS and of
    tokens scored before masked with -100. Returns (summed NLL, tokens scored, windows)."""
    nll, count, prev_end, windows = 0.0, 0, 0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + seqlen - 1, len(ids))
        if drop_tail and end - begin < seqlen - 1:
            break  # gptq: the tail shorter than a window is dropped
        x = torch.cat([torch.tensor([bos_id]), ids[begin:end]])[None]
        labels = x.clone()
        labels[:, : 1 + max(0, prev_end - begin)] = -100
        with torch.no_grad():
            n = int((labels[:, 1:] != -100).sum())
            nll += model(x, labels=labels).loss.item() * n
        count, prev_end, windows = count + n, end, windows + 1
        if end == len(ids):
            break
    return nll, count, windows


@pytest.mark.parametrize("protocol,stride", [("gptq", None), ("sliding", 12), ("sliding", 31)])
def test_bos_in_front_of_every_window_and_never_scored(model_and_tokenizer, protocol, stride):
    model, tok, name = model_and_tokenizer
    if name == "char-eos-only":
        pytest.skip("no BOS token")
    text = "\n\n".join(DOCS)
    got = perplexity(model, tok, text, protocol=protocol, bos="auto", seqlen=SEQLEN, stride=stride, batch_tokens=96)
    ids = torch.tensor(tok(text, add_special_tokens=False).input_ids)
    want_nll, count, windows = _reference_with_bos(model, ids, tok.bos_token_id, SEQLEN, stride or SEQLEN - 1,
                                                  drop_tail=protocol == "gptq")
    assert got.bos is True and got.windows == windows and got.tokens_scored == count
    assert got.nll == pytest.approx(want_nll, rel=1e-5)
    if protocol == "gptq":
        assert got.tokens_scored == got.windows * (SEQLEN - 1)  # as many per window as without BOS
    else:
        assert got.tokens_scored == len(ids)  # the first text token too: it is predicted from the BOS


def test_bos_no_and_yes(model_and_tokenizer):
    model, tok, name = model_and_tokenizer
    text = "\n\n".join(DOCS)
    ids = torch.tensor(tok(text, add_special_tokens=False).input_ids)
    plain = perplexity_of_ids(model, ids, seqlen=SEQLEN)
    no = perplexity(model, tok, text, bos="no", seqlen=SEQLEN)
    assert no.bos is False and no.nll == plain.nll and no.tokens_scored == plain.tokens_scored
    if name == "char-eos-only":
        assert not tokenizer_adds_bos(tok)
        assert perplexity(model, tok, text, bos="auto", seqlen=SEQLEN).nll == plain.nll
        with pytest.raises(UsageError, match="--bos yes needs a tokenizer with a BOS token"):
            perplexity(model, tok, text, bos="yes", seqlen=SEQLEN)
    else:
        assert tokenizer_adds_bos(tok)
        yes = perplexity(model, tok, text, bos="yes", seqlen=SEQLEN)
        assert yes.bos is True and yes.nll != plain.nll
        assert yes.nll == perplexity(model, tok, text, bos="auto", seqlen=SEQLEN).nll


def test_plain_windows_are_unchanged_without_bos():
    assert plan_windows(100, 16, "gptq") == plan_windows(100, 16, "gptq", bos=False)
    assert plan_windows(100, 16, "gptq", bos=True) == [(i * 15, (i + 1) * 15, 0) for i in range(6)]
    scored = sorted(t for b, e, s in plan_windows(101, 16, "sliding", 5, bos=True) for t in range(b + s, e))
    assert scored == list(range(101))


def test_sliding_stride_must_leave_room_for_the_bos(model_and_tokenizer):
    model, tok, name = model_and_tokenizer
    if name == "char-eos-only":
        pytest.skip("no BOS token")
    with pytest.raises(ValueError, match="seqlen=32 - 1 with a BOS"):
        perplexity(model, tok, "\n\n".join(DOCS), protocol="sliding", seqlen=SEQLEN, stride=SEQLEN)


def test_eval_records_bos_and_rolling_metrics(model_and_tokenizer, tmp_path):
    model, tok, name = model_and_tokenizer
    path = tmp_path / "docs.txt"
    path.write_text("\n\n".join(d.strip() for d in DOCS) + "\n")
    spec = EvalSpec(tasks=(), text_file=str(path), protocol="rolling", seqlen=SEQLEN, progress=False)
    result = evaluate(model, tok, spec)["text"]
    assert result["bos"] is (name != "char-eos-only") and result["protocol"] == "rolling"
    assert result["docs"] == len(DOCS) and result["word_perplexity"] > 1 and result["bits_per_byte"] > 0
    gptq = evaluate(model, tok, EvalSpec(tasks=(), text_file=str(path), bos="no", seqlen=SEQLEN, progress=False))
    assert gptq["text"]["bos"] is False and gptq["text"]["word_perplexity"] is None


def test_cli_takes_bos_and_rolling():
    from llmshrink.cli import build_parser
    from llmshrink.evals.harness import validate

    args = build_parser().parse_args(["eval", "--protocol", "rolling", "--bos", "yes"])
    assert (args.protocol, args.bos) == ("rolling", "yes")
    assert build_parser().parse_args(["eval"]).bos == "auto"
    with pytest.raises(UsageError, match="--bos"):
        build_parser().parse_args(["eval", "--bos", "maybe"])
    with pytest.raises(UsageError, match="unknown --bos 'maybe'"):
        validate(EvalSpec(bos="maybe"))
