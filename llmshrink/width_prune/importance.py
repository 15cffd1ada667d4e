"""The importance of MLP channels and key/value head groups, and the choice of widths: tensors in,
tensors (or counts) out; `apply.py` gathers the statistics and edits the model.

A layer's MLP writes y = sum_j a_j W_down[:, j] into the residual stream (a_j = act(gate_j) up_j),
its attention y = sum_g W_o[:, cols_g] z_g (z_g: the outputs of group g's query heads). The output
energy a unit adds, over the calibration tokens, is
- channel j: E[a_j^2] * ||W_down[:, j]||^2 (exact for one channel);
- group g: E[||W_o[:, cols_g] z_g||^2] (exact for the group, its heads' cross terms included).
Removing a unit removes its energy; removing several removes about the sum (the cross terms
between units are left out), so a layer drops its lowest-energy units, and the widths, one count
for all layers, are those whose summed removed energy is least within the parameter budget.

FLAP's bias compensation: a unit's mean output E[y] can be put back as a bias of down_proj or
o_proj, so what removing it loses is only the variance part, E||y - E y||^2 (the `centered`
scores). On tiny random Llamas with text calibration it lowered the logits' error after removing
a key/value group 1.5-2.8x (MSE 1.0e-2 -> 3.5e-3, 1.1e-2 -> 7.5e-3, 9.1e-3 -> 5.2e-3 on three
seeds) and after removing a quarter of the MLP channels 1.1x; see the config's `compensate`.

Refitting (the config's `refit`): the energy scores above assume the kept units stay as they were.
Instead, the writer (down_proj, o_proj) can be refit by least squares on its kept inputs, given the
inputs' second moment M = E[x x^T] (their covariance with compensation): W'_K = W M[:, K] M[K, K]^-1,
which leaves the output error tr((W - W'_K P_K) M (.)^T) (P_K: keep only K). Which units to drop is
then chosen greedily with that refit in the loop, one unit (a channel, or a key/value group's
block of o_proj columns) at a time, by the Optimal Brain Surgeon formula on M^-1: dropping block S
costs tr(W_S (M^-1_SS)^-1 W_S^T) and updates W and M^-1 in closed form (structured OBS as ZipLM and
SlimGPT use it). The running sum of those costs is the layer's error curve against how many units
go, which replaces the energy curve in the width choice.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch

__all__ = ["attention_bias_shift", "bias_shift", "channel_scores", "choose_from_curves", "choose_widths",
           "damped", "fitting_widths", "group_output_stats", "group_scores", "input_moment", "keep_indices",
           "mlp_bias_shift", "obs_curve", "parse_ranges", "ranges", "refit", "removal_curves"]

DAMP = 0.01  # added to M's diagonal, times its mean, before inverting (GPTQ's default dampening)


def channel_scores(sq_sum: torch.Tensor, total: torch.Tensor, count: int, down_weight: torch.Tensor,
                   centered: bool = False) -> torch.Tensor:
    """Each MLP channel's mean output energy E[a_j^2] ||W_down[:, j]||^2 (`centered`: Var(a_j)
    ||W_down[:, j]||^2, what is lost when the mean is put back as a bias).

    Args:
        sq_sum, total: [I] the sums over calibration tokens of a_j^2 and of a_j (down_proj's inputs).
        count: the number of tokens summed.
        down_weight: [hidden, I] down_proj's weight.
    Returns:
        [I] float64.
    """
    moment = sq_sum.double() / count
    if centered:
        moment = (moment - (total.double() / count) ** 2).clamp_min(0)
    return moment * down_weight.detach().double().pow(2).sum(0)


def group_output_stats(z: torch.Tensor, o_weight: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The sums over one batch's tokens of ||y_g||^2 and of y_g, y_g = W_o[:, cols_g] z_g the
    output of key/value group g's query heads through o_proj.

    Args:
        z: [..., heads * head_dim] the inputs of o_proj (heads in order; group g holds the query
            heads g * heads/groups ... (g + 1) * heads/groups - 1, as transformers' repeat_kv).
        o_weight: [hidden, heads * head_dim] o_proj's weight.
        groups: the number of key/value heads.
    Returns:
        ([groups], [groups, hidden]) float64.
    """
    z = z.detach().reshape(-1, z.shape[-1]).double()  # [tokens, heads * head_dim]
    width = z.shape[1] // groups  # columns per group: query heads per group * head_dim
    W = o_weight.detach().double()
    sq, total = [], []
    for g in range(groups):
        y = z[:, g * width:(g + 1) * width] @ W[:, g * width:(g + 1) * width].T  # [tokens, hidden]
        sq.append(y.pow(2).sum())
        total.append(y.sum(0))
    return torch.stack(sq), torch.stack(total)


def group_scores(sq_sum: torch.Tensor, total: torch.Tensor, count: int, centered: bool = False) -> torch.Tensor:
    """[groups] mean output energy E||y_g||^2 per group (`centered`: E||y_g - E y_g||^2), from the
    sums of `group_output_stats` over all batches ([groups], [groups, hidden])."""
    energy = sq_sum.double() / count
    if centered:
        energy = (energy - (total.double() / count).pow(2).sum(-1)).clamp_min(0)
    return energy


def mlp_bias_shift(total: torch.Tensor, count: int, down_weight: torch.Tensor, removed: torch.Tensor) -> torch.Tensor:
    """[hidden] the mean output of the removed MLP channels, W_down[:, removed] E[a_removed]: added
    to down_proj's bias, it puts back what they wrote on average (FLAP's bias compensation)."""
    removed = removed.long()
    return down_weight.detach().double()[:, removed] @ (total.double()[removed] / count)


def attention_bias_shift(total: torch.Tensor, count: int, removed: torch.Tensor) -> torch.Tensor:
    """[hidden] the mean output through o_proj of the removed key/value groups (`total` [groups,
    hidden] the sums of `group_output_stats`), for o_proj's bias."""
    return total.double()[removed.long()].sum(0) / count


def keep_indices(scores: torch.Tensor, count: int) -> torch.Tensor:
    """The `count` highest-scoring units, in their original order (ties: the lower index kept)."""
    order = torch.sort(scores, descending=True, stable=True).indices
    return torch.sort(order[:count]).values


def removal_curves(scores: torch.Tensor) -> torch.Tensor:
    """[layers, n + 1]: entry [l, r] is the energy layer l loses when its r lowest units go."""
    low = torch.sort(scores.double(), dim=1).values
    return torch.cat([torch.zeros(scores.shape[0], 1, dtype=torch.float64), low.cumsum(1)], dim=1)


def fitting_widths(group_options: Iterable[int], channel_options: Iterable[int], cost: Callable[[int, int], int],
                   budget: float) -> list[tuple[int, int]]:
    """For each group count, the most channels whose cost is within `budget`: the (groups,
    channels) pairs the width choice picks among (shapes alone decide them, not the scores)."""
    channel_options = sorted(set(channel_options), reverse=True)
    pairs = []
    for groups in sorted(set(group_options), reverse=True):
        channels = next((c for c in channel_options if cost(groups, c) <= budget), None)
        if channels is not None:
            pairs.append((groups, channels))
    return pairs


def choose_from_curves(group_curves: torch.Tensor, channel_curves: torch.Tensor, widths: tuple[int, int],
                       pairs: list[tuple[int, int]], cost: Callable[[int, int], int],
                       totals: torch.Tensor | None = None) -> tuple[int, int, list[dict]]:
    """The pair of `pairs` (groups, channels kept in every layer) whose removed energy, summed over
    the layers, is least.

    Args:
        group_curves: [layers, >= G - least groups + 1], entry [l, r] what layer l loses when r
            groups go; channel_curves: [layers, >= I - least channels + 1] the same for channels.
        widths: (G, I), the original key/value groups and channels.
        totals: [layers] each layer's removed energy is divided by this (None: absolute).
    Returns:
        (groups, channels, candidates): a dict per pair with its parameters and removed energy.
        Raises ValueError when `pairs` is empty (the caller says which ratio is the least allowed).
    """
    G, I = widths
    scale = torch.ones(group_curves.shape[0], dtype=torch.float64) if totals is None else torch.where(
        totals > 0, 1 / totals.double(), torch.ones_like(totals, dtype=torch.float64))
    candidates = []
    for groups, channels in pairs:
        removed = float(((group_curves[:, G - groups] + channel_curves[:, I - channels]) * scale).sum())
        candidates.append({"kv_groups": groups, "channels": channels, "parameters": cost(groups, channels),
                           "removed_energy": removed})
    if not candidates:
        raise ValueError("no widths fit the budget")
    best = min(candidates, key=lambda c: (c["removed_energy"], -c["parameters"]))
    return best["kv_groups"], best["channels"], candidates


def choose_widths(group_scores: torch.Tensor, channel_scores: torch.Tensor, group_options: Iterable[int],
                  channel_options: Iterable[int], cost: Callable[[int, int], int], budget: float,
                  relative: bool = True) -> tuple[int, int, list[dict]]:
    """The (groups, channels) kept in every layer whose removed energy, summed over the layers, is
    least among the options that cost at most `budget`, each unit's energy as scored alone.

    Args:
        group_scores: [layers, G] each layer's group energies; channel_scores: [layers, I].
        group_options, channel_options: the counts allowed (G and I among them).
        cost: parameters of the model kept at (groups, channels).
        relative: each layer's removed energy divided by that layer's total energy (groups and
            channels together); off: absolute.
    Returns:
        as `choose_from_curves`.
    """
    att, mlp = removal_curves(group_scores), removal_curves(channel_scores)
    pairs = fitting_widths(group_options, channel_options, cost, budget)
    return choose_from_curves(att, mlp, (group_scores.shape[1], channel_scores.shape[1]), pairs, cost,
                              att[:, -1] + mlp[:, -1] if relative else None)


def input_moment(outer_sum: torch.Tensor, total: torch.Tensor, count: int, centered: bool = False) -> torch.Tensor:
    """[n, n] float64 E[x x^T] of a linear's inputs from their sums over `count` tokens of x x^T
    ([n, n]) and x ([n]); `centered`: their covariance E[(x - E x)(x - E x)^T]."""
    moment = outer_sum.double() / count
    if centered:
        mean = total.double() / count
        moment = moment - torch.outer(mean, mean)
    return moment


def damped(moment: torch.Tensor, damp: float = DAMP) -> torch.Tensor:
    """M + damp * mean(diag M) * I."""
    eps = damp * float(moment.diagonal().mean().clamp_min(1e-12))
    return moment + eps * torch.eye(len(moment), dtype=moment.dtype)


def _damped_inverse(moment: torch.Tensor, damp: float) -> torch.Tensor:
    return torch.cholesky_inverse(torch.linalg.cholesky(damped(moment, damp)))


def obs_curve(weight: torch.Tensor, moment: torch.Tensor, block: int = 1, steps: int | None = None,
              damp: float = DAMP) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop a linear's input blocks one at a time, the cheapest first, refitting the rest after each
    (structured Optimal Brain Surgeon).

    Args:
        weight: [out, n] the linear's weight; its inputs are n / block blocks of `block`
            consecutive columns (an MLP channel: 1; a key/value group: its query heads' columns).
        moment: [n, n] the inputs' second moment (`input_moment`).
        steps: how many blocks to drop (default: all).
        damp: M's diagonal gets damp * its mean before inverting.
    Returns:
        (order [steps] the blocks in the order dropped, curve [steps + 1] float64: curve[r] is the
        mean output error tr(dW M' dW^T) with the first r dropped and the rest refit, M' the damped
        moment (`damped`; M itself with damp=0); curve[0] = 0).
    """
    n = weight.shape[1]
    if n % block:
        raise ValueError(f"{n} inputs are not whole blocks of {block}")
    blocks = n // block
    steps = blocks if steps is None else steps
    W = weight.detach().double().clone()
    inverse = _damped_inverse(moment.double(), damp)
    cols = torch.arange(n).view(blocks, block)
    alive = torch.ones(blocks, dtype=torch.bool)
    order, curve = [], [0.0]
    for _ in range(steps):
        if block == 1:  # one column: the same formulas with scalars, vectorized over the columns
            diag = inverse.diagonal()
            cost = torch.where(alive, W.pow(2).sum(0) / diag.clamp_min(1e-300), torch.inf)
            pick = int(cost.argmin())
            row = inverse[pick] / inverse[pick, pick]
            W.addr_(W[:, pick].clone(), row, alpha=-1)
            inverse.addr_(inverse[:, pick].clone(), row, alpha=-1)
            S, chosen = pick, pick
        else:
            live = alive.nonzero().flatten()
            idx = cols[live]  # [live, block]
            D = inverse[idx[:, :, None], idx[:, None, :]]  # [live, block, block] the diagonal blocks of M^-1
            Wb = W[:, idx].permute(1, 2, 0)  # [live, block, out]
            cost = (Wb * torch.linalg.solve(D, Wb)).sum((1, 2))
            pick = int(cost.argmin())
            S, chosen = idx[pick], int(live[pick])
            step = torch.linalg.solve(D[pick], inverse[S])  # [block, n]
            W -= W[:, S] @ step
            inverse -= inverse[:, S] @ step
        W[:, S], inverse[S], inverse[:, S] = 0, 0, 0
        alive[chosen] = False
        order.append(chosen)
        curve.append(curve[-1] + max(float(cost[pick]), 0.0))
    return torch.tensor(order, dtype=torch.long), torch.tensor(curve, dtype=torch.float64)


def refit(weight: torch.Tensor, moment: torch.Tensor, keep: torch.Tensor, damp: float = DAMP) -> torch.Tensor:
    """[out, len(keep)] float64: the weights on the kept inputs K whose outputs are closest to
    `weight`'s in mean square over inputs of second moment `moment`, W_K + W_R M[R, K] M[K, K]^-1
    (R: the dropped inputs; = W M[:, K] M[K, K]^-1). M[K, K] is damped as in `obs_curve`, in the
    correction term only, so the kept weights are left as they are where the dropped inputs wrote
    nothing or are uncorrelated with the kept ones."""
    keep = keep.long()
    dropped = torch.ones(weight.shape[1], dtype=torch.bool)
    dropped[keep] = False
    M, W = moment.double(), weight.detach().double()
    MKK = damped(M, damp)[keep][:, keep]
    correction = torch.cholesky_solve(M[keep][:, dropped], torch.linalg.cholesky(MKK)).T  # [R, K] M_RK M_KK^-1
    return W[:, keep] + W[:, dropped] @ correction


def bias_shift(weight: torch.Tensor, kept_weight: torch.Tensor, mean: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """[hidden] W E[x] - W'_K E[x_K]: added to the writer's bias, the pruned (and refit) linear's
    mean output equals the original's (FLAP's compensation, with a refit W'_K)."""
    mean = mean.double()
    return weight.detach().double() @ mean - kept_weight.detach().double() @ mean[keep.long()]


def ranges(indices: Iterable[int]) -> str:
    """Sorted indices as a compact string: [0, 1, 2, 5, 7, 8] -> '0-2,5,7-8'."""
    out: list[str] = []
    run: list[int] = []
    for i in list(indices) + [None]:
        if run and (i is None or i != run[-1] + 1):
            out.append(str(run[0]) if len(run) == 1 else f"{run[0]}-{run[-1]}")
            run = []
        if i is not None:
            run.append(int(i))
    return ",".join(out)


def parse_ranges(text: str) -> list[int]:
    """The inverse of `ranges`."""
    out: list[int] = []
    for part in filter(None, text.split(",")):
        lo, _, hi = part.partition("-")
        out.extend(range(int(lo), int(hi or lo) + 1))
    return out
