"""Turn result records into terminal tables (rich) and markdown, one model or two side by side."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

__all__ = ["rows", "print_table", "to_markdown"]

# (label, where in the record, format, True if higher is better)
STAT_ROWS = [
    ("size on disk (MB)", ("stats", "size_mb"), "{:.1f}", False),
    ("parameters (M)", ("stats", "params_m"), "{:.1f}", None),
    ("bits / parameter", ("stats", "bits_per_param"), "{:.2f}", False),
    ("generate tokens/s", ("stats", "gen_tokens_per_s"), "{:.1f}", True),
    ("peak RSS (MB)", ("stats", "peak_rss_mb"), "{:.0f}", False),
    ("eval time (s)", ("stats", "eval_seconds"), "{:.0f}", False),
]


def _metric_rows(record: dict) -> list[tuple[str, tuple, str, bool | None]]:
    out = []
    for task, metrics in record["results"].items():
        if "ppl" in metrics and "protocol" in metrics:
            bos = ", BOS" if metrics.get("bos") else ""
            label = f"{task} ppl ({metrics['protocol']}, seqlen {metrics['seqlen']}{bos}, {metrics['tokens_scored']} tok)"
            out.append((label, ("results", task, "ppl"), "{:.3f}", False))
            for metric in ("word_perplexity", "byte_perplexity", "bits_per_byte"):
                if metrics.get(metric) is not None:
                    out.append((f"{task} {metric}", ("results", task, metric), "{:.4f}", False))
            continue
        for metric in ("acc", "acc_norm", "ppl"):
            if metric in metrics:
                label = f"{task} {metric} (n={metrics['n']})"
                out.append((label, ("results", task, metric), "{:.4f}" if metric != "ppl" else "{:.3f}",
                            metric != "ppl"))
    return out


def _get(record: dict, path: tuple):
    for key in path:
        if not isinstance(record, dict) or key not in record:
            return None
        record = record[key]
    return record


def rows(a: dict, b: dict | None = None) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the table: metric, A (and B, delta B - A when comparing)."""
    header = ["metric", a["model"]] + ([b["model"], "delta"] if b else [])
    out = []
    for label, path, fmt, _ in _metric_rows(a) + STAT_ROWS:
        va = _get(a, path)
        if va is None:
            continue
        row = [label, fmt.format(va)]
        if b:
            vb = _get(b, path)
            row += [fmt.format(vb), ("+" if vb - va >= 0 else "") + fmt.format(vb - va)] if vb is not None else ["-", "-"]
        out.append(row)
    return header, out


def print_table(a: dict, b: dict | None = None, console: Console | None = None) -> None:
    header, body = rows(a, b)
    table = Table(title="llmshrink eval" + (" (compare)" if b else ""))
    for i, h in enumerate(header):
        table.add_column(h, justify="left" if i == 0 else "right")
    for row in body:
        table.add_row(*row)
    (console or Console()).print(table)


def to_markdown(a: dict, b: dict | None = None) -> str:
    header, body = rows(a, b)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in body]
    return "\n".join(lines) + "\n"
