"""Matrix kernels on stored formats (Q8_0, Q4_0, Q4_1, F16, BF16), built on the ISA primitives of isa.py.

Layout: GGUF's own, split at load into quants (N, nb·32 int8 for Q8_0; N, nb·16 nibble bytes for Q4_*) and
f16 scales d (N, nb) (and m for Q4_1). Every kernel takes the path tag (isa.tag(): an empty array whose dtype
names the path) as its first argument.

Decode (T ≤ 16 positions), as llama.cpp: activations rounded to int8 per block of 32 (x ≈ xd_b · xq),
    y[t, j] = Σ_b d[j,b] · xd[t,b] · Σ_i q[j,b,i] · xq[t,b,i]   +   Σ_b h[j,b] · xk[t,b]
with h = m, xk = Σx_b for Q4_1; h = d, xk = −8·Σx_b for Q4_0; no second term for Q8_0. The inner sums are
integer (vpdpbusd / vpmaddubsw), scaled in float lanes: one float accumulator vector per position.
Several positions for the price of one: the rows of T positions are taken 4 (then 2, then 1) at a time
and each weight vector, once loaded and unpacked, is applied to all of them while it is in registers;
a weight row (≤ a few KB) is read from memory once and from L1 for the other chunks.
Rows are split into one contiguous range per thread (16-row tasks handed out in turn ran 5-8x slower in
some processes; a static split removed that, measured in the earlier qkernels.py, now removed).
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from .isa import (bfloat, blocks_per_step, dot, dscale, fdot, fload, fma_acc, fmadd, fsum, fvload, fzero, fzero16,
                  half, hload, wload, xload)

JIT = dict(cache=True, fastmath=True)


@njit(**JIT)
def quantize_x(x, xq, xde, xs):
    """Activations x (T, K) → int8 xq (T, K), block scales xd repeated over 8 lanes xde (T, nb·8), and the
    float block sums xs (T, nb)."""
    T, K = x.shape
    nb = K // 32
    for t in range(T):
        for b in range(nb):
            amax = np.float32(0.0)
            tot = np.float32(0.0)
            for i in range(32):
                v = x[t, b * 32 + i]
                amax = max(amax, abs(v))
                tot += v
            dd = amax / np.float32(127.0)
            inv = np.float32(1.0) / dd if dd > 0 else np.float32(0.0)
            for i in range(8):
                xde[t, b * 8 + i] = dd
            xs[t, b] = tot
            for i in range(32):
                xq[t, b * 32 + i] = np.int8(np.round(x[t, b * 32 + i] * inv))


@njit(**JIT)
def _q1(isa, qr, dr, x0, e0, nb):
    G = blocks_per_step(isa)
    a0 = fzero(isa)
    for b in range(0, nb, G):
        w = wload(isa, qr, b)
        s = dscale(isa, dr, b)
        a0 = fma_acc(a0, dot(isa, w, xload(isa, x0, b * 32)), fload(isa, e0, b * 8), s)
    return fsum(a0)


@njit(**JIT)
def _q2(isa, qr, dr, xq, xde, t, nb):
    G = blocks_per_step(isa)
    a0 = fzero(isa)
    a1 = fzero(isa)
    x0, x1, e0, e1 = xq[t], xq[t + 1], xde[t], xde[t + 1]
    for b in range(0, nb, G):
        w = wload(isa, qr, b)
        s = dscale(isa, dr, b)
        o, oe = b * 32, b * 8
        a0 = fma_acc(a0, dot(isa, w, xload(isa, x0, o)), fload(isa, e0, oe), s)
        a1 = fma_acc(a1, dot(isa, w, xload(isa, x1, o)), fload(isa, e1, oe), s)
    return fsum(a0), fsum(a1)


@njit(**JIT)
def _q4(isa, qr, dr, xq, xde, t, nb):
    G = blocks_per_step(isa)
    a0 = fzero(isa)
    a1 = fzero(isa)
    a2 = fzero(isa)
    a3 = fzero(isa)
    x0, x1, x2, x3 = xq[t], xq[t + 1], xq[t + 2], xq[t + 3]
    e0, e1, e2, e3 = xde[t], xde[t + 1], xde[t + 2], xde[t + 3]
    for b in range(0, nb, G):
        w = wload(isa, qr, b)
        s = dscale(isa, dr, b)
        o, oe = b * 32, b * 8
        a0 = fma_acc(a0, dot(isa, w, xload(isa, x0, o)), fload(isa, e0, oe), s)
        a1 = fma_acc(a1, dot(isa, w, xload(isa, x1, o)), fload(isa, e1, oe), s)
        a2 = fma_acc(a2, dot(isa, w, xload(isa, x2, o)), fload(isa, e2, oe), s)
        a3 = fma_acc(a3, dot(isa, w, xload(isa, x3, o)), fload(isa, e3, oe), s)
    return fsum(a0), fsum(a1), fsum(a2), fsum(a3)


@njit(parallel=True, **JIT)
def matmul_q(isa, xq, xde, xk, q, d, h, out, n_parts):
    """out[t, j] for the block formats (see the module docstring); h has no columns for Q8_0."""
    T = xq.shape[0]
    N, nb = d.shape
    step = (N + n_parts - 1) // n_parts
    for part in prange(n_parts):  # one contiguous range of rows per thread
        for j in range(part * step, min(N, (part + 1) * step)):
            qr, dr = q[j], d[j]
            t = 0
            while t + 4 <= T:
                out[t, j], out[t + 1, j], out[t + 2, j], out[t + 3, j] = _q4(isa, qr, dr, xq, xde, t, nb)
                t += 4
            if t + 2 <= T:
                out[t, j], out[t + 1, j] = _q2(isa, qr, dr, xq, xde, t, nb)
                t += 2
            if t < T:
                out[t, j] = _q1(isa, qr, dr, xq[t], xde[t], nb)
            if h.shape[1]:
                hr = h[j]
                for t in range(T):
                    c = np.float32(0.0)
                    for b in range(nb):
                        c += half(hr[b]) * xk[t, b]
                    out[t, j] += c


@njit(parallel=True, **JIT)
def matmul_q_exact(isa, x, xk, q, d, h, out, n_parts):
    """As matmul_q with float32 activations x (T, K): float products, no activation rounding."""
    T = x.shape[0]
    N, nb = d.shape
    G = blocks_per_step(isa)
    step = (N + n_parts - 1) // n_parts
    for part in prange(n_parts):
        for j in range(part * step, min(N, (part + 1) * step)):
            qr, dr = q[j], d[j]
            for t in range(T):
                xr = x[t]
                a = fzero(isa)
                for b in range(0, nb, G):
                    a = fmadd(a, fdot(isa, wload(isa, qr, b), xr, b * 32), dscale(isa, dr, b))
                c = fsum(a)
                if h.shape[1]:
                    for b in range(nb):
                        c += half(h[j, b]) * xk[t, b]
                out[t, j] = c


@njit(**JIT)
def _h1(isa, qr, x0, K, bf16):
    V = 16 * blocks_per_step(isa)
    Kv = K - K % V
    a0 = fzero16(isa)
    if bf16:
        for k in range(0, Kv, V):
            a0 = fmadd(a0, hload(isa, qr, k, True), fvload(isa, x0, k))
    else:
        for k in range(0, Kv, V):
            a0 = fmadd(a0, hload(isa, qr, k, False), fvload(isa, x0, k))
    return fsum(a0)


@njit(**JIT)
def _h4(isa, qr, x0, x1, x2, x3, K, bf16):
    V = 16 * blocks_per_step(isa)
    Kv = K - K % V
    a0 = fzero16(isa)
    a1 = fzero16(isa)
    a2 = fzero16(isa)
    a3 = fzero16(isa)
    if bf16:
        for k in range(0, Kv, V):
            w = hload(isa, qr, k, True)
            a0 = fmadd(a0, w, fvload(isa, x0, k))
            a1 = fmadd(a1, w, fvload(isa, x1, k))
            a2 = fmadd(a2, w, fvload(isa, x2, k))
            a3 = fmadd(a3, w, fvload(isa, x3, k))
    else:
        for k in range(0, Kv, V):
            w = hload(isa, qr, k, False)
            a0 = fmadd(a0, w, fvload(isa, x0, k))
            a1 = fmadd(a1, w, fvload(isa, x1, k))
            a2 = fmadd(a2, w, fvload(isa, x2, k))
            a3 = fmadd(a3, w, fvload(isa, x3, k))
    return fsum(a0), fsum(a1), fsum(a2), fsum(a3)


@njit(**JIT)
def _widen(v, bf16):
    return bfloat(v) if bf16 else half(v)


@njit(parallel=True, **JIT)
def matmul_half(isa, x, q, bf16, out, n_parts):
    """F16 (widened by fpext: vcvtph2ps) or BF16 (a 16-bit shift) rows, float32 products; each widened
    weight vector is applied to 4 positions at a time."""
    T, K = x.shape
    N = q.shape[0]
    V = 16 * blocks_per_step(isa)
    Kv = K - K % V
    step = (N + n_parts - 1) // n_parts
    for part in prange(n_parts):
        for j in range(part * step, min(N, (part + 1) * step)):
            qr = q[j]
            t = 0
            while t + 4 <= T:
                out[t, j], out[t + 1, j], out[t + 2, j], out[t + 3, j] = _h4(isa, qr, x[t], x[t + 1], x[t + 2],
                                                                           x[t + 3], K, bf16)
                t += 4
            while t < T:
                out[t, j] = _h1(isa, qr, x[t], K, bf16)
                t += 1
            if Kv < K:
                for t in range(T):
                    c = np.float32(0.0)
                    for k in range(Kv, K):
                        c += x[t, k] * _widen(qr[k], bf16)
                    out[t, j] += c


# ---- dequantization (for batched GEMMs, the embedding rows, exports): rows a..b−1 into w ------------------
@njit(nogil=True, **JIT)
def dequantize_q8_0(q, d, a, b, w):
    nb = d.shape[1]
    for j in range(a, b):
        for c in range(nb):
            s = half(d[j, c])
            for i in range(32):
                w[j - a, c * 32 + i] = np.float32(q[j, c * 32 + i]) * s


@njit(nogil=True, **JIT)
def dequantize_q4(q, d, m, a, b, w):
    nb = d.shape[1]
    for j in range(a, b):
        for c in range(nb):
            s = half(d[j, c])
            off = half(m[j, c]) if m.shape[1] else np.float32(-8.0) * s
            for i in range(16):
                v = q[j, c * 16 + i]
                w[j - a, c * 32 + i] = np.float32(v & np.uint8(15)) * s + off
                w[j - a, c * 32 + 16 + i] = np.float32(v >> np.uint8(4)) * s + off


@njit(nogil=True, **JIT)
def dequantize_half(q, bf16, a, b, w):
    K = q.shape[1]
    for j in range(a, b):
        for k in range(K):
            w[j - a, k] = _widen(q[j, k], bf16)
