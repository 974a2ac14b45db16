"""The prompt GEMM for float matrices (F32, F16, BF16): out (T, N) = x (T, K) · Wᵀ, W (N, K) row-major as stored.

Dot-product form, register-blocked as llama.cpp's tinyBLAS: a block of 4 rows × 4 positions keeps 16 vector
accumulators (16 lanes each: one zmm with AVX-512), so each k-step loads 4 weight and 4 activation vectors for
16 FMAs; the 16 sums are reduced once per block. F16/BF16 rows are widened once per block of 4 rows into a small
float32 buffer (L1) that serves every position; F32 rows are read in place (they stay in L1 over the positions).
Rows are split into one contiguous range per thread, inside Numba's parallel region: no BLAS threads and no
Python thread pool beside Numba's (SmolLM2's layer shapes at 128 positions: 2.0× from 1 to 2 threads, where
single-threaded OpenBLAS calls from a Python pool scaled 1.78×).
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from .isa import SELECTED, fmadd, fstore4, fsum, lane, sum16x16, v16, v16zero
from .qmatmul import _widen

JIT = dict(cache=True, fastmath=True)
# Where the prompt GEMM replaces BLAS: with AVX-512 (32 vector registers hold the 16 accumulators and the 8 loads
# of a k-step; measured 1.15-1.3× OpenBLAS's sgemm at 128 positions on Zen 4). With 16 registers (AVX2) the
# accumulators would spill: BLAS stays there, and where MINIRT_ISA forces a lower path (as on an AVX2 machine).
USE = SELECTED == "avx512vnni"
RB = 4  # rows per block
TB = 4  # positions per block


@njit(inline="always", **JIT)  # inlined: a call per block costs its arguments' atomic refcounts
def _block(w, r, x, t, K, out, j):
    """out[t..t+3, j..j+3] = x[t..t+3] · w[r..r+3]ᵀ (w float32, 2-D)."""
    K16 = K - K % 16
    c00 = v16zero(); c01 = v16zero(); c02 = v16zero(); c03 = v16zero()  # noqa: E702 (c<row><position>)
    c10 = v16zero(); c11 = v16zero(); c12 = v16zero(); c13 = v16zero()  # noqa: E702
    c20 = v16zero(); c21 = v16zero(); c22 = v16zero(); c23 = v16zero()  # noqa: E702
    c30 = v16zero(); c31 = v16zero(); c32 = v16zero(); c33 = v16zero()  # noqa: E702
    for k in range(0, K16, 16):
        x0 = v16(x, t, k)
        x1 = v16(x, t + 1, k)
        x2 = v16(x, t + 2, k)
        x3 = v16(x, t + 3, k)
        w0 = v16(w, r, k)
        c00 = fmadd(c00, w0, x0); c01 = fmadd(c01, w0, x1); c02 = fmadd(c02, w0, x2); c03 = fmadd(c03, w0, x3)  # noqa: E702
        w1 = v16(w, r + 1, k)
        c10 = fmadd(c10, w1, x0); c11 = fmadd(c11, w1, x1); c12 = fmadd(c12, w1, x2); c13 = fmadd(c13, w1, x3)  # noqa: E702
        w2 = v16(w, r + 2, k)
        c20 = fmadd(c20, w2, x0); c21 = fmadd(c21, w2, x1); c22 = fmadd(c22, w2, x2); c23 = fmadd(c23, w2, x3)  # noqa: E702
        w3 = v16(w, r + 3, k)
        c30 = fmadd(c30, w3, x0); c31 = fmadd(c31, w3, x1); c32 = fmadd(c32, w3, x2); c33 = fmadd(c33, w3, x3)  # noqa: E702
    # lane 4p + a = the sum of row a at position p: position p's 4 rows are lanes 4p..4p+3
    s = sum16x16(c00, c10, c20, c30, c01, c11, c21, c31, c02, c12, c22, c32, c03, c13, c23, c33)
    if out.strides[1] == 4:
        fstore4(out, t, j, s, 0)
        fstore4(out, t + 1, j, s, 1)
        fstore4(out, t + 2, j, s, 2)
        fstore4(out, t + 3, j, s, 3)
    else:
        for p in range(4):
            for a in range(4):
                out[t + p, j + a] = lane(s, 4 * p + a)
    if K16 < K:
        for a in range(4):
            for p in range(4):
                c = np.float32(0.0)
                for k in range(K16, K):
                    c += w[r + a, k] * x[t + p, k]
                out[t + p, j + a] += c


@njit(inline="always", **JIT)
def _one(w, r, x, t, K, out, j):
    """out[t, j] = x[t] · w[r] (the rows and positions outside whole blocks)."""
    K16 = K - K % 16
    c = v16zero()
    for k in range(0, K16, 16):
        c = fmadd(c, v16(w, r, k), v16(x, t, k))
    s = fsum(c)
    for k in range(K16, K):
        s += w[r, k] * x[t, k]
    out[t, j] = s


@njit(inline="always", **JIT)
def _rows(w, r, nr, x, out, j):
    """out[:, j..j+nr−1] from rows r..r+nr−1 of the float32 w (nr ≤ RB)."""
    T, K = x.shape
    Tb = T - T % TB
    if nr == RB:
        for t in range(0, Tb, TB):
            _block(w, r, x, t, K, out, j)
    else:
        for t in range(0, Tb):
            for a in range(nr):
                _one(w, r + a, x, t, K, out, j + a)
    for t in range(Tb, T):
        for a in range(nr):
            _one(w, r + a, x, t, K, out, j + a)


@njit(parallel=True, **JIT)
def gemm(x, w, out, n_parts):
    """out = x · wᵀ for a float32 w (N, K): rows in blocks of RB, one contiguous range of blocks per thread."""
    N = w.shape[0]
    nblk = (N + RB - 1) // RB
    step = (nblk + n_parts - 1) // n_parts
    for part in prange(n_parts):
        for b in range(part * step, min(nblk, (part + 1) * step)):
            j = b * RB
            _rows(w, j, min(RB, N - j), x, out, j)


@njit(parallel=True, **JIT)
def gemm_half(x, q, bf16, out, n_parts):
    """out = x · Wᵀ for F16 (bf16 False) or BF16 bits q (N, K), each block of RB rows widened once into a
    float32 buffer."""
    N, K = q.shape
    nblk = (N + RB - 1) // RB
    step = (nblk + n_parts - 1) // n_parts
    for part in prange(n_parts):
        buf = np.empty((RB, K), np.float32)
        for b in range(part * step, min(nblk, (part + 1) * step)):
            j = b * RB
            nr = min(RB, N - j)
            for a in range(nr):
                for k in range(K):
                    buf[a, k] = _widen(q[j + a, k], bf16)
            _rows(buf, 0, nr, x, out, j)
