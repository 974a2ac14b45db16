"""Linear layers: the seam where weight formats and acceleration modes plug in.

A Linear maps x (T, in_features) → out (T, out_features) into a preallocated output. The model only
calls forward(); which kernel runs, and which bytes are read, is the Linear's business.
"""
from __future__ import annotations

import numpy as np

from . import kernels
from .threads import gemm_nt
from .readers.base import Tensor

BLAS_MIN_ROWS = 4  # from this many positions on, a BLAS GEMM beats the row-parallel Numba kernel


class Linear:
    in_features: int
    out_features: int
    bias: np.ndarray | None = None

    def forward(self, x: np.ndarray, out: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    @property
    def nbytes(self) -> int:
        """Bytes of weights read per forward call (the memory traffic of one decode step)."""
        raise NotImplementedError


class Dense(Linear):
    """A float32 matrix (out, in): Numba matvec for decode, BLAS GEMM for batches of positions."""

    def __init__(self, w: np.ndarray, bias: np.ndarray | None = None):
        self.w = np.ascontiguousarray(w, dtype=np.float32)
        self.out_features, self.in_features = self.w.shape
        self.bias = None if bias is None else np.ascontiguousarray(bias, dtype=np.float32)

    @classmethod
    def from_tensors(cls, ws: list[Tensor], bs: list[Tensor | None] | None = None) -> "Dense":
        """One Dense from matrices stacked along their outputs (fused Q/K/V, or gate/up)."""
        w = np.concatenate([t.float32() for t in ws]) if len(ws) > 1 else ws[0].float32()
        b = None
        if bs and any(x is not None for x in bs):
            b = np.concatenate([x.float32() if x is not None else np.zeros(t.shape[0], np.float32)
                                for x, t in zip(bs, ws)])
        return cls(w, b)

    def forward(self, x, out):
        if x.shape[0] >= BLAS_MIN_ROWS:
            gemm_nt(x, self.w, out)
        else:
            kernels.matmul_f32(x, self.w, out)
        if self.bias is not None:
            out += self.bias
        return out

    @property
    def nbytes(self) -> int:
        return self.w.nbytes + (0 if self.bias is None else self.bias.nbytes)
