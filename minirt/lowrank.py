"""Low-rank mode: weight matrices replaced by truncated-SVD factors, y = (x · Vᵀ) · Uᵀ.

W (n × m) = U Σ Vᵀ; keeping the r largest singular values gives U_r Σ_r (n × r) and V_r (r × m), read
r·(n + m) values per token instead of n·m. The rank comes from an energy threshold E (the smallest r with
Σ_{i<r} σ_i² ≥ E · Σ σ²) or is given; a matrix whose factors would not be smaller stays as it is.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import MinirtError
from .linear import Dense, Linear, Quant


def rank_for_energy(s: np.ndarray, energy: float) -> int:
    """Smallest r whose leading singular values keep at least `energy` of Σσ²."""
    e = np.cumsum(s.astype(np.float64) ** 2)
    return int(np.searchsorted(e, energy * e[-1] * (1 - 1e-12)) + 1)


def factor(w: np.ndarray, energy: float | None = None, rank: int | None = None):
    """(U_r Σ_r, V_r, energy kept) of a float matrix, by energy threshold or by rank."""
    if (energy is None) == (rank is None):
        raise MinirtError("give exactly one of energy and rank")
    n, m = w.shape
    if energy is not None and not 0 < energy <= 1:
        raise MinirtError(f"energy must be in (0, 1], got {energy}")
    if rank is not None and not 1 <= rank <= min(n, m):
        raise MinirtError(f"rank must be between 1 and min(n, m) = {min(n, m)}, got {rank}")
    u, s, vt = np.linalg.svd(np.asarray(w, dtype=np.float32), full_matrices=False)
    r = rank if rank is not None else rank_for_energy(s, energy)
    kept = float((s[:r].astype(np.float64) ** 2).sum() / (s.astype(np.float64) ** 2).sum())
    return np.ascontiguousarray(u[:, :r] * s[:r]), np.ascontiguousarray(vt[:r]), kept


class LowRank(Linear):
    """y = (x · Vᵀ) · Uᵀ (+ bias): two thin matmuls, W never materialised."""

    def __init__(self, u: np.ndarray, v: np.ndarray, bias: np.ndarray | None = None, energy: float = 1.0):
        self.u, self.v = Dense(u), Dense(v)
        self.out_features, self.rank = u.shape
        self.in_features = v.shape[1]
        self.bias = bias
        self.energy = energy
        self._mid: dict[int, np.ndarray] = {}

    def forward(self, x, out):
        T = x.shape[0]
        mid = self._mid.get(T)
        if mid is None:
            mid = self._mid[T] = np.empty((T, self.rank), np.float32)
        self.u.forward(self.v.forward(x, mid), out)
        if self.bias is not None:
            out += self.bias
        return out

    @property
    def nbytes(self) -> int:
        return self.u.nbytes + self.v.nbytes + (0 if self.bias is None else self.bias.nbytes)


def dense_matrix(lin: Linear) -> np.ndarray:
    if isinstance(lin, Dense):
        return lin.w
    if isinstance(lin, Quant):
        return lin.dequantized()
    raise MinirtError(f"cannot factor a {type(lin).__name__}")


@dataclass
class Factored:
    name: str
    shape: tuple[int, int]
    rank: int           # 0: kept as it was (factoring would not save anything)
    energy: float


def lowrank_linear(lin: Linear, name: str, energy=None, rank=None, force: bool = False):
    w = dense_matrix(lin)
    n, m = w.shape
    u, v, kept = factor(w, energy, None if rank is None else min(rank, n, m))
    r = u.shape[1]
    if r * (n + m) >= n * m and not force:  # break-even: the factors would be no smaller
        return lin, Factored(name, (n, m), 0, 1.0)
    return LowRank(u, v, lin.bias, kept), Factored(name, (n, m), r, kept)


def with_lowrank(model, energy: float | None = None, rank: int | None = None, force: bool = False,
                 progress: bool = False):
    """A copy of the model whose attention and MLP matrices are replaced by low-rank factors (the tied
    embedding/head is left as it is). Returns the model; model.lowrank lists what was done per matrix."""
    import copy
    import sys
    if energy is None and rank is None:
        raise MinirtError("low-rank mode needs --energy E or --rank R")
    out = copy.copy(model)
    out.layers, report = [], []
    for i, L in enumerate(model.layers):
        L2 = copy.copy(L)
        for attr in ("qkv", "wo", "up", "down"):
            new, f = lowrank_linear(getattr(L, attr), f"layers.{i}.{attr}", energy, rank, force)
            setattr(L2, attr, new)
            report.append(f)
        out.layers.append(L2)
        if progress:
            sys.stderr.write(f"\rfactoring layer {i + 1}/{len(model.layers)}")
            sys.stderr.flush()
    if progress:
        sys.stderr.write("\n")
    out._scratch = {}
    out.lowrank = report
    return out
