"""`llmshrink.compress_delta`: a fine-tuned model as a small compressed difference from its base.

Walks the two checkpoints tensor by tensor (encoding never holds both models whole in memory;
scale distillation, when asked for, does load both), encodes each weight's delta with the
configured codec (`codecs.py`), optionally distils the bitdelta scales against the fine-tuned
model's logits, and writes the delta folder atomically (`load.py` has the format).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path

import torch
from huggingface_hub import snapshot_download
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer

from ..arch import checkpoint_names
from ..calibration import resolve_calibration
from ..errors import UsageError
from ..io import atomic_dir, prepare_out
from ..kernels.cpu import native_bf16_cpu
from ..models import resolve_model
from ..safetensors_io import TensorIndex, save_tensors
from .algorithm import signs as sign_planes
from .codecs import CODECS, KINDS
from .config import DeltaConfig
from .hf import LlmshrinkDeltaConfig
from .load import DELTA_FILE, FORMAT, FORMAT_VERSION, META_FILE, tensors_sha256

__all__ = ["compress_delta", "encode_tensors", "distill_scales"]

logger = logging.getLogger(__name__)

_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def _source_folder(model, tmp: str, role: str, revision: str | None = None) -> tuple[Path, str]:
    """(local folder, name to record) for a name/folder/Hub id or a loaded model."""
    if isinstance(model, torch.nn.Module):
        folder = Path(tmp) / role
        model.save_pretrained(folder)
        return folder, str(getattr(model, "name_or_path", "") or folder)
    resolved = Path(resolve_model(model))
    if not resolved.is_dir():
        try:
            resolved = Path(snapshot_download(str(model), revision=revision, local_files_only=True))
        except (OSError, ValueError):
            raise UsageError(f"{role} model '{model}' is not a local folder and not in the Hugging Face cache; "
                             "download it on a connected machine or pass a local folder") from None
    return resolved, str(model)


def _check_compatible(base: Path, finetuned: Path, b: TensorIndex, f: TensorIndex) -> None:
    cb, cf = (json.loads((p / "config.json").read_text()) for p in (base, finetuned))
    for key in ("model_type", "hidden_size", "num_hidden_layers", "vocab_size"):
        if cb.get(key) != cf.get(key):
            raise UsageError(f"base and fine-tuned models differ in {key} ({cb.get(key)} vs {cf.get(key)}); "
                             "a delta needs a fine-tune of this very base")
    if set(b.keys()) != set(f.keys()):
        only = sorted(set(b.keys()) ^ set(f.keys()))
        raise UsageError(f"base and fine-tuned checkpoints hold different tensors (e.g. {only[0]}); "
                         "a delta needs the same architecture on both sides")
    for key in b.keys():
        if b.shape(key) != f.shape(key):
            raise UsageError(f"{key} is {list(b.shape(key))} in the base but {list(f.shape(key))} in the fine-tune; "
                             "a delta needs the same shapes on both sides")


def encode_tensors(base: TensorIndex, finetuned: TensorIndex, config: DeltaConfig,
                   progress: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """Encode every tensor's delta. Returns (checkpoint tensors `<name>.<part>`, per-name info)."""
    tensors: dict[str, torch.Tensor] = {}
    info: dict[str, dict] = {}
    codec = CODECS[config.codec]
    generator = torch.Generator().manual_seed(config.seed)
    for key in tqdm(sorted(base.keys()), desc=f"delta ({config.codec})", unit="tensor", disable=not progress):
        b, f = base.get(key), finetuned.get(key)
        shape = list(b.shape)
        if not (b.is_floating_point() and f.is_floating_point()):
            if not torch.equal(b, f):
                raise UsageError(f"{key} is an integer tensor that differs between base and fine-tune; "
                                 "deltas of non-float tensors are not supported")
            info[key] = {"kind": "zero", "shape": shape}
            continue
        delta = f.float() - b.float()
        if not delta.any():
            parts, kind = {}, "zero"
        elif config.stores_exactly(key, tuple(shape)):
            kind = "full" if config.exact_format == "full" else "exact"
            parts = {kind: (f if kind == "full" else delta).to(_DTYPES[config.exact_dtype])}
        else:
            kind, parts = config.codec, codec.encode(delta, config, generator)
        info[key] = {"kind": kind, "shape": shape}
        tensors.update({f"{key}.{part}": t.contiguous() for part, t in parts.items()})
    return tensors, info


def distill_scales(base_folder: Path, finetuned_folder: Path, tensors: dict[str, torch.Tensor], info: dict[str, dict],
                   calib: torch.Tensor, steps: int, lr: float, batch_size: int = 4, progress: bool = True) -> dict:
    """BitDelta's scale distillation: train only the bitdelta scales (as log multipliers of their
    initial mean |delta|) so the base + delta model's logits match the fine-tuned model's
    (KL divergence on calibration windows). Updates `tensors[<name>.scale]` in place.

    The forwards run under bf16 autocast where the CPU (or a GPU) has native bf16 matmul; the
    scales, the loss and the optimizer stay fp32.

    Returns {"steps", "kl_first", "kl_last"} (mean KL of the first and last 10% of steps)."""
    teacher = AutoModelForCausalLM.from_pretrained(finetuned_folder, dtype=torch.float32).eval()
    student = AutoModelForCausalLM.from_pretrained(base_folder, dtype=torch.float32).eval()
    for p in student.parameters():
        p.requires_grad_(False)
    own = dict(student.named_parameters(remove_duplicate=False))
    model_name = checkpoint_names(student, list(info))  # checkpoint key -> the model's parameter name
    params = {k: own[name] for k, name in model_name.items() if name in own}
    keys = [k for k, v in info.items() if v["kind"] == "bitdelta"]
    with torch.no_grad():  # tensors stored exactly are part of the student as they will be at load time
        for k, v in info.items():
            if v["kind"] in ("exact", "full"):
                stored = {v["kind"]: tensors[f"{k}.{v['kind']}"]}
                params[k].copy_(KINDS[v["kind"]].apply(params[k], stored, tuple(v["shape"])))
    signs = {k: sign_planes(tensors[f"{k}.sign"], info[k]["shape"][1]) for k in keys}  # [out, in] of +-1
    scale0 = {k: tensors[f"{k}.scale"].clone() for k in keys}
    log_m = {k: torch.zeros_like(scale0[k], requires_grad=True) for k in keys}
    opt = torch.optim.Adam(log_m.values(), lr=lr)
    losses = []
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=native_bf16_cpu())
    bar = tqdm(range(steps), desc="distil scales", unit="step", disable=not progress)
    for step in bar:
        rows = torch.arange(step * batch_size, (step + 1) * batch_size) % len(calib)
        ids = calib[rows]
        with torch.no_grad(), autocast:
            target = torch.log_softmax(teacher(ids).logits.float(), dim=-1)
        weights = {model_name[k]: params[k] + scale0[k] * log_m[k].exp() * signs[k] for k in keys}
        with autocast:
            logits = torch.func.functional_call(student, weights, (ids,), tie_weights=True).logits
        loss = torch.nn.functional.kl_div(torch.log_softmax(logits.float(), -1).flatten(0, 1), target.flatten(0, 1),
                                          log_target=True, reduction="batchmean")
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        bar.set_postfix(kl=f"{loss.item():.4f}")
    for k in keys:
        tensors[f"{k}.scale"] = (scale0[k] * log_m[k].detach().exp()).float()
    tail = max(1, steps // 10)
    return {"steps": steps, "kl_first": sum(losses[:tail]) / tail, "kl_last": sum(losses[-tail:]) / tail,
            "autocast": "bfloat16" if autocast.fast_dtype == torch.bfloat16 and native_bf16_cpu() else "off"}


def compress_delta(base, finetuned, config: DeltaConfig, out: str | os.PathLike,
                   calibration: str | torch.Tensor | None = None, nsamples: int = 128, seqlen: int = 256,
                   revision: str | None = None, overwrite: bool = False, progress: bool = True) -> Path:
    """Store `finetuned` as a compressed delta from `base` in the folder `out`.

    Args:
        base, finetuned: packaged names, folders or Hub ids (read tensor by tensor), or loaded models.
        config: a DeltaConfig.
        out: delta folder to write (atomically).
        calibration: text for bitdelta scale distillation: None for the wiki calibration half, a
            .txt/.jsonl path, or [n, seqlen] token ids. Unused without distillation.
        nsamples, seqlen: calibration windows drawn from the text (seeded by config.seed).
        revision: the base's Hub revision, recorded in the identity.
        overwrite: replace an existing non-empty `out`.
    Returns:
        The delta folder.
    """
    if not isinstance(config, DeltaConfig):
        raise UsageError(f"compress_delta takes a DeltaConfig, not {type(config).__name__}")
    out = prepare_out(out, overwrite)
    with tempfile.TemporaryDirectory(prefix="llmshrink-delta-") as tmp:
        base_folder, base_name = _source_folder(base, tmp, "base", revision)
        ft_folder, ft_name = _source_folder(finetuned, tmp, "finetuned")
        b, f = TensorIndex(base_folder), TensorIndex(ft_folder)
        _check_compatible(base_folder, ft_folder, b, f)
        codec = CODECS[config.codec]
        codec.check_shapes(config, {k: b.shape(k) for k in b.keys() if not config.stores_exactly(k, b.shape(k))})
        tensors, info = encode_tensors(b, f, config, progress)
        b.release()
        f.release()
        distill = None
        if codec.distils and config.distill_steps > 0 and not any(v["kind"] == codec.name for v in info.values()):
            logger.warning("no tensor is %s-coded (all are below min_numel or exact): nothing to distil", codec.name)
        elif codec.distils and config.distill_steps > 0:
            tokenizer = None if isinstance(calibration, torch.Tensor) else _base_tokenizer(base_folder)
            calib, _ = resolve_calibration(tokenizer, calibration, nsamples, seqlen, config.seed)
            distill = distill_scales(base_folder, ft_folder, tensors, info, calib, config.distill_steps,
                                     config.distill_lr, progress=progress)
            logger.info("scale distillation: KL %.4f -> %.4f", distill["kl_first"], distill["kl_last"])
        meta = {
            "format": FORMAT, "version": FORMAT_VERSION,
            "config": config.to_dict(),
            "base": {"name": base_name, "path": str(base_folder.resolve()), "revision": revision,
                     "sha256": tensors_sha256(base_folder)},
            "finetuned": {"name": ft_name, "sha256": tensors_sha256(ft_folder)},
            "distill": distill,
            "tensors": info,
        }
        with atomic_dir(out) as staging:
            save_tensors(tensors, staging / DELTA_FILE, metadata={"format": "pt", "llmshrink": FORMAT})
            (staging / META_FILE).write_text(json.dumps(meta, indent=2, default=list) + "\n")
            finetuned_config = json.loads((ft_folder / "config.json").read_text())
            LlmshrinkDeltaConfig(finetuned_config=finetuned_config, base_model=base_name).save_pretrained(staging)
    return out



def _base_tokenizer(folder: Path):
    """The base's tokenizer, for calibration text (the base is a plain local checkpoint folder)."""
    try:
        return AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
    except OSError as e:
        raise UsageError(f"cannot load the tokenizer of base model {folder} for scale distillation "
                         f"({str(e).splitlines()[0]}); give a base folder with its tokenizer files, or "
                         "calibration= as [n, seqlen] token ids") from None
