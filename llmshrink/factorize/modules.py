"""The factorized linear: two ordinary nn.Linear in sequence (V: in -> rank, U: rank -> out), so
every tool that handles linears (GPTQ, LoRA) sees the two factors as linears of their own."""

from __future__ import annotations

import torch
from torch import nn

from ..swap import set_module, swap_linear

__all__ = ["FactorizedLinear", "factorized_modules", "install_factorized", "merge_factorized", "padded_rank",
           "set_module"]


def padded_rank(rank: int, multiple: int) -> int:
    """The smallest multiple of `multiple` that holds `rank`."""
    return -(-rank // multiple) * multiple


class FactorizedLinear(nn.Module):
    """y = U(V(x)): V [rank, in] without bias, then U [out, rank] with the original linear's bias."""

    SEQUENCE = ("V", "U")  # its linears in the order they apply (how arch.layer_linears lists them)

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = False,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.V = nn.Linear(in_features, rank, bias=False, dtype=dtype, device=device)
        self.U = nn.Linear(rank, out_features, bias=bias, dtype=dtype, device=device)

    @classmethod
    def from_factors(cls, U: torch.Tensor, V: torch.Tensor, bias: torch.Tensor | None = None,
                     dtype: torch.dtype = torch.float32) -> "FactorizedLinear":
        """From U [out, rank] and V [rank, in] (cast to `dtype`), and the bias [out] if any."""
        module = cls(V.shape[1], U.shape[0], U.shape[1], bias=bias is not None, dtype=dtype, device=U.device)
        with torch.no_grad():
            module.U.weight.copy_(U)
            module.V.weight.copy_(V)
            if bias is not None:
                module.U.bias.copy_(bias)
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.U(self.V(x))

    def merged(self) -> nn.Linear:
        """The dense nn.Linear with weight U @ V (computed in float64, stored in the factors' dtype)."""
        dtype = self.U.weight.dtype
        dense = nn.Linear(self.in_features, self.out_features, bias=self.U.bias is not None, dtype=dtype,
                          device=self.U.weight.device)
        with torch.no_grad():
            dense.weight.copy_((self.U.weight.double() @ self.V.weight.double()).to(dtype))
            if self.U.bias is not None:
                dense.bias.copy_(self.U.bias)
        return dense

    def pad_rank(self, multiple: int) -> int:
        """Grow the rank to a multiple of `multiple` with zero rows of V and zero columns of U (the
        product, hence the output, is unchanged; GPTQ packs 32-bit words of codes along both the
        rank and the other width). Returns the new rank."""
        rank = padded_rank(self.rank, multiple)
        if rank == self.rank:
            return rank
        with torch.no_grad():
            v, u = self.V.weight, self.U.weight
            grown_v = torch.zeros(rank, self.in_features, dtype=v.dtype, device=v.device)
            grown_u = torch.zeros(self.out_features, rank, dtype=u.dtype, device=u.device)
            grown_v[: self.rank], grown_u[:, : self.rank] = v, u
        self.V.weight, self.U.weight = nn.Parameter(grown_v, False), nn.Parameter(grown_u, False)
        self.V.out_features = self.U.in_features = self.rank = rank
        return rank

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


def factorized_modules(model: nn.Module) -> dict[str, FactorizedLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, FactorizedLinear)}


def install_factorized(model: nn.Module, ranks: dict[str, int], dtype: torch.dtype) -> None:
    """Replace each nn.Linear named in `ranks` by an empty FactorizedLinear of that rank (on the
    linear's device, meta included), for weights to be loaded into."""
    for name, rank in ranks.items():
        swap_linear(model, name, lambda linear: FactorizedLinear(
            linear.in_features, linear.out_features, rank, bias=linear.bias is not None, dtype=dtype,
            device=linear.weight.device), stored="factorizes")


def merge_factorized(model: nn.Module) -> list[str]:
    """Replace every FactorizedLinear by its dense nn.Linear (U @ V); returns their names."""
    names = list(factorized_modules(model))
    for name in names:
        set_module(model, name, model.get_submodule(name).merged())
    return names
