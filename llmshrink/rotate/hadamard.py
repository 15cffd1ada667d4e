"""Orthogonal matrices for incoherence processing: Hadamard matrices where an order is known, a
seeded random orthogonal matrix otherwise, both randomized by a seeded sign flip.

A Hadamard matrix H of order n has entries +-1 and H H^T = n I, so H / sqrt(n) is orthogonal and
spreads every coordinate evenly over all others (what QuaRot and QuIP# use to flatten outliers).
Orders built here:
- Sylvester: 1, 2, 4, 8, ... (H_2k = [[H, H], [H, -H]]);
- Paley I: q + 1 for a prime q = 3 (mod 4) (12, 20, 24, 32, 44, 48, ...);
- Paley II: 2 (q + 1) for a prime q = 1 (mod 4) (12, 28, 36, 60, ...);
- Kronecker products of those: 576 = 4 x 12 x 12, 960 = 4 x 12 x 20, 1536 = 128 x 12, ...
"""

from __future__ import annotations

import functools
import math

import torch

__all__ = ["hadamard", "hadamard_order_factors", "orthogonal", "random_orthogonal"]


def _is_prime(n: int) -> bool:
    return n >= 2 and all(n % d for d in range(2, math.isqrt(n) + 1))


def _jacobsthal(q: int) -> torch.Tensor:
    """Q[i, j] = chi(j - i), chi the quadratic character mod q (0 at 0)."""
    squares = {(x * x) % q for x in range(1, q)}
    chi = torch.tensor([0] + [1 if a in squares else -1 for a in range(1, q)], dtype=torch.float64)
    idx = (torch.arange(q)[None, :] - torch.arange(q)[:, None]) % q
    return chi[idx]


def _paley1(q: int) -> torch.Tensor:
    """Order q + 1, q prime, q = 3 (mod 4)."""
    Q = _jacobsthal(q)
    n = q + 1
    S = torch.zeros(n, n, dtype=torch.float64)
    S[0, 1:] = 1
    S[1:, 0] = -1
    S[1:, 1:] = Q
    return S + torch.eye(n, dtype=torch.float64)


def _paley2(q: int) -> torch.Tensor:
    """Order 2 (q + 1), q prime, q = 1 (mod 4)."""
    Q = _jacobsthal(q)
    n = q + 1
    C = torch.zeros(n, n, dtype=torch.float64)
    C[0, 1:] = 1
    C[1:, 0] = 1
    C[1:, 1:] = Q
    plus = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
    minus = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    return torch.kron(C, plus) + torch.kron(torch.eye(n, dtype=torch.float64), minus)


def _sylvester(n: int) -> torch.Tensor:
    H = torch.ones(1, 1, dtype=torch.float64)
    while H.shape[0] < n:
        H = torch.cat([torch.cat([H, H], 1), torch.cat([H, -H], 1)], 0)
    return H


@functools.lru_cache(maxsize=None)
def _base_order(n: int) -> str | None:
    """How a 'base' order (not built as a product) is made: 'sylvester', 'paley1', 'paley2' or None."""
    if n & (n - 1) == 0:
        return "sylvester"
    if _is_prime(n - 1) and (n - 1) % 4 == 3:
        return "paley1"
    if n % 2 == 0 and _is_prime(n // 2 - 1) and (n // 2 - 1) % 4 == 1:
        return "paley2"
    return None


@functools.lru_cache(maxsize=None)
def hadamard_order_factors(n: int) -> tuple[int, ...] | None:
    """Orders whose Kronecker product is a Hadamard matrix of order n (fewest factors), or None."""
    if n < 1:
        return None
    if _base_order(n):
        return (n,)
    best = None
    for d in range(2, math.isqrt(n) + 1):
        if n % d == 0:
            for a, b in ((d, n // d), (n // d, d)):
                fa, fb = hadamard_order_factors(a), hadamard_order_factors(b)
                if fa and fb and (best is None or len(fa) + len(fb) < len(best)):
                    best = fa + fb
    return best


def hadamard(n: int) -> torch.Tensor:
    """A Hadamard matrix of order n (entries +-1, float64). Raises ValueError for orders not built here."""
    factors = hadamard_order_factors(n)
    if factors is None:
        raise ValueError(f"no Hadamard construction here for order {n}")
    H = torch.ones(1, 1, dtype=torch.float64)
    for f in factors:
        kind = _base_order(f)
        block = _sylvester(f) if kind == "sylvester" else _paley1(f - 1) if kind == "paley1" else _paley2(f // 2 - 1)
        H = torch.kron(H, block)
    return H


def random_orthogonal(n: int, generator: torch.Generator) -> torch.Tensor:
    """A Haar-random orthogonal matrix (QR of a Gaussian, signs fixed), float64."""
    Q, R = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
    return Q * torch.sign(torch.diagonal(R))[None, :]


def orthogonal(n: int, seed: int = 0, kind: str = "hadamard") -> torch.Tensor:
    """An n x n orthogonal matrix, float64: `hadamard` (a randomized Hadamard, diag(s) H / sqrt(n)
    with seeded signs s, where an order is known; else a random orthogonal one) or `random`."""
    generator = torch.Generator().manual_seed(seed)
    if kind == "hadamard" and hadamard_order_factors(n) is not None:
        signs = torch.randint(0, 2, (n,), generator=generator, dtype=torch.float64) * 2 - 1
        return signs[:, None] * hadamard(n) / math.sqrt(n)
    if kind not in ("hadamard", "random"):
        raise ValueError(f"kind={kind!r}; use 'hadamard' or 'random'")
    return random_orthogonal(n, generator)
