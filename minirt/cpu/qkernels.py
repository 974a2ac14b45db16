"""CPU kernels (Numba) that compute on quantized weights as stored, without a float32 copy.

Layout. At load, each GGUF block row is split into its scales (f16 bits, (N, nb)) and its quants, and the
quants of a row are stored "block-transposed": byte i of block b sits at i·nb + b. Activations are
permuted the same way, so that a row's work is long, contiguous loops that LLVM vectorizes well.

Decode (a few positions): as llama.cpp does, activations are quantized to int8 per block of 32
(x ≈ xd_b · xq, xd_b = max|x_b| / 127) and the products are integers, 32 lanes of int16 per AVX-512 op:
    p[k] = xq[k] · q[k]                      (nibbles: xq_lo[k]·(v & 15) + xq_hi[k]·(v >> 4))
    s_b  = Σ_i p[i·nb + b]                   per-block int32 sums
    y    = Σ_b d_b · xd_b · s_b  (+ m_b · Σx_b for Q4_1, − 8 · d_b · Σx_b for Q4_0)
Measured on Zen 4 (one thread, 3072×576 Q4_1): float products 5.3 G weights/s, int16 products 8.3;
a 32-wide inner loop per block (the natural layout) unrolls into scalar code and runs 3–4× slower still.
Each format has its own kernel so that LLVM sees straight-line code. Rows are split into one contiguous
range per thread: with 16-row tasks handed out in turn, the kernel ran 5-8x slower in some processes
(measured; one process in three), which a static split removed. Batches of positions instead
dequantize tiles of rows to float32, in the same permuted order, and multiply them with BLAS.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

JIT = dict(cache=True, fastmath=True)
F16 = np.arange(65536, dtype=np.uint16).view(np.float16).astype(np.float32)  # f16 bits → float32
M15 = np.uint8(15)
S4 = np.uint8(4)


@njit(inline="always", **JIT)
def _fold(p, n):
    """Halve a (reps·nb)-long array of per-block partial sums in place: long contiguous adds."""
    for k in range(n):
        p[k] += p[k + n]


@njit(**JIT)
def quantize_x(x, xq, xd, xs):
    """Activations x (T, K) → int8 xq (T, K) in block-transposed order, block scales xd and sums xs (T, nb)."""
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
            xd[t, b] = dd
            xs[t, b] = tot
            for i in range(32):
                xq[t, i * nb + b] = np.int8(np.round(x[t, b * 32 + i] * inv))


@njit(parallel=True, **JIT)
def matmul_q8_0(xq, xd, q, d, out, n_parts):
    """out[t, j] = Σ_b d[j,b] · xd[t,b] · Σ_i q[j, i·nb+b] · xq[t, i·nb+b]   (int8 × int8)"""
    T, K = xq.shape
    N, nb = d.shape
    step = (N + n_parts - 1) // n_parts
    for part in prange(n_parts):  # one contiguous range of rows per thread
        H = K // 2
        p = np.empty(H, np.int32)
        for j in range(part * step, min(N, (part + 1) * step)):
            qr = q[j]
            qh = qr[H:]
            for t in range(T):
                xr = xq[t]
                xh = xr[H:]
                for k in range(H):  # int16 products, pairs (i, i+16) summed: |p| ≤ 2·127² fits int16
                    p[k] = np.int16(np.int16(xr[k]) * np.int16(qr[k]) + np.int16(xh[k]) * np.int16(qh[k]))
                n = H
                while n > nb:  # 16 → 1 partial sums per block
                    n //= 2
                    _fold(p, n)
                acc = np.float32(0.0)
                for b in range(nb):
                    acc += F16[d[j, b]] * xd[t, b] * np.float32(p[b])
                out[t, j] = acc


@njit(parallel=True, **JIT)
def matmul_q4(xq, xd, xs, q, d, m, out, n_parts):
    """Q4_0 (m has no columns: offset −8·d) and Q4_1 (offset m): nibble v of block b means d·v + offset.
    out[t, j] = Σ_b d·xd·s_b + offset·Σx_b, with s_b the block sums of xq_lo·(v & 15) + xq_hi·(v >> 4)."""
    T, K = xq.shape
    N, nb = d.shape
    H = K // 2
    q41 = m.shape[1] > 0
    step = (N + n_parts - 1) // n_parts
    for part in prange(n_parts):  # one contiguous range of rows per thread
        p = np.empty(H, np.int16)
        s = np.empty(2 * nb, np.int32)
        for j in range(part * step, min(N, (part + 1) * step)):
            qr = q[j]
            for t in range(T):
                xr = xq[t]
                xh = xr[H:]
                for k in range(H):  # |p| ≤ 2·127·15
                    v = qr[k]
                    p[k] = np.int16(xr[k]) * np.int16(v & M15) + np.int16(xh[k]) * np.int16(v >> S4)
                _fold(p, 8 * nb)  # int16 while it fits: 16 → 2 partial sums per block (|·| ≤ 30480)
                _fold(p, 4 * nb)
                _fold(p, 2 * nb)
                for b in range(nb):
                    s[b] = np.int32(p[b]) + np.int32(p[nb + b])
                acc = np.float32(0.0)
                if q41:
                    for b in range(nb):
                        acc += F16[d[j, b]] * xd[t, b] * np.float32(s[b]) + F16[m[j, b]] * xs[t, b]
                else:
                    for b in range(nb):
                        acc += F16[d[j, b]] * (xd[t, b] * np.float32(s[b]) - np.float32(8.0) * xs[t, b])
                out[t, j] = acc


@njit(parallel=True, **JIT)
def matmul_q8_0_exact(xp, q, d, out, n_parts):
    """As matmul_q8_0 with float32 activations (xp: x in block-transposed order): no activation rounding."""
    T, K = xp.shape
    N, nb = d.shape
    step = (N + n_parts - 1) // n_parts
    for part in prange(n_parts):  # one contiguous range of rows per thread
        p = np.empty(K, np.float32)
        for j in range(part * step, min(N, (part + 1) * step)):
            qr = q[j]
            for t in range(T):
                xr = xp[t]
                for k in range(K):
                    p[k] = xr[k] * np.float32(qr[k])
                n = K
                while n > nb:
                    n //= 2
                    _fold(p, n)
                acc = np.float32(0.0)
                for b in range(nb):
                    acc += F16[d[j, b]] * p[b]
                out[t, j] = acc


@njit(parallel=True, **JIT)
def matmul_q4_exact(xp, xs, q, d, m, out, n_parts):
    """As matmul_q4 with float32 activations (xp: x in block-transposed order): no activation rounding."""
    T, K = xp.shape
    N, nb = d.shape
    H = K // 2
    q41 = m.shape[1] > 0
    step = (N + n_parts - 1) // n_parts
    for part in prange(n_parts):  # one contiguous range of rows per thread
        p = np.empty(H, np.float32)
        for j in range(part * step, min(N, (part + 1) * step)):
            qr = q[j]
            for t in range(T):
                xr = xp[t]
                xh = xr[H:]
                for k in range(H):
                    v = qr[k]
                    p[k] = xr[k] * np.float32(v & M15) + xh[k] * np.float32(v >> S4)
                n = H
                while n > nb:
                    n //= 2
                    _fold(p, n)
                acc = np.float32(0.0)
                if q41:
                    for b in range(nb):
                        acc += F16[d[j, b]] * p[b] + F16[m[j, b]] * xs[t, b]
                else:
                    for b in range(nb):
                        acc += F16[d[j, b]] * (p[b] - np.float32(8.0) * xs[t, b])
                out[t, j] = acc


@njit(inline="always", **JIT)
def _f16_row(h, w, u):
    """IEEE half bits h → float32 w (u: the same buffer as uint32), in two vectorizable passes: normals by
    re-biasing the exponent (bits << 13 + (127−15) << 23), then zeros and subnormals as m · 2^−24."""
    for k in range(h.shape[0]):
        v = np.uint32(h[k])
        u[k] = ((v & np.uint32(0x8000)) << np.uint32(16)) | (((v & np.uint32(0x7FFF)) << np.uint32(13))
                                                             + np.uint32(0x38000000))
    for k in range(h.shape[0]):
        v = h[k]
        if (v & np.uint16(0x7C00)) == 0:
            m = np.float32(v & np.uint16(0x3FF)) * np.float32(5.960464477539063e-08)
            w[k] = -m if v & np.uint16(0x8000) else m


@njit(inline="always", **JIT)
def _widen_row(h, bf16, w, u):
    """16-bit floats → float32 w (u: the same buffer as uint32). bfloat16 is the upper half of a float32."""
    if bf16:
        for k in range(h.shape[0]):
            u[k] = np.uint32(h[k]) << np.uint32(16)
    else:
        _f16_row(h, w, u)


@njit(parallel=True, **JIT)
def matmul_half(x, q, bf16, out, n_parts):
    """F16 or BF16 rows, widened row by row (exact), then float32 dot products."""
    T, K = x.shape
    N = q.shape[0]
    step = (N + n_parts - 1) // n_parts
    for part in prange(n_parts):  # one contiguous range of rows per thread
        w = np.empty(K, np.float32)
        u = w.view(np.uint32)
        for j in range(part * step, min(N, (part + 1) * step)):
            _widen_row(q[j], bf16, w, u)
            for t in range(T):
                xr = x[t]
                acc = np.float32(0.0)
                for k in range(K):
                    acc += xr[k] * w[k]
                out[t, j] = acc


@njit(nogil=True, **JIT)
def dequantize_q8_0(q, d, a, b, w):
    """Rows a..b−1 as float32 into w, in the block-transposed column order."""
    nb = d.shape[1]
    sc = np.empty(nb, np.float32)
    for j in range(a, b):
        qr, wr = q[j], w[j - a]
        for c in range(nb):
            sc[c] = F16[d[j, c]]
        for i in range(32):
            o = i * nb
            for c in range(nb):
                wr[o + c] = np.float32(qr[o + c]) * sc[c]


@njit(nogil=True, **JIT)
def dequantize_q4(q, d, m, a, b, w):
    nb = d.shape[1]
    H = q.shape[1]
    sc = np.empty(nb, np.float32)
    off = np.empty(nb, np.float32)
    for j in range(a, b):
        qr, wr = q[j], w[j - a]
        for c in range(nb):
            sc[c] = F16[d[j, c]]
            off[c] = F16[m[j, c]] if m.shape[1] else np.float32(-8.0) * sc[c]
        wh = wr[H:]
        for i in range(16):
            o = i * nb
            for c in range(nb):
                v = qr[o + c]
                wr[o + c] = np.float32(v & M15) * sc[c] + off[c]
                wh[o + c] = np.float32(v >> S4) * sc[c] + off[c]


@njit(nogil=True, **JIT)
def dequantize_half(q, bf16, a, b, w):
    for j in range(a, b):
        _widen_row(q[j], bf16, w[j - a], w[j - a].view(np.uint32))
