"""`llmshrink.share.share`: every decoder linear's weights clustered into 2^bits shared values,
one layer at a time, then swapped for a SharedLinear.

With `weighted`, one walk over the decoder (`gptq.passes.walk_layers`: one layer's inputs held at
a time) accumulates the diagonal of each linear's input second moment, H_jj = 2/N sum_t x_tj^2,
which weighs every weight of input channel j in the k-means (`kmeans.py`). Each layer's inputs
are the outputs of the already shared layers before it, as GPTQ's are. Without it no text is
read: plain k-means on the weights alone.
"""

from __future__ import annotations

import logging
import time

import torch
from torch import nn

from ..arch import decoder_steps
from ..calibration import check_seqlen, resolve_calibration
from ..gptq.algorithm import accumulate_diagonal
from ..gptq.passes import walk_layers
from ..swap import set_module
from .config import ShareConfig
from .kmeans import share_weight
from .modules import SharedLinear

__all__ = ["RECORD", "share", "stored_bits"]

logger = logging.getLogger(__name__)

RECORD = "llmshrink_share"  # the config.json key of a shared folder


def stored_bits(module: SharedLinear) -> int:
    """Bits a shared linear stores for its weight: its codes (unpadded) and its fp16 codebooks."""
    return module.in_features * module.out_features * module.bits + 16 * module.codebook.numel()


@torch.no_grad()
def share(model: nn.Module, config: ShareConfig, calibration: str | torch.Tensor | None = None, tokenizer=None,
          nsamples: int = 128, seqlen: int = 512, seed: int = 0, progress: bool = True) -> dict:
    """Replace `model`'s decoder linears by SharedLinear modules, in place.

    Args:
        calibration: None (the wiki calibration half), a .txt/.jsonl path, or [n, seqlen] token ids;
            read only with `weighted`.
        tokenizer: the model's tokenizer, to cut calibration text.
    Returns:
        The record (also set as `model.config.llmshrink_share`): the config, the linears shared,
        their stored bits per weight (codebooks included), the exact zeros kept, and each linear's
        relative error sum_j w_j (W - W')^2 / sum_j w_j W^2 (w = H_jj, or 1 unweighted).
    """
    chosen = decoder_steps(model)
    calib, calib_info = None, None
    if config.weighted:
        check_seqlen(model.config, seqlen if not isinstance(calibration, torch.Tensor) else calibration.shape[1])
        calib, calib_info = resolve_calibration(tokenizer, calibration, nsamples, seqlen, seed)
    started = time.perf_counter()
    relative: dict[str, float] = {}
    totals = {"bits": 0, "weights": 0, "zeros": 0}

    def replace(i, steps, moments):
        for step in steps:
            for name, module in step:
                W = module.weight.detach().float()
                h_diag = moments[name]
                codes, codebook = share_weight(W, h_diag, config.bits, config.per, config.iters)
                bias = None if module.bias is None else module.bias.detach()
                shared = SharedLinear.from_codes(codes, codebook, bias, dtype=module.weight.dtype)
                w = torch.ones(W.shape[1]) if h_diag is None else h_diag.double()
                energy = float((W.double().pow(2) * w).sum())
                err = float(((W - shared.dequantized_weight()).double().pow(2) * w).sum())
                relative[name] = round(err / energy, 6) if energy > 0 else 0.0
                totals["bits"] += stored_bits(shared)
                totals["weights"] += W.numel()
                totals["zeros"] += int((W == 0).sum())
                set_module(model, name, shared)

    walk_layers(model, calib, chosen, replace, sequential=True, progress=progress, desc="share",
                accumulate=accumulate_diagonal)
    record = {"config": config.to_dict(), "linears": len(relative),
              "bits_per_weight": round(totals["bits"] / totals["weights"], 6), "zeros_kept": totals["zeros"],
              "relative_error": relative, "calibration": calib_info}
    logger.info("shared %d linears at %.3f stored bits per weight in %.1f s", len(relative),
                record["bits_per_weight"], time.perf_counter() - started)
    model.config.llmshrink_share = record
    return record
