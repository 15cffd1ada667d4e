"""Heal a pruned model with LoRA or QLoRA, configured by a YAML file.

    accelerate launch recipes/heal.py --config recipes/heal_lora.yaml                 # one process
    python recipes/heal.py --config recipes/heal_lora.yaml                            # one process, same code path
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 recipes/heal.py --config ...  # 2 CPU processes
    accelerate launch --config_file recipes/accelerate/ddp.yaml recipes/heal.py --config ...   # multi-GPU DDP

The YAML's keys are `llmshrink.heal.HealConfig` fields plus `model`, `teacher` and `out`
(unknown keys warn). `--set KEY=VALUE` overrides one key (the value is read as YAML). This is a
thin layer over `llmshrink.heal.heal`, the function behind `llmshrink heal` too.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import yaml
from accelerate import PartialState

from llmshrink.errors import UsageError
from llmshrink.heal import ADAPTERS, RECORD, HealConfig, heal

RUN_KEYS = ("model", "teacher", "out")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, type=Path, help="YAML: HealConfig fields plus model, teacher, out")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override one YAML key")
    p.add_argument("--resume", action="store_true", help="continue from OUT.checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def load_settings(path: Path, overrides: list[str]) -> dict:
    """The YAML mapping with `KEY=VALUE` overrides applied."""
    if not path.is_file():
        raise UsageError(f"config file {path} does not exist")
    settings = yaml.safe_load(path.read_text()) or {}
    if not isinstance(settings, dict):
        raise UsageError(f"{path} must be a mapping of HealConfig fields plus model, teacher, out")
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise UsageError(f"--set {item!r} is not KEY=VALUE")
        settings[key.strip()] = yaml.safe_load(value)
    return settings


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        settings = load_settings(args.config, args.set)
        run = {k: settings.pop(k, None) for k in RUN_KEYS}
        if not run["model"] or not run["out"]:
            raise UsageError(f"{args.config} needs 'model' (the pruned model) and 'out' (the folder to write)")
        if settings.get("method") in ADAPTERS:  # `method: qlora` as on the command line
            settings["adapter"] = settings.pop("method")
        config = HealConfig.from_dict(settings)
        out = heal(run["model"], config, run["out"], teacher=run["teacher"], resume=args.resume,
                   overwrite=args.overwrite, progress=not args.no_progress)
    except UsageError as e:
        print(f"heal: error: {e}", file=sys.stderr)
        return 2
    if PartialState().is_main_process and (out / RECORD).is_file():
        record = json.loads((out / RECORD).read_text())
        print(f"healed {record['model']} in {record['train_seconds']:.0f} s on {record['num_processes']} "
              f"process(es): loss {record['loss_first']:.3f} -> {record['loss_last']:.3f}; written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
