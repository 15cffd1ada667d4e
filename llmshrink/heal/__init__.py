"""Healing: LoRA/QLoRA fine-tuning of a compressed model on calibration text, with optional
distillation from the original; adapters load onto their base (adapters.py)."""

from .core import (ADAPTERS, RECORD, HealConfig, add_cli, checkpoint_dir, config_from_args, heal, heal_loss, kd_loss,
                   merge_adapter)

__all__ = ["ADAPTERS", "HealConfig", "RECORD", "add_cli", "checkpoint_dir", "config_from_args", "heal", "heal_loss",
           "kd_loss", "merge_adapter"]
