"""Checkpoints whose linears are stored as modules of llmshrink's own (factorized, shared): what
every such format does alike, apart from which module it builds.

Such a folder is a transformers checkpoint of the model's own config whose config.json also says
`quantization_config: {quant_method: <the format's>}`. The module of each swapped linear is read
off the checkpoint's tensors (an `Install` function builds them from the tensor shapes), so the
folder describes itself. Two loaders build them before the weights load: `load_swapped` (through
llmshrink.AutoModelForCausalLM, one tensor read at a time) and `SwappedHfQuantizer` (plain
transformers, through its public quantizer registry: the hook transformers offers for "these
modules are built differently before loading"; nothing is quantized by it).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Callable, ClassVar

import torch
from accelerate import init_empty_weights
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.quantizers import auto as hf_auto
from transformers.utils.quantization_config import QuantizationConfigMixin

from .arch import checkpoint_names
from .errors import UsageError
from .formats import Format, LoadRequest, register_format
from .io import atomic_dir
from .safetensors_io import TensorIndex

__all__ = ["Install", "SwappedHfQuantizer", "SwappedQuantizationConfig", "folder_quant_method", "load_swapped",
           "register_swapped", "register_swapped_format", "save_swapped", "set_module", "swap_linear"]

logger = logging.getLogger(__name__)

# install(model, {model-named tensor: shape}, dtype) -> how many linears it replaced by empty modules
Install = Callable[[nn.Module, dict[str, tuple[int, ...]], torch.dtype], int]


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put `module` at dotted path `name` of `model`."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def swap_linear(model: nn.Module, name: str, build: Callable[[nn.Linear], nn.Module], stored: str) -> None:
    """Replace the nn.Linear at `name` by `build(linear)`; a checkpoint that stores `stored` for a
    module the model lacks, or that is no linear, is refused as not matching its config."""
    try:
        linear = model.get_submodule(name)
    except AttributeError:
        raise UsageError(f"the checkpoint {stored} {name}, which this model does not have; the checkpoint "
                         "does not match its config") from None
    if not isinstance(linear, nn.Linear):
        raise UsageError(f"the checkpoint {stored} {name}, which is a {type(linear).__name__} in this model, not "
                         "a linear; the checkpoint does not match its config")
    set_module(model, name, build(linear))


def folder_quant_method(folder: str | os.PathLike) -> str | None:
    """The `quantization_config.quant_method` of a folder's config.json (None without one, and for
    a config.json that does not parse: the dense format's loader reports that)."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        return None
    try:
        qc = json.loads(path.read_text()).get("quantization_config") or {}
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return None
    return qc.get("quant_method") if isinstance(qc, dict) else None


def save_swapped(model, tokenizer, out: str | os.PathLike, quant_method: str | None) -> Path:
    """Write `model` and its tokenizer to `out`, whole or not at all; config.json names
    `quant_method` (None: an ordinary dense folder)."""
    out = Path(out)
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if quant_method is not None:
            mark_swapped(tmp, quant_method)
    return out


def mark_swapped(folder: Path, quant_method: str) -> None:
    """Name `quant_method` in a saved folder's config.json (save_pretrained of a model loaded by
    `load_swapped` writes none: its config lost the quantization_config at load)."""
    path = Path(folder) / "config.json"
    config = json.loads(path.read_text())
    config["quantization_config"] = {"quant_method": quant_method}
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def load_swapped(folder: str | os.PathLike, install: Install, dtype: torch.dtype, what: str):
    """The model of a swapped folder (`what`: its kind, for messages), its swapped linears built by
    `install`, on the CPU in eval mode. Tensors are read one at a time and no dense weight of a
    swapped linear is ever built; floating tensors take the dtype of the module's own tensor (the
    model's `dtype`, or one a module keeps, such as an fp16 codebook)."""
    folder = Path(folder)
    config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    index = TensorIndex(folder)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    names = checkpoint_names(model, index.keys())
    install(model, {names[k]: index.shape(k) for k in index.keys()}, dtype)
    targets = model.state_dict(keep_vars=True)
    state = {}
    for key in index.keys():
        t, name = index.get(key), names[key]
        state[name] = t.to(targets[name].dtype) if t.is_floating_point() and name in targets else t
    result = model.load_state_dict(state, strict=False, assign=True)
    index.release()
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    missing = [k for k in result.missing_keys if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or result.unexpected_keys:
        extra = result.unexpected_keys
        problem = f"lacks {len(missing)} tensors the model needs (first: {missing[0]})" if missing else \
            f"holds {len(extra)} tensors the model has no place for (first: {extra[0]})"
        raise UsageError(f"{folder} {problem}; the {what} checkpoint does not match its config")
    for name, buf in model.named_buffers():  # non-persistent buffers (rotary tables) built on meta
        if buf.device.type == "meta":
            raise UsageError(f"{name} of {folder} could not be materialised")
    return model.eval()


def register_swapped_format(name: str, quant_method: str, install: Install, refusal: str) -> Format:
    """Register the format `name` of the folders whose config.json names `quant_method`, loaded
    by `load_swapped` with `install` (float32 unless a dtype is asked for) and described by its
    name; `refusal` is what a pipeline step that cannot follow it is told (see `Format`)."""

    def load(folder: Path, request: LoadRequest):
        if request.base_model is not None:
            raise UsageError(f"base_model= is for delta and adapter folders; {request.name} is neither")
        if request.kwargs:
            raise UsageError(f"options {', '.join(request.kwargs)} are not supported for {name} checkpoints")
        return load_swapped(folder, install, request.dtype or torch.float32, name)

    return register_format(Format(
        name=name, priority=40, detect=lambda folder: folder_quant_method(folder) == quant_method, load=load,
        describe=lambda folder: ("transformers", [name]), refusal=refusal))


class SwappedQuantizationConfig(QuantizationConfigMixin):
    """`quantization_config` of a swapped folder: its quant method alone (the modules are read
    from the tensors). Subclasses set QUANT_METHOD."""

    QUANT_METHOD: ClassVar[str] = ""

    def __init__(self, **kwargs):
        self.quant_method = self.QUANT_METHOD

    def to_dict(self) -> dict:
        return {"quant_method": self.QUANT_METHOD}


class SwappedHfQuantizer(HfQuantizer):
    """Builds a swapped folder's modules before transformers loads its weights by name.
    Subclasses set `install` (a staticmethod), `what` and `trainable`."""

    requires_calibration = True  # loads folders llmshrink wrote only
    install: ClassVar[Install]
    what: ClassVar[str] = ""
    trainable: ClassVar[bool] = False

    def validate_environment(self, *args, **kwargs):
        pass

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        if not checkpoint_files:
            raise UsageError(f"a {self.what} checkpoint loads from safetensors files; none were found")
        index = TensorIndex(Path(checkpoint_files[0]).parent)
        names = checkpoint_names(model, index.keys())
        self.modules_to_not_convert = []
        count = self.install(model, {names[k]: index.shape(k) for k in index.keys()}, model.dtype)
        logger.info("llmshrink: %d %s linears built before loading", count, self.what)

    def _process_model_after_weight_loading(self, model, **kwargs):
        return model

    def is_serializable(self):
        return True

    @property
    def is_trainable(self) -> bool:
        return self.trainable


def register_swapped(config_cls: type[SwappedQuantizationConfig], quantizer_cls: type[SwappedHfQuantizer]) -> None:
    """Make plain transformers load the folders of `config_cls.QUANT_METHOD` (idempotent)."""
    name = config_cls.QUANT_METHOD
    if hf_auto.AUTO_QUANTIZER_MAPPING.get(name) is quantizer_cls:
        return
    register_quantization_config(name)(config_cls)
    register_quantizer(name)(quantizer_cls)
