"""Training shared by heal and finetune: one loop (loop.py), its lr schedule (schedule.py) and
resumable safetensors checkpoints (checkpoint.py)."""

from .checkpoint import checkpoint_dir, read_checkpoint
from .loop import PRECISIONS, Checkpoint, LoopConfig, LoopResult, setup_accelerator, train_loop
from .schedule import SCHEDULES, lr_factor

__all__ = ["Checkpoint", "LoopConfig", "LoopResult", "PRECISIONS", "SCHEDULES", "checkpoint_dir", "lr_factor",
           "read_checkpoint", "setup_accelerator", "train_loop"]
