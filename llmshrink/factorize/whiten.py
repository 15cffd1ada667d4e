"""Truncation-aware whitening (SVD-LLM), tensor in / tensor out.

A linear y = W x with inputs X [tokens, in] and their second moment H = X^T X: any S with
S S^T = H turns the output error into a Frobenius norm, ||(W - W') X^T||_F = ||(W - W') S||_F.
So the best rank-r W' is read off the SVD of W S = P diag(sigma) R^T:

    W_r = P_r diag(sigma_r) R_r^T S^-1,   error(r) = sum_{i >= r} sigma_i^2,

and every rank's output error comes free with the one SVD. S comes from the eigendecomposition
H = Q diag(lam) Q^T, S = Q diag(sqrt(lam + damp * mean(lam))): the damping keeps rank-deficient
inputs (fewer tokens than inputs, dead channels) invertible. Plain SVD is the case H = I.
"""

from __future__ import annotations

import torch

__all__ = ["direction_importance", "error_curve", "factorize_weight", "truncate", "truncation_errors", "whitened_spectrum",
           "whitened_svd", "whitening"]


def whitening(H: torch.Tensor, damp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """S and S^-1 with S S^T = H + damp * mean(eig H) * I (float64).

    Args:
        H: [in, in] second moment of the inputs (any positive scale).
        damp: ridge as a share of the mean eigenvalue; 0 keeps H as it is and inverts only its
            range (directions the inputs never take are dropped by S^-1).
    Returns:
        (S [in, in], S_inv [in, in]).
    """
    H = H.double()
    lam, Q = torch.linalg.eigh((H + H.T) / 2)
    lam = lam.clamp(min=0)
    mean = lam.mean()
    if mean <= 0:  # inputs that are all zero: nothing to weigh by, plain SVD
        eye = torch.eye(H.shape[0], dtype=torch.float64)
        return eye, eye
    lam = lam + damp * mean
    root = lam.sqrt()
    inv = torch.where(lam > lam.max() * H.shape[0] * torch.finfo(torch.float64).eps, 1 / root, torch.zeros_like(root))
    return Q * root[None, :], inv[:, None] * Q.T


def whitened_svd(W: torch.Tensor, whitener: tuple[torch.Tensor, torch.Tensor] | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The SVD of W S, with its right factor mapped back to input space.

    Args:
        W: [out, in] weight.
        whitener: (S, S^-1) from `whitening` (shared by the linears that read the same inputs),
            or None for plain SVD of W.
    Returns:
        (P [out, k], sigma [k] descending, B [k, in] = R^T S^-1), k = min(out, in), float64;
        W = P diag(sigma) B (exactly, where S^-1 inverts S).
    """
    W = W.double()
    if whitener is None:
        P, sigma, Rt = torch.linalg.svd(W, full_matrices=False)
        return P, sigma, Rt
    S, S_inv = whitener
    P, sigma, Rt = torch.linalg.svd(W @ S, full_matrices=False)
    return P, sigma, Rt @ S_inv


def whitened_spectrum(W: torch.Tensor, whitener: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """The singular values of W S alone ([k] descending, float64): every rank's error, without the
    singular vectors (a fraction of the SVD's time)."""
    W = W.double()
    return torch.linalg.svdvals(W if whitener is None else W @ whitener[0])


def _tail_sums(values: torch.Tensor) -> torch.Tensor:
    """[k] -> [k + 1], entry r = sum_{i >= r} values_i (entry k is 0)."""
    tail = values.double().flip(0).cumsum(0).flip(0)
    return torch.cat([tail, tail.new_zeros(1)])


def truncation_errors(sigma: torch.Tensor) -> torch.Tensor:
    """Output error of every rank: [k + 1], entry r = sum_{i >= r} sigma_i^2 (entry k is 0)."""
    return _tail_sums(sigma.double().pow(2))


def direction_importance(sigma: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Each singular direction's share of the output energy, and that energy.

    In the whitened space sigma_i^2 is exactly the calibration output error that dropping
    direction i adds, so the shares are the relative errors the allocator weighs.

    Returns:
        (importance [k] float64 = sigma_i^2 / sum sigma^2 (sigma_i^2 where the sum is 0), sum sigma^2).
    """
    sq = sigma.double().pow(2)
    energy = float(sq.sum())
    return (sq / energy if energy > 0 else sq), energy


def error_curve(importance: torch.Tensor, energy: float, relative: bool = True) -> torch.Tensor:
    """Output error of every rank from `direction_importance`: [k + 1], entry r the summed
    importance of the directions r.. dropped (relative to the output's energy, or times it)."""
    tail = _tail_sums(importance)
    return tail if relative else tail * energy


def truncate(P: torch.Tensor, sigma: torch.Tensor, B: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The rank-`rank` factors, sqrt(sigma) on each side (balanced, so both quantize alike).

    Returns:
        (U [out, rank], V [rank, in]) float64 with U @ V = P_r diag(sigma_r) B_r.
    """
    root = sigma[:rank].sqrt()
    return P[:, :rank] * root[None, :], root[:, None] * B[:rank]


def factorize_weight(W: torch.Tensor, H: torch.Tensor | None, rank: int, damp: float = 0.01
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(U [out, rank], V [rank, in]) minimizing ||(W - U V) X^T|| for inputs with second moment H."""
    return truncate(*whitened_svd(W, None if H is None else whitening(H, damp)), rank)
