"""GPTQ math on plain tensors: Hessians, grids, round-to-nearest, and GPTQ with error feedback.

Nothing here knows about models: `apply.py` walks the model, feeds activations to
`accumulate_hessian` and hands each weight to `gptq_quantize` or `rtn_quantize`.

Conventions: weights are nn.Linear's [out, in]; a group is `group_size` consecutive input
channels (in act-order, consecutive in the permuted order); codes are integers in [0, 2**bits);
W ~= scale * (code - zero). Asymmetric zero points are kept in [1, 2**bits - 1] so the v1 GPTQ
layout (which stores zero - 1) can hold them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["QuantResult", "accumulate_cross", "accumulate_diagonal", "accumulate_hessian", "fp_target_weight",
           "grid_params", "quantize_dequantize", "rtn_quantize",
           "gptq_quantize", "DEFAULT_SHRINK_GRID"]

# Range shrink factors tried per group by the clipping search (1.0 = the full min/max range).
DEFAULT_SHRINK_GRID = tuple(round(1.0 - 0.025 * k, 3) for k in range(13))  # 1.0 ... 0.7


@dataclass
class QuantResult:
    codes: torch.Tensor  # [out, in] int32
    scales: torch.Tensor  # [groups, out] float32
    zeros: torch.Tensor  # [groups, out] int32
    g_idx: torch.Tensor  # [in] int32
    dequantized: torch.Tensor  # [out, in] float32, what the packed tensors decode to
    loss: float  # sum over columns of (w - q)^2 / Hinv_jj (GPTQ's objective); 0 for RTN
    row_loss: torch.Tensor  # [out] the same per output row (sums to `loss`)


def accumulate_hessian(H: torch.Tensor | None, count: int, x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Running H = 2/N * sum_t x_t x_t^T over all N tokens seen so far.

    H is symmetric, so wide inputs are multiplied in column blocks and only the blocks on and
    above the diagonal are computed (the rest copied): a quarter fewer flops for the largest
    share of a GPTQ run's time on CPUs.

    Args:
        H: [in, in] float32 so far, or None to start.
        count: tokens behind H.
        x: [..., in] new inputs of the layer.
    Returns:
        (H, count) updated.
    """
    x = x.reshape(-1, x.shape[-1]).float()  # [tokens, in]
    if H is None:
        H = torch.zeros((x.shape[1], x.shape[1]), dtype=torch.float32, device=x.device)
    total = count + x.shape[0]
    H.mul_(count / total)
    x = x * math.sqrt(2.0 / total)
    d = x.shape[1]
    k = 1 if d < 256 else 4
    edges = [d * i // k for i in range(k + 1)]
    blocks = [slice(edges[i], edges[i + 1]) for i in range(k)]
    for i, bi in enumerate(blocks):
        for bj in blocks[i:]:
            H[bi, bj].addmm_(x[:, bi].t(), x[:, bj])
    for i, bi in enumerate(blocks):
        for bj in blocks[i + 1:]:
            H[bj, bi].copy_(H[bi, bj].t())
    return H, total


def accumulate_cross(M: torch.Tensor | None, count: int, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Running M = 2/N * sum_t x_t y_t^T, on the same scale as `accumulate_hessian`'s H.

    Args:
        M: [in, in] float32 so far, or None to start.
        count: tokens behind M (before this call: pass the count `accumulate_hessian` was given).
        x, y: [..., in] paired inputs of one linear (the quantized model's, the full-precision model's).
    """
    x = x.reshape(-1, x.shape[-1]).float()
    y = y.reshape(-1, y.shape[-1]).float()
    if M is None:
        M = torch.zeros((x.shape[1], y.shape[1]), dtype=torch.float32, device=x.device)
    total = count + x.shape[0]
    return M.mul_(count / total).addmm_(x.t(), y, alpha=2.0 / total)


def fp_target_weight(weight: torch.Tensor, H: torch.Tensor, M: torch.Tensor, damp_percent: float,
                     alpha: float = 1.0) -> torch.Tensor:
    """The weight GPTQ solves for when the full-precision outputs are (partly) the target.

    W* = W M^T H^-1, with H = X~ X~^T and M = X~ X^T, is the weight whose outputs on the quantized
    model's inputs X~ best match the full-precision model's outputs W X (least squares):
    ||Q X~ - W X||^2 = ||(Q - W*) X~||^2 + a constant, so GPTQ run on (W*, H) minimizes the error
    against the full-precision outputs (the "asymmetric calibration" of GPTAQ, Li et al. 2025).
    Only the correction is damped, W* = W + W (M^T - H) (H + damp I)^-1, so that inputs that have
    not drifted (M = H) leave W as it is: damping W M^T itself would shrink W towards 0 along every
    direction the calibration text hardly excites. Returned is W + alpha (W* - W): the exact
    minimizer target of (1 - alpha) ||(Q - W) X~||^2 + alpha ||Q X~ - W X||^2, GPTQ's own
    objective at alpha 0."""
    weight = weight.float()
    damp = damp_percent * torch.diagonal(H).mean().clamp(min=1e-8)
    Hd = H + damp * torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    correction = torch.linalg.solve(Hd, (M - H) @ weight.t()).t()
    return weight + alpha * correction


def accumulate_diagonal(d: torch.Tensor | None, count: int, x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The diagonal of `accumulate_hessian`'s H alone: running 2/N * sum_t x_t^2 ([in] float32),
    for what weighs each input channel without the cross terms (a fraction of the flops)."""
    x = x.reshape(-1, x.shape[-1]).float()  # [tokens, in]
    if d is None:
        d = torch.zeros(x.shape[1], dtype=torch.float32, device=x.device)
    total = count + x.shape[0]
    d.mul_(count / total).add_(x.pow(2).sum(0), alpha=2.0 / total)
    return d, total


def grid_params(w: torch.Tensor, bits: int, sym: bool, shrink: float | torch.Tensor = 1.0
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point per row of `w` [rows, cols] for a `bits`-bit grid.

    The range always includes 0 (as GPTQ's); `shrink` (scalar or [rows]) narrows it, clipping outliers.
    Returns (scale [rows] float32, zero [rows] float32 holding integers).
    """
    maxq = 2**bits - 1
    w = w.float()
    xmin = torch.clamp(w.min(1).values, max=0) * shrink
    xmax = torch.clamp(w.max(1).values, min=0) * shrink
    if sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = -xmax
    flat = (xmin == 0) & (xmax == 0)
    xmin, xmax = torch.where(flat, -1.0, xmin), torch.where(flat, 1.0, xmax)
    scale = ((xmax - xmin) / maxq).to(torch.float16).float()  # the checkpoint stores fp16 scales
    if sym:
        zero = torch.full_like(scale, (maxq + 1) // 2)
    else:
        zero = torch.round(-xmin / scale).clamp(1, maxq)
    return scale, zero


def quantize_dequantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, dequantized) of `w` [rows, ...] with per-row `scale`, `zero` [rows]."""
    shape = (-1,) + (1,) * (w.dim() - 1)
    s, z = scale.view(shape), zero.view(shape)
    codes = torch.clamp(torch.round(w / s) + z, 0, 2**bits - 1)
    return codes, s * (codes - z)


def _search_params(w: torch.Tensor, h_diag: torch.Tensor, bits: int, sym: bool,
                   grid: tuple[float, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the shrink from `grid` whose grid has the least Hessian-weighted error
    sum_j H_jj (w_j - q_j)^2 on `w` [rows, cols] (h_diag [cols])."""
    best_err = best_scale = best_zero = None
    for shrink in grid:
        scale, zero = grid_params(w, bits, sym, shrink)
        _, q = quantize_dequantize(w, scale, zero, bits)
        err = ((w - q) ** 2 * h_diag).sum(1)  # [rows]
        if best_err is None:
            best_err, best_scale, best_zero = err, scale, zero
        else:
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_scale = torch.where(better, scale, best_scale)
            best_zero = torch.where(better, zero, best_zero)
    return best_scale, best_zero


def _group_params(w, h_diag, bits, sym, grid):
    if grid and len(grid) > 1:
        return _search_params(w, h_diag, bits, sym, grid)
    return grid_params(w, bits, sym, grid[0] if grid else 1.0)


def rtn_quantize(weight: torch.Tensor, bits: int, group_size: int = 128, sym: bool = True,
                 shrink_grid: tuple[float, ...] = (1.0,), h_diag: torch.Tensor | None = None) -> QuantResult:
    """Round to nearest on each group's grid: the baseline every report compares against.

    With a `shrink_grid` of several values, each group's range is searched (weighted by `h_diag`
    [in] if given, else uniformly).
    """
    W = weight.float()
    out_f, in_f = W.shape
    gs = in_f if group_size == -1 else group_size
    hd = torch.ones(in_f) if h_diag is None else h_diag.float()
    codes, deq = torch.empty_like(W), torch.empty_like(W)
    scales, zeros = [], []
    for g0 in range(0, in_f, gs):
        g1 = min(g0 + gs, in_f)
        scale, zero = _group_params(W[:, g0:g1], hd[g0:g1], bits, sym, shrink_grid)
        codes[:, g0:g1], deq[:, g0:g1] = quantize_dequantize(W[:, g0:g1], scale, zero, bits)
        scales.append(scale)
        zeros.append(zero)
    g_idx = torch.arange(in_f, dtype=torch.int32) // gs
    return QuantResult(codes.to(torch.int32), torch.stack(scales), torch.stack(zeros).to(torch.int32),
                       g_idx, deq, 0.0, torch.zeros(out_f))


def gptq_quantize(
    weight: torch.Tensor,
    H: torch.Tensor,
    bits: int,
    group_size: int = 128,
    sym: bool = True,
    desc_act: bool = False,
    static_groups: bool = False,
    damp_percent: float = 0.01,
    block_size: int = 128,
    shrink_grid: tuple[float, ...] = DEFAULT_SHRINK_GRID,
) -> QuantResult:
    """GPTQ (Frantar et al., 2022): quantize columns one by one, feeding each column's error back
    into the columns not yet quantized through the inverse Hessian's Cholesky factor.

    Args:
        weight: [out, in] weight.
        H: [in, in] Hessian from `accumulate_hessian`.
        bits, group_size (-1: one group per row), sym: the grid.
        desc_act: act-order, quantize columns by decreasing H_jj (stored as g_idx).
        static_groups: with desc_act, compute each group's grid up front in the original order.
        damp_percent: added to H's diagonal, as a fraction of its mean.
        block_size: columns per lazy batch update.
        shrink_grid: range shrink factors searched per group (Hessian-weighted); (1.0,) is plain GPTQ.
    """
    W = weight.float().clone()
    out_f, in_f = W.shape
    gs = in_f if group_size == -1 else group_size
    H = H.float().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    h_diag = torch.diag(H).clone()

    n_groups = math.ceil(in_f / gs)
    static = None
    if static_groups:
        static = [_group_params(W[:, g * gs:(g + 1) * gs], h_diag[g * gs:(g + 1) * gs], bits, sym, shrink_grid)
                  for g in range(n_groups)]
    perm = torch.argsort(h_diag, descending=True) if desc_act else torch.arange(in_f)
    W, H, h_perm = W[:, perm], H[perm][:, perm], h_diag[perm]

    H.diagonal().add_(damp_percent * torch.mean(torch.diag(H)))
    try:
        Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    except torch.linalg.LinAlgError as e:
        raise ValueError(f"the Hessian is not positive definite even after damping ({e}); "
                         "raise damp_percent or use more calibration data") from None

    codes = torch.zeros_like(W)
    deq = torch.zeros_like(W)
    scales = torch.zeros((n_groups, out_f))
    zeros = torch.zeros((n_groups, out_f))
    if static is not None:
        for g, (scale, zero) in enumerate(static):
            scales[g], zeros[g] = scale, zero
        col_group = perm // gs  # group of each permuted column
        static_of = [static[g] for g in col_group.tolist()]
    else:
        col_group = torch.arange(in_f) // gs
    row_loss = torch.zeros(out_f)
    scale = zero = None
    for i1 in range(0, in_f, block_size):
        i2 = min(i1 + block_size, in_f)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        diag1 = Hinv1.diagonal().tolist()
        for i in range(i2 - i1):
            col = i1 + i
            if static is not None:
                scale, zero = static_of[col]
            elif col % gs == 0:  # a new group: its grid from the error-updated weights
                g, end = col // gs, min(col + gs, in_f)
                W_group = torch.cat([W1[:, i:], W[:, i2:end]], dim=1)[:, :end - col]
                scale, zero = _group_params(W_group, h_perm[col:end], bits, sym, shrink_grid)
                scales[g], zeros[g] = scale, zero
            w = W1[:, i]
            c, q = quantize_dequantize(w, scale, zero, bits)
            codes[:, col], deq[:, col] = c, q
            err = (w - q) / diag1[i]
            W1[:, i:] -= err[:, None] @ Hinv1[i, i:][None, :]
            Err1[:, i] = err
        row_loss += Err1.pow(2).sum(1) / 2  # (w - q)^2 / Hinv_jj^2 / 2 per column
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]

    inv = torch.argsort(perm)
    g_idx = col_group[inv].to(torch.int32)  # [in]: group of each original input channel
    return QuantResult(codes[:, inv].to(torch.int32), scales, zeros.to(torch.int32), g_idx, deq[:, inv],
                       float(row_loss.sum()), row_loss)
