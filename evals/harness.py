"""Run an evaluation: perplexity corpora and downstream tasks on one model, plus its footprint.

`evaluate_model(EvalSpec(...))` loads the model, scores every task and measures size on disk,
parameter count, bits per parameter, generation speed and peak RSS. `compare_models` runs each
model in a fresh process, so each peak RSS is that model's own.
"""

from __future__ import annotations

import concurrent.futures
import logging
import multiprocessing
import resource
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from huggingface_hub import snapshot_download
from transformers import AutoConfig

from ..auto import load_model, load_tokenizer
from ..errors import UsageError
from ..formats import weight_bytes
from ..gptq.linear import QuantLinear
from ..models import DTYPES, resolve_model
from ..share.modules import SharedLinear
from .data import corpus_documents, load_docs, load_text_docs, load_text_file
from .loglikelihood import loglikelihoods, model_max_length
from .perplexity import BOS_CHOICES, PROTOCOLS, Encoded, check_windows, encode, score
from .tasks import PPL_TASKS, TASKS

__all__ = ["EvalSpec", "DEFAULT_TASKS", "validate", "evaluate", "evaluate_model", "compare_models",
           "score_task", "model_stats", "evaluate_in_fresh_process", "weights_size"]

logger = logging.getLogger(__name__)

DEFAULT_TASKS = ("wiki", "piqa", "hellaswag", "arc_easy", "lambada")
TEXT_FILE_TASK = "text"  # the name --text-file results go under


@dataclass
class EvalSpec:
    """What to evaluate and how; serialised into every result's `config`."""

    model: str | None = None
    tasks: tuple[str, ...] = DEFAULT_TASKS
    limit: int | None = None  # first N items of each task / first N documents of each corpus
    text_file: str | None = None
    protocol: str = "gptq"  # gptq, sliding or rolling (lm-eval's loglikelihood_rolling)
    bos: str = "auto"  # auto (BOS when the tokenizer adds one by default), yes or no
    seqlen: int = 2048
    stride: int | None = None  # sliding protocol only; default seqlen // 2
    dtype: str = "float32"
    batch_tokens: int = 4096
    gen_tokens: int = 32  # tokens generated to measure speed; 0 skips it
    progress: bool = True
    extra: dict = field(default_factory=dict)


def validate(spec: EvalSpec) -> EvalSpec:
    """Check a spec before any heavy work; raise UsageError naming the problem and the fix."""
    unknown = [t for t in spec.tasks if t not in TASKS and t not in PPL_TASKS]
    if unknown:
        raise UsageError(f"unknown task '{unknown[0]}'; choose from: {', '.join([*PPL_TASKS, *TASKS])}")
    if not spec.tasks and not spec.text_file:
        raise UsageError("nothing to evaluate; give --tasks or --text-file")
    if spec.limit is not None and spec.limit < 1:
        raise UsageError(f"--limit {spec.limit} selects no items; use a positive number or leave it out")
    if spec.protocol not in PROTOCOLS:
        raise UsageError(f"unknown protocol '{spec.protocol}'; use one of {', '.join(PROTOCOLS)}")
    if spec.bos not in BOS_CHOICES:
        raise UsageError(f"unknown --bos '{spec.bos}'; use one of {', '.join(BOS_CHOICES)}")
    if spec.seqlen < 2:
        raise UsageError(f"--seqlen {spec.seqlen} is too short; use at least 2 (2048 is usual)")
    if spec.stride is not None and not 0 < spec.stride <= spec.seqlen:
        raise UsageError(f"--stride {spec.stride} must be between 1 and --seqlen {spec.seqlen}")
    if spec.gen_tokens < 0:
        raise UsageError(f"--gen-tokens {spec.gen_tokens} is negative; give the tokens to generate, or 0 to skip timing")
    if spec.dtype not in DTYPES:
        raise UsageError(f"unknown dtype '{spec.dtype}'; use float32, bfloat16 or float16")
    if spec.text_file:
        load_text_file(spec.text_file, limit=1)  # exists, readable, not empty
    resolved = resolve_model(spec.model)
    needs_ppl = spec.text_file or any(t in PPL_TASKS for t in spec.tasks)
    if needs_ppl:
        try:
            config = AutoConfig.from_pretrained(resolved, trust_remote_code=False)
        except OSError:
            config = None  # load_model reports it with the right hint
        context = config and model_max_length(config, default=0)
        if context and spec.seqlen > context:
            raise UsageError(f"--seqlen {spec.seqlen} is longer than the model's context of {context} "
                             f"tokens; use --seqlen {min(2048, context)} or less")
    return spec


def score_task(model, tokenizer, task: str, limit: int | None = None, batch_tokens: int = 4096,
               progress: bool = False) -> dict:
    """Accuracy metrics of one downstream task on its first `limit` documents."""
    spec = TASKS[task]
    items = [spec.build(doc) for doc in load_docs(task, limit)]
    flat = [req for item in items for req in item.requests]
    scores = loglikelihoods(model, tokenizer, flat, batch_tokens=batch_tokens,
                            progress=task if progress else None)
    out: dict[str, float] = {}
    pos, correct, correct_norm, lls = 0, 0, 0, []
    for item in items:
        ll = np.array([s[0] for s in scores[pos:pos + len(item.requests)]])
        greedy = [s[1] for s in scores[pos:pos + len(item.requests)]]
        pos += len(item.requests)
        if spec.kind == "greedy":
            correct += greedy[0]
            lls.append(ll[0])
            continue
        lengths = np.array([float(len(c)) for c in item.choices])
        correct += int(np.argmax(ll) == item.gold)
        correct_norm += int(np.argmax(ll / lengths) == item.gold)
    out["acc"] = correct / len(items)
    if "acc_norm" in spec.metrics:
        out["acc_norm"] = correct_norm / len(items)
    if "ppl" in spec.metrics:
        out["ppl"] = float(np.exp(-np.mean(lls)))  # lm-eval's loglikelihood perplexity
    out["n"] = len(items)
    return out


def weights_size(folder: str | Path) -> int:
    """Bytes of the weight files a model needs, as its format counts them (llmshrink.formats): an
    adapter folder counts its base too (delta folders name theirs by hash and are counted alone)."""
    return weight_bytes(folder)


def model_stats(model, resolved: str) -> dict:
    """Size of the weight files on disk, parameter count and bits per parameter."""
    folder = Path(resolved)
    if not folder.is_dir():
        folder = Path(snapshot_download(resolved, local_files_only=True))
    size = weights_size(folder)
    # Quantized and shared linears hold buffers, not parameters: count the weights they stand for.
    params = model.num_parameters() + sum(m.in_features * m.out_features + (m.out_features if m.bias is not None else 0)
                                          for m in model.modules() if isinstance(m, (QuantLinear, SharedLinear)))
    return {"size_mb": size / 2**20, "params_m": params / 1e6, "bits_per_param": 8 * size / params}


@torch.inference_mode()
def generation_speed(model, tokenizer, new_tokens: int) -> float:
    """Greedy decoding speed at batch 1, tokens per second, after one warm-up run."""
    prompt = tokenizer("The history of the city begins", return_tensors="pt").to(next(model.parameters()).device)
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                  pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    model.generate(**prompt, **{**kwargs, "max_new_tokens": 4, "min_new_tokens": 4})
    start = time.perf_counter()
    model.generate(**prompt, **kwargs)
    return new_tokens / (time.perf_counter() - start)


def tokenize_corpora(tokenizer, spec: EvalSpec) -> list[tuple[str, Encoded]]:
    """The perplexity corpora of `spec` encoded for its protocol and BOS choice, each checked to
    fill at least one window (gptq/sliding: the documents joined by blank lines; rolling: apart)."""
    corpora = [(t, corpus_documents(PPL_TASKS[t])[:spec.limit]) for t in spec.tasks if t in PPL_TASKS]
    if spec.text_file:
        corpora.append((TEXT_FILE_TASK, load_text_docs(spec.text_file, spec.limit)))
    tokenized = []
    for name, docs in corpora:
        encoded = encode(tokenizer, docs, spec.protocol, spec.bos)
        try:
            for ids in encoded.docs:
                check_windows(len(ids), spec.seqlen, spec.protocol, spec.stride, encoded.bos_id is not None)
        except ValueError as e:
            raise UsageError(f"{name}: {e}") from None
        tokenized.append((name, encoded))
    return tokenized


def evaluate(model, tokenizer, spec: EvalSpec, corpora: list[tuple[str, Encoded]] | None = None) -> dict:
    """Scores of every task in `spec` for an already loaded model: {task: {metric: value}}."""
    results: dict[str, dict] = {}
    for name, encoded in tokenize_corpora(tokenizer, spec) if corpora is None else corpora:
        results[name] = score(model, encoded, protocol=spec.protocol, seqlen=spec.seqlen, stride=spec.stride,
                              batch_tokens=spec.batch_tokens, progress=name if spec.progress else None).to_dict()
    for task in spec.tasks:
        if task in TASKS:
            results[task] = score_task(model, tokenizer, task, spec.limit, spec.batch_tokens, spec.progress)
    return results


def evaluate_model(spec: EvalSpec) -> dict:
    """Load `spec.model`, evaluate it, and return the full result record."""
    validate(spec)
    started = time.perf_counter()
    corpora = tokenize_corpora(load_tokenizer(spec.model), spec)  # bad corpora fail before the model loads
    model, tokenizer, resolved = load_model(spec.model, dtype=spec.dtype)
    results = evaluate(model, tokenizer, spec, corpora)
    eval_seconds = time.perf_counter() - started
    stats = model_stats(model, resolved)
    if spec.gen_tokens:
        stats["gen_tokens_per_s"] = generation_speed(model, tokenizer, spec.gen_tokens)
    stats["eval_seconds"] = eval_seconds
    stats["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    config = {k: v for k, v in asdict(spec).items() if k not in ("model", "progress", "extra")}
    config.update(torch=torch.__version__, threads=torch.get_num_threads())
    return {"model": spec.model or "smollm2-135m", "resolved": resolved, "results": results,
            "stats": stats, "config": config}


def evaluate_in_fresh_process(spec: EvalSpec) -> dict:
    """`evaluate_model` in a new interpreter, so the peak memory it reports is this model's alone."""
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
        return pool.submit(evaluate_model, spec).result()


def compare_models(spec: EvalSpec, other: str) -> tuple[dict, dict]:
    """Evaluate `spec.model` and `other` with the same settings, each in a fresh process."""
    validate(spec)
    validate(replace(spec, model=other))
    return evaluate_in_fresh_process(spec), evaluate_in_fresh_process(replace(spec, model=other))
