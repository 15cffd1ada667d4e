"""Healing: LoRA/QLoRA fine-tuning of a compressed model on calibration text, with optional
distillation from the original; adapters load onto their base (adapters.py).

config.py (HealConfig) -> losses.py (pure math) -> qlora.py, load.py (the models) -> merge.py ->
run.py (`heal`, through `llmshrink.train.train_loop`) -> cli.py (`llmshrink heal`).
"""

from ..train.checkpoint import checkpoint_dir
from .cli import add_cli, config_from_args
from .config import ADAPTERS, RECORD, HealConfig
from .losses import heal_loss, kd_loss
from .merge import merge_adapter
from .run import heal

__all__ = ["ADAPTERS", "HealConfig", "RECORD", "add_cli", "checkpoint_dir", "config_from_args", "heal", "heal_loss",
           "kd_loss", "merge_adapter"]
