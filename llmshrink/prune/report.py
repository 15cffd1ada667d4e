"""The layer-pruning score table (printed) and bar chart (PNG, matplotlib)."""

from __future__ import annotations

import os
from pathlib import Path

from rich.console import Console
from rich.table import Table

__all__ = ["print_scores", "plot_scores"]


def print_scores(record: dict) -> None:
    """Per layer: block influence, the angular distance of the run starting there, and removal."""
    removed = set(record["removed"])
    table = Table(title=f"layer scores ({record['config']['criterion']}; lower = more removable)")
    for column in ("layer", "block influence", f"angular, run of {record['config']['layers']}", "removed"):
        table.add_column(column, justify="right")
    angular = record["angular"]
    for i, bi in enumerate(record["block_influence"]):
        table.add_row(str(i), f"{bi:.4f}", f"{angular[i]:.4f}" if i < len(angular) else "", "x" if i in removed else "")
    console = Console()
    console.print(table)
    measured = record.get("measured")
    if measured:
        n, seqlen = measured["measured_on"]
        table = Table(title=f"the criterion's best removals, measured: calibration ppl on {n} x {seqlen} tokens "
                            f"(original {measured['calib_ppl_original']:.3f})")
        for column in ("rank", "layers", "criterion score", "calibration ppl", "x original", "chosen"):
            table.add_column(column, justify="right")
        for rank, row in enumerate(measured["candidates"]):
            table.add_row(str(rank + 1), ",".join(map(str, row["layers"])),
                          "" if row["proxy"] is None else f"{row['proxy']:.4f}", f"{row['calib_ppl']:.3f}",
                          f"{row['calib_ppl'] / measured['calib_ppl_original']:.2f}",
                          "x" if rank == measured["chosen"] else "")
        console.print(table)


def plot_scores(record: dict, path: str | os.PathLike) -> Path:
    """Two bar charts (block influence per layer, angular distance per run start), removed layers
    highlighted, written to `path` (PNG)."""
    import matplotlib  # lazy: a second of import time, for the one function that draws

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    removed = set(record["removed"])
    bi, angular = record["block_influence"], record["angular"]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(max(6.0, 0.3 * len(bi)), 6), sharex=True)
    top.bar(range(len(bi)), bi, color=["tab:red" if i in removed else "tab:blue" for i in range(len(bi))])
    top.set_ylabel("block influence\n(1 - cos in/out)")
    top.set_title(f"{record['config']['criterion']}: removed layers {sorted(removed)} (red)")
    bottom.bar(range(len(angular)), angular, color="tab:gray")
    bottom.set_ylabel(f"angular distance\nrun of {record['config']['layers']}")
    bottom.set_xlabel("decoder layer (start of the run, below)")
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
    return path
