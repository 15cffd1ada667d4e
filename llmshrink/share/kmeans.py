"""Weighted 1-D k-means over many rows at once, tensor in / tensor out.

Each row of x [rows, n] gets its own k centroids minimizing sum_j w_j (x_j - c[code_j])^2. With
w_j the diagonal of the layer's input second moment H_jj (SqueezeLLM's sensitivity weighting)
this is the output-error proxy GPTQ's Hessian gives when its cross terms are dropped; with w = 1
it is plain k-means (Deep Compression's weight sharing).

- Init: the centroids sit at the weighted quantiles (i + 1/2) / k of the row, so they start
  where the weight mass is (each cluster holds about the same weighted share).
- Lloyd iterations: in 1-D an element's nearest centroid is the number of midpoints of the
  sorted centroids below it (no [n, k] distance table); centroids are the weighted means of their
  members. Empty clusters are moved onto the row's elements of largest weighted error. Weighted
  rows also run plain k-means, and where its solution has the lower weighted error, weighted
  Lloyd iterations continue from it instead (they never raise the error), so no row's weighted
  error ends above plain k-means'.
- Pruned zeros (Deep Compression prunes before it shares): in a row holding exact zeros one
  centroid is fixed at 0 and every zero keeps it, so the sparsity survives; the other k - 1
  centroids cluster the rest (a nonzero may still round to 0 where that is nearest).
- A row with at most k distinct values is stored exactly: its codebook is those values.
"""

from __future__ import annotations

import torch

__all__ = ["assign", "reconstruct", "share_weight", "weighted_error", "weighted_kmeans"]

_TINY = 1e-30


def assign(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Index of the nearest centroid of each element: x [rows, n], centroids [rows, k] sorted
    along dim 1 -> codes [rows, n] int64 (the number of midpoints below each element)."""
    k = centroids.shape[1]
    mids = (centroids[:, 1:] + centroids[:, :-1]) / 2  # [rows, k - 1]
    if k > 16:
        return torch.searchsorted(mids.contiguous(), x.contiguous())
    codes = torch.zeros(x.shape, dtype=torch.uint8, device=x.device)
    for j in range(k - 1):  # k - 1 comparisons beat a binary search for few centroids (3x at k = 8)
        codes += x > mids[:, j:j + 1]
    return codes.long()


def reconstruct(centroids: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """The shared values each code stands for: centroids [rows, k], codes [rows, n] -> [rows, n]."""
    return centroids.gather(1, codes.long())


def weighted_error(x: torch.Tensor, weight: torch.Tensor | None, centroids: torch.Tensor,
                   codes: torch.Tensor) -> torch.Tensor:
    """sum_j w_j (x_j - c[code_j])^2 per row: [rows] float64 (w = 1 without `weight`)."""
    sq = (x.double() - reconstruct(centroids, codes).double()).pow(2)
    return (sq if weight is None else sq * weight.double()).sum(1)


def _exact(sx: torch.Tensor, order: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows with at most k distinct values, stored exactly: (which [rows] bool, centroids [m, k],
    codes [m, n]) for the m such rows; the codebook is the distinct values, padded with the largest."""
    first = torch.ones_like(sx, dtype=torch.bool)
    first[:, 1:] = sx[:, 1:] != sx[:, :-1]
    rank = first.long().cumsum(1) - 1  # [rows, n] distinct value of each sorted element
    exact = rank[:, -1] < k
    sx, order, rank = sx[exact], order[exact], rank[exact]
    centroids = sx[:, -1:].expand(-1, k).clone().scatter_(1, rank, sx)
    codes = torch.empty_like(rank).scatter_(1, order, rank)  # back to the elements' own places
    return exact, centroids, codes


def _init(sx: torch.Tensor, sw: torch.Tensor, k: int, fixed_row: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Centroids at the weighted quantiles of the sorted rows sx (weights sw, zero for what they
    must not see), the last one fixed at 0 in `fixed_row` rows: (centroids [rows, k] sorted,
    fixed [rows, k] bool, permuted along)."""
    rows, n = sx.shape
    cdf = sw.cumsum(1)
    cdf = cdf / cdf[:, -1:].clamp_min(_TINY)
    free = (k - fixed_row.long()).clamp_min(1)[:, None]  # [rows, 1] centroids that move
    q = ((torch.arange(k, device=sx.device) + 0.5) / free).clamp(max=1.0)  # [rows, k]
    idx = torch.searchsorted(cdf.contiguous(), q.to(cdf.dtype).contiguous()).clamp(max=n - 1)
    centroids = sx.gather(1, idx)
    fixed = torch.zeros(rows, k, dtype=torch.bool, device=sx.device)
    fixed[:, -1] = fixed_row
    centroids = torch.where(fixed, torch.zeros_like(centroids), centroids)
    centroids, perm = centroids.sort(1)
    return centroids, fixed.gather(1, perm)


def _lloyd(x: torch.Tensor, w: torch.Tensor, kept: torch.Tensor, centroids: torch.Tensor, fixed: torch.Tensor,
           iters: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Lloyd iterations from sorted `centroids` (`fixed` ones never move; the `kept` elements
    always take their row's fixed centroid). None raises the weighted error: the assignment takes
    each element's nearest centroid, the update each cluster's weighted mean, and an empty
    cluster has no members to lose. Returns (centroids [rows, k] sorted, codes [rows, n], fixed)."""
    k = centroids.shape[1]
    ones = torch.ones_like(x)
    previous = None
    for _ in range(iters):
        codes = assign(x, centroids)
        codes = torch.where(kept, fixed.long().argmax(1, keepdim=True), codes)
        if previous is not None and torch.equal(codes, previous):
            break  # the same members give the same means: converged
        previous = codes
        mass = torch.zeros_like(centroids).scatter_add_(1, codes, w)
        sums = torch.zeros_like(centroids).scatter_add_(1, codes, w * x)
        count = torch.zeros_like(centroids).scatter_add_(1, codes, ones)
        moved = torch.where((count > 0) & ~fixed, sums / mass.clamp_min(_TINY), centroids)
        empty = (count == 0) & ~fixed
        if empty.any():  # the j-th empty cluster of a row moves onto its j-th largest error
            err = torch.where(kept, torch.zeros_like(x), w * (x - moved.gather(1, codes)).pow(2))
            worst, at = err.topk(min(k, x.shape[1]), dim=1)  # [rows, k'] descending
            j = (empty.long().cumsum(1) - 1).clamp(0, worst.shape[1] - 1)  # [rows, k]
            reseed = empty & (worst.gather(1, j) > 0)
            moved = torch.where(reseed, x.gather(1, at.gather(1, j)), moved)
            previous = None  # the codes will change
        centroids, perm = moved.sort(1)
        fixed = fixed.gather(1, perm)
    codes = torch.where(kept, fixed.long().argmax(1, keepdim=True), assign(x, centroids))
    return centroids, codes, fixed


@torch.no_grad()
def weighted_kmeans(x: torch.Tensor, k: int, weight: torch.Tensor | None = None, iters: int = 25,
                    keep_zeros: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """k shared values per row of `x` minimizing each row's weighted squared error.

    Args:
        x: [rows, n] values (a linear's weight with one row per output, or [1, out * in]).
        k: centroids per row (2^bits).
        weight: [rows, n] or broadcastable to it (e.g. [1, n]) non-negative weights; None: all 1.
        iters: Lloyd iterations at most (it stops once no code changes).
        keep_zeros: in rows holding exact zeros, fix one centroid at 0 for them.
    Returns:
        (centroids [rows, k] float32 ascending, codes [rows, n] int64 in [0, k)).
    """
    x = x.float()
    rows, n = x.shape
    w = torch.ones_like(x) if weight is None else weight.float().clamp_min(0).expand(rows, n).clone()
    total = w.sum(1, keepdim=True)
    w = torch.where(total > 0, w + 1e-9 * total / n, torch.ones_like(w))  # no element weighs nothing at all
    centroids = torch.empty(rows, k, dtype=torch.float32, device=x.device)
    codes = torch.empty(rows, n, dtype=torch.long, device=x.device)
    sx, order = x.sort(1)
    exact, exact_centroids, exact_codes = _exact(sx, order, k)
    centroids[exact], codes[exact] = exact_centroids, exact_codes
    todo = ~exact
    if todo.any():
        xs, ws = x[todo], w[todo]
        zero = xs == 0 if keep_zeros else torch.zeros_like(xs, dtype=torch.bool)
        fixed_row = zero.any(1)
        kept = zero & fixed_row[:, None]
        sx, order = sx[todo], order[todo]

        def run(wt: torch.Tensor, start: tuple[torch.Tensor, torch.Tensor]):
            return _lloyd(xs, wt, kept, *start, iters)

        def quantiles(wt: torch.Tensor):  # the kept zeros weigh nothing where the free centroids start
            return _init(sx, torch.where(kept, torch.zeros_like(wt), wt).gather(1, order), k, fixed_row)

        found = run(ws, quantiles(ws))
        if weight is not None:
            # Weighted Lloyd from weighted quantiles can settle in a worse local optimum than the
            # plain k-means solution (measured at 4 bits on heavy-tailed rows): the rows where plain
            # k-means' solution weighs less restart from it, so no row ends worse than plain k-means.
            plain = run(torch.ones_like(ws), quantiles(torch.ones_like(ws)))
            better = (weighted_error(xs, ws, plain[0], plain[1]) < weighted_error(xs, ws, found[0], found[1]))[:, None]
            if better.any():
                refined = run(ws, (torch.where(better, plain[0], found[0]), torch.where(better, plain[2], found[2])))
                found = tuple(torch.where(better, r, f) for r, f in zip(refined, found))
        centroids[todo], codes[todo] = found[0], found[1]
    return centroids, codes


def share_weight(weight: torch.Tensor, h_diag: torch.Tensor | None, bits: int, per: str = "row",
                 iters: int = 25) -> tuple[torch.Tensor, torch.Tensor]:
    """A linear's weight as codes into 2^bits shared values.

    Args:
        weight: [out, in].
        h_diag: [in] each input channel's calibration second moment (weighs every weight of the
            channel), or None for plain k-means.
        per: "row" (a codebook per output row) or "tensor" (one for the whole linear).
    Returns:
        (codes [out, in] int64, codebook [out, 2^bits] or [1, 2^bits] float32 ascending).
    """
    out_features, in_features = weight.shape
    w = None if h_diag is None else h_diag.float()[None, :].expand(out_features, in_features)
    if per == "row":
        codebook, codes = weighted_kmeans(weight, 2 ** bits, w, iters)
        return codes, codebook
    codebook, codes = weighted_kmeans(weight.reshape(1, -1), 2 ** bits, None if w is None else w.reshape(1, -1), iters)
    return codes.reshape(out_features, in_features), codebook
