"""Matrix kernels on stored formats (Q8_0, Q4_0, Q4_1, F16, BF16), built on the ISA primitives of isa.py.

Layout of the block formats: interleaved at load (pack(), as llama.cpp's repacked block_q4_0x8, here 16 rows):
per group of 16 rows and block of 32 values, the 4-byte groups of the 16 rows side by side, then their f16
scales d (and Q4_1's m) side by side. One vector load gives lane r = row r; the activations enter as one
4-byte group broadcast to every lane (vpdpbusd's {1to16} memory operand), so a block of 16 rows costs 8
vpdpbusd per position (zmm; 16 ymm on the 8-lane paths) and no horizontal sums. F16/BF16: row-major as stored.
Every kernel takes the path tag (isa.tag(): an empty array whose dtype names the path) as its first argument.

Decode (T ≤ 16 positions), as llama.cpp: activations rounded to int8 per block of 32 (x ≈ xd_b · xq),
    y[t, j] = Σ_b d[j,b] · xd[t,b] · Σ_i q[j,b,i] · xq[t,b,i]   +   Σ_b h[j,b] · xk[t,b]
with h = m, xk = Σx_b for Q4_1 (xd·Σxq, as q8_1); no second term for Q8_0, nor for Q4_0 given h without columns:
its q − 8 is kept in the integers (each block's sums start at −8·Σxq, as llama.cpp's q4_0·q8_0; h = d,
xk = −8·Σx as a float term still works, one FMA and a scale load per block and position dearer). The inner
sums are integer, scaled in float lanes (a vector of 16 rows' scales times the block's activation scale).
At 4+ positions the kernels run at vpdpbusd's throughput on Zen 4 (8 per block, position and 16 rows: 0.5 ns
each in a loop of nothing else, 4.0-4.2 ns per block and position at T=16; the float scale work and the
unpacking hide beside them), so more positions cost in proportion; a kernel prefetches 4 KB ahead, since a
block's compute at 4-8 positions outlasts the hardware prefetcher's lead.
Several positions for the price of one: per group, positions are taken 8 (16-lane path), 4, 2, then 1 at a time,
and each block's weights, once loaded and unpacked, serve all of them; a group (a few KB) is read from memory
once and from L1 for the other chunks. A position's result has the same bits whatever T (no reassociation).
Groups are split into one contiguous range per thread (16-row tasks handed out in turn ran 5-8x slower in
some processes; a static split removed that, measured in the earlier qkernels.py, now removed).
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from .isa import (absmax32, bdotf, bdots, bfloat, blocks_per_step, fadd, fma_is, fma_s, fmadd, fstore, fsum, fvload2,
                  fzero16, half, hload2, hvec, lanes, lzero, prefetch, round32, sum_offset)

JIT = dict(cache=True, fastmath=True)


@njit(**JIT)
def quantize_x(x, xq, xde, xs):
    """Activations x (T, K) → int8 xq (T, K), block scales xd repeated over 8 lanes xde (T, nb·8), and the
    block sums of the rounded activations xs = xd·Σxq (T, nb), as llama.cpp's q8_1 carries them: the offset term
    (Q4_0's −8, Q4_1's m) then sees the same rounded x as the quants (Σx instead: PPL +1.6% on Q4_0)."""
    T, K = x.shape
    nb = K // 32
    for t in range(T):
        xt = x[t]
        for b in range(nb):
            amax = absmax32(xt, b * 32)
            dd = amax / np.float32(127.0)
            inv = np.float32(1.0) / dd if dd > 0 else np.float32(0.0)
            for i in range(8):
                xde[t, b * 8 + i] = dd
            xs[t, b] = dd * np.float32(round32(xt, b * 32, inv, xq[t], b * 32))


# ---- the interleaved layout: see pack(); a group of ROWS rows is read once per call ---------------------
ROWS = 16
PF = 4096  # bytes ahead that the kernels prefetch (512 a block: Q8_0's; Q4's 256 and the next's)


def pack(q: np.ndarray, d: np.ndarray, m: np.ndarray):
    """GGUF-order quants q (n, nb, Bq bytes: 32 int8 for Q8_0, 16 nibble bytes for Q4_*) and f16 scales d, m
    (n, nb; m may have no columns) → the interleaved layout, n padded with zero rows to groups of ROWS:
        qi (G, nb·ROWS·Bq): per group and block, the 4-byte groups c = 0..Bq/4−1 of the block, each as ROWS
                            rows × 4 bytes (row r at 4r): 64 bytes per c
        di, mi (G, nb·ROWS): per group and block, the ROWS rows' scales side by side
    so that a vector load gives lane r = row r (isa.bdots); Q4's k-groups c and c+4 share bytes as nibbles."""
    n, nb, Bq = q.shape
    G = -(-n // ROWS)
    pad = G * ROWS - n
    if pad:
        q = np.concatenate([q, np.zeros((pad, nb, Bq), q.dtype)])
        d = np.concatenate([d, np.zeros((pad, nb), d.dtype)])
        m = np.concatenate([m, np.zeros((pad, m.shape[1]), m.dtype)])
    try:  # moved as 4-byte words, not bytes: 3.3 → 0.1 ms for a 3072×576 Q4_1 matrix
        w = q.view(np.uint32)
    except ValueError:  # a last axis that is not contiguous
        w = np.ascontiguousarray(q).view(np.uint32)
    qi = np.empty((G, nb, Bq // 4, ROWS), np.uint32)
    qi[...] = w.reshape(G, ROWS, nb, Bq // 4).transpose(0, 2, 3, 1)
    qi = qi.reshape(G, nb * ROWS * Bq // 4).view(q.dtype)
    di = d.reshape(G, ROWS, nb).transpose(0, 2, 1).reshape(G, nb * ROWS)
    mi = m.reshape(G, ROWS, m.shape[1]).transpose(0, 2, 1).reshape(G, -1)
    return qi, np.ascontiguousarray(di), np.ascontiguousarray(mi)


def unpack_q(qi: np.ndarray, n: int, nb: int) -> np.ndarray:
    """pack's qi → GGUF-order quants (n, nb·Bq)."""
    G = qi.shape[0]
    Bq = qi.shape[1] // (nb * ROWS)
    return np.ascontiguousarray(qi.reshape(G, nb, Bq // 4, ROWS, 4).transpose(0, 3, 1, 2, 4)).reshape(G * ROWS,
                                                                                                      nb * Bq)[:n]


def unpack_s(si: np.ndarray, n: int) -> np.ndarray:
    """pack's di / mi → (n, nb) (or (n, 0))."""
    G = si.shape[0]
    k = si.shape[1] // ROWS
    return np.ascontiguousarray(si.reshape(G, k, ROWS).transpose(0, 2, 1)).reshape(G * ROWS, k)[:n]


@njit(inline="always", **JIT)
def _i1(isa, q, d, h, xq, xde, xk, bias, t, nb, B, hr, dst, col):
    a0 = lzero(isa)
    m0 = lzero(isa)
    for b in range(nb):
        base, ds = b * B + 4 * hr, b * ROWS + hr
        prefetch(q, base + PF, 512)
        prefetch(d, 2 * ds + 512, 64)
        if h.shape[0]:
            prefetch(h, 2 * ds + 512, 64)
        a0 = fma_is(a0, bdots(isa, q, base, xq, t, 1, b * 32, bias, b, 1)[0], hvec(isa, d, ds), xde[t, b * 8])
        if h.shape[0]:
            m0 = fma_s(m0, hvec(isa, h, ds), xk[t, b])
    fstore(dst[t], col, a0, m0)


@njit(inline="always", **JIT)
def _i2(isa, q, d, h, xq, xde, xk, bias, t, nb, B, hr, dst, col):
    a0 = lzero(isa)
    a1 = lzero(isa)
    m0 = lzero(isa)
    m1 = lzero(isa)
    for b in range(nb):
        base, ds, o = b * B + 4 * hr, b * ROWS + hr, b * 32
        prefetch(q, base + PF, 512)
        prefetch(d, 2 * ds + 512, 64)
        if h.shape[0]:
            prefetch(h, 2 * ds + 512, 64)
        dv = hvec(isa, d, ds)
        a0 = fma_is(a0, bdots(isa, q, base, xq, t, 1, o, bias, b, 1)[0], dv, xde[t, b * 8])
        a1 = fma_is(a1, bdots(isa, q, base, xq, t + 1, 1, o, bias, b, 1)[0], dv, xde[t + 1, b * 8])
        if h.shape[0]:
            hv = hvec(isa, h, ds)
            m0 = fma_s(m0, hv, xk[t, b])
            m1 = fma_s(m1, hv, xk[t + 1, b])
    fstore(dst[t], col, a0, m0)
    fstore(dst[t + 1], col, a1, m1)


@njit(inline="always", **JIT)
def _i4(isa, q, d, h, xq, xde, xk, bias, t, nb, B, hr, dst, col):
    a0 = lzero(isa)
    a1 = lzero(isa)
    a2 = lzero(isa)
    a3 = lzero(isa)
    m0 = lzero(isa)
    m1 = lzero(isa)
    m2 = lzero(isa)
    m3 = lzero(isa)
    for b in range(nb):
        base, ds, o = b * B + 4 * hr, b * ROWS + hr, b * 32
        prefetch(q, base + PF, 512)
        prefetch(d, 2 * ds + 512, 64)
        if h.shape[0]:
            prefetch(h, 2 * ds + 512, 64)
        dv = hvec(isa, d, ds)
        a0 = fma_is(a0, bdots(isa, q, base, xq, t, 1, o, bias, b, 1)[0], dv, xde[t, b * 8])
        a1 = fma_is(a1, bdots(isa, q, base, xq, t + 1, 1, o, bias, b, 1)[0], dv, xde[t + 1, b * 8])
        a2 = fma_is(a2, bdots(isa, q, base, xq, t + 2, 1, o, bias, b, 1)[0], dv, xde[t + 2, b * 8])
        a3 = fma_is(a3, bdots(isa, q, base, xq, t + 3, 1, o, bias, b, 1)[0], dv, xde[t + 3, b * 8])
        if h.shape[0]:
            hv = hvec(isa, h, ds)
            m0 = fma_s(m0, hv, xk[t, b])
            m1 = fma_s(m1, hv, xk[t + 1, b])
            m2 = fma_s(m2, hv, xk[t + 2, b])
            m3 = fma_s(m3, hv, xk[t + 3, b])
    fstore(dst[t], col, a0, m0)
    fstore(dst[t + 1], col, a1, m1)
    fstore(dst[t + 2], col, a2, m2)
    fstore(dst[t + 3], col, a3, m3)


@njit(inline="always", **JIT)
def _i8(isa, q, d, h, xq, xde, xk, bias, t, nb, B, hr, dst, col, nt):
    """5 ≤ nt ≤ 8 positions (16-lane path: 32 vector registers)."""
    a0 = lzero(isa)
    a1 = lzero(isa)
    a2 = lzero(isa)
    a3 = lzero(isa)
    a4 = lzero(isa)
    a5 = lzero(isa)
    a6 = lzero(isa)
    a7 = lzero(isa)
    m0 = lzero(isa)
    m1 = lzero(isa)
    m2 = lzero(isa)
    m3 = lzero(isa)
    m4 = lzero(isa)
    m5 = lzero(isa)
    m6 = lzero(isa)
    m7 = lzero(isa)
    t5, t6, t7 = t + min(5, nt - 1), t + min(6, nt - 1), t + min(7, nt - 1)
    for b in range(nb):
        base, ds, o = b * B + 4 * hr, b * ROWS + hr, b * 32
        prefetch(q, base + PF, 512)
        prefetch(d, 2 * ds + 512, 64)
        if h.shape[0]:
            prefetch(h, 2 * ds + 512, 64)
        dv = hvec(isa, d, ds)
        a0 = fma_is(a0, bdots(isa, q, base, xq, t, 1, o, bias, b, 1)[0], dv, xde[t, b * 8])
        a1 = fma_is(a1, bdots(isa, q, base, xq, t + 1, 1, o, bias, b, 1)[0], dv, xde[t + 1, b * 8])
        a2 = fma_is(a2, bdots(isa, q, base, xq, t + 2, 1, o, bias, b, 1)[0], dv, xde[t + 2, b * 8])
        a3 = fma_is(a3, bdots(isa, q, base, xq, t + 3, 1, o, bias, b, 1)[0], dv, xde[t + 3, b * 8])
        a4 = fma_is(a4, bdots(isa, q, base, xq, t + 4, 1, o, bias, b, 1)[0], dv, xde[t + 4, b * 8])
        if nt > 5:
            a5 = fma_is(a5, bdots(isa, q, base, xq, t5, 1, o, bias, b, 1)[0], dv, xde[t5, b * 8])
        if nt > 6:
            a6 = fma_is(a6, bdots(isa, q, base, xq, t6, 1, o, bias, b, 1)[0], dv, xde[t6, b * 8])
        if nt > 7:
            a7 = fma_is(a7, bdots(isa, q, base, xq, t7, 1, o, bias, b, 1)[0], dv, xde[t7, b * 8])
        if h.shape[0]:
            hv = hvec(isa, h, ds)
            m0 = fma_s(m0, hv, xk[t, b])
            m1 = fma_s(m1, hv, xk[t + 1, b])
            m2 = fma_s(m2, hv, xk[t + 2, b])
            m3 = fma_s(m3, hv, xk[t + 3, b])
            m4 = fma_s(m4, hv, xk[t + 4, b])
            m5 = fma_s(m5, hv, xk[t5, b])
            m6 = fma_s(m6, hv, xk[t6, b])
            m7 = fma_s(m7, hv, xk[t7, b])
    fstore(dst[t], col, a0, m0)
    fstore(dst[t + 1], col, a1, m1)
    fstore(dst[t + 2], col, a2, m2)
    fstore(dst[t + 3], col, a3, m3)
    fstore(dst[t + 4], col, a4, m4)
    if nt > 5:
        fstore(dst[t5], col, a5, m5)
    if nt > 6:
        fstore(dst[t6], col, a6, m6)
    if nt > 7:
        fstore(dst[t7], col, a7, m7)


@njit(**JIT)
def _group(isa, q, d, h, xq, xde, xk, bias, nb, B, dst, col):
    """All positions for one group's rows into dst[:, col:col+ROWS]: up to 8 (16-lane path) or 4 (then 2, then 1)
    positions share each weight load; 8-lane paths take the group in two halves."""
    T = xq.shape[0]
    L = lanes(isa)
    for hr in range(0, ROWS, L):
        t = 0
        if L == 16:
            while T - t >= 5:
                nt = min(8, T - t)
                _i8(isa, q, d, h, xq, xde, xk, bias, t, nb, B, hr, dst, col + hr, nt)
                t += nt
        while t + 4 <= T:
            _i4(isa, q, d, h, xq, xde, xk, bias, t, nb, B, hr, dst, col + hr)
            t += 4
        if t + 2 <= T:
            _i2(isa, q, d, h, xq, xde, xk, bias, t, nb, B, hr, dst, col + hr)
            t += 2
        if t < T:
            _i1(isa, q, d, h, xq, xde, xk, bias, t, nb, B, hr, dst, col + hr)


@njit(parallel=True, **JIT)
def matmul_q(isa, xq, xde, xk, q, d, h, out, n_parts):
    """out[t, j] for the block formats in the interleaved layout (pack: q, d, h = qi, di, and mi (Q4_1) / di
    (Q4_0) / no columns (Q8_0)); see the module docstring. out: (T, N), N ≤ ROWS·groups."""
    T, N = out.shape
    G = d.shape[0]
    nb = d.shape[1] // ROWS
    B = q.shape[1] // nb  # bytes per group and block
    bias = np.empty((T, nb), np.int32)  # where each block's integer sums start: sum_offset · Σ int8 x
    off = sum_offset(isa, q, h.shape[1] == 0)
    for t in range(T):
        for b in range(nb):
            s = 0
            for i in range(32):
                s += np.int32(xq[t, b * 32 + i])
            bias[t, b] = off * s
    step = (G + n_parts - 1) // n_parts
    for part in prange(n_parts):  # one contiguous range of groups per thread
        tmp = np.empty((T, ROWS), np.float32)
        for g in range(part * step, min(G, (part + 1) * step)):
            hg = h[g]
            if (g + 1) * ROWS <= N:
                _group(isa, q[g], d[g], hg, xq, xde, xk, bias, nb, B, out, g * ROWS)
            else:  # the last, padded group
                _group(isa, q[g], d[g], hg, xq, xde, xk, bias, nb, B, tmp, 0)
                for t in range(T):
                    for r in range(N - g * ROWS):
                        out[t, g * ROWS + r] = tmp[t, r]


@njit(parallel=True, **JIT)
def matmul_q_exact(isa, x, xk, q, d, h, out, n_parts):
    """As matmul_q with float32 activations x (T, K): float products, no activation rounding."""
    T, N = out.shape
    G = d.shape[0]
    nb = d.shape[1] // ROWS
    B = q.shape[1] // nb
    L = lanes(isa)
    step = (G + n_parts - 1) // n_parts
    for part in prange(n_parts):
        tmp = np.empty(L, np.float32)
        for g in range(part * step, min(G, (part + 1) * step)):
            qg, dg, hg = q[g], d[g], h[g]
            for hr in range(0, ROWS, L):
                for t in range(T):
                    a = lzero(isa)
                    m = lzero(isa)
                    for b in range(nb):
                        ds = b * ROWS + hr
                        a = fmadd(a, bdotf(isa, qg, b * B + 4 * hr, x[t], b * 32), hvec(isa, dg, ds))
                        if hg.shape[0]:
                            m = fma_s(m, hvec(isa, hg, ds), xk[t, b])
                    fstore(tmp, 0, a, m)
                    for r in range(min(L, N - g * ROWS - hr)):
                        out[t, g * ROWS + hr + r] = tmp[r]


@njit(**JIT)
def _widen(v, bf16):
    return bfloat(v) if bf16 else half(v)


# ---- dequantization (for batched GEMMs, the embedding rows, exports): rows a..b−1 into w ------------------
@njit(nogil=True, **JIT)
def dequantize_i(q, d, m, a, b, w):
    """Rows a..b−1 of a matrix in pack's layout as float32 (natural column order) into w."""
    nb = d.shape[1] // ROWS
    B = q.shape[1] // nb
    q8 = B == 32 * ROWS
    for j in range(a, b):
        g, r = j // ROWS, j % ROWS
        for c in range(nb):
            s = half(d[g, c * ROWS + r])
            off = half(m[g, c * ROWS + r]) if m.shape[1] else np.float32(0.0) if q8 else np.float32(-8.0) * s
            for k in range(8):
                for i in range(4):
                    if q8:
                        v = np.float32(q[g, c * B + 64 * k + 4 * r + i])
                    else:
                        byte = np.uint8(q[g, c * B + 64 * (k % 4) + 4 * r + i])
                        v = np.float32(byte & np.uint8(15)) if k < 4 else np.float32(byte >> np.uint8(4))
                    w[j - a, c * 32 + 4 * k + i] = v * s + off


@njit(nogil=True, **JIT)
def dequantize_rows_i(q, d, m, ids, w):
    """Rows ids of a matrix in pack's layout into w (len(ids), K): embedding lookups in one call (a call per
    row from Python cost ~20 µs each: 0.2 ms of an 8-row server step)."""
    for i in range(ids.shape[0]):
        dequantize_i(q, d, m, ids[i], ids[i] + 1, w[i:i + 1])


@njit(nogil=True, **JIT)
def dequantize_half(q, bf16, a, b, w):
    K = q.shape[1]
    for j in range(a, b):
        for k in range(K):
            w[j - a, k] = _widen(q[j, k], bf16)


@njit(nogil=True, **JIT)
def dequantize_rows_half(q, bf16, ids, w):
    """Rows ids of an F16/BF16 matrix into w, as dequantize_rows_i."""
    for i in range(ids.shape[0]):
        dequantize_half(q, bf16, ids[i], ids[i] + 1, w[i:i + 1])


@njit(inline="always", **JIT)  # inlined: a call per row cost ~25% (arguments pushed, 3 atomic refcounts)
def _g1(isa, q, j, x, t, K, bf16):
    """Σ_k q[j, k] · x[t, k] over the whole vectors of the row (K − K % V values): two chains of accumulators
    (k-steps 2i and 2i+1), so that the FMA latency does not bound a row; loads straight from the 2-D arrays
    (a row view per call cost its reference counting)."""
    V = 16 * blocks_per_step(isa)
    W = 2 * V
    Kw = K - K % W
    a0 = fzero16(isa)
    b0 = fzero16(isa)
    if bf16:
        for k in range(0, Kw, W):
            a0 = fmadd(a0, hload2(isa, q, j, k, True), fvload2(isa, x, t, k))
            b0 = fmadd(b0, hload2(isa, q, j, k + V, True), fvload2(isa, x, t, k + V))
        if Kw + V <= K:
            a0 = fmadd(a0, hload2(isa, q, j, Kw, True), fvload2(isa, x, t, Kw))
    else:
        for k in range(0, Kw, W):
            a0 = fmadd(a0, hload2(isa, q, j, k, False), fvload2(isa, x, t, k))
            b0 = fmadd(b0, hload2(isa, q, j, k + V, False), fvload2(isa, x, t, k + V))
        if Kw + V <= K:
            a0 = fmadd(a0, hload2(isa, q, j, Kw, False), fvload2(isa, x, t, Kw))
    return fsum(fadd(a0, b0))


@njit(inline="always", **JIT)
def _g2(isa, q, j, x, t, K, bf16):
    """_g1 for positions t and t+1, each widened weight vector loaded once: the same sums, in the same order."""
    V = 16 * blocks_per_step(isa)
    W = 2 * V
    Kw = K - K % W
    a0 = fzero16(isa)
    b0 = fzero16(isa)
    a1 = fzero16(isa)
    b1 = fzero16(isa)
    if bf16:
        for k in range(0, Kw, W):
            w = hload2(isa, q, j, k, True)
            v = hload2(isa, q, j, k + V, True)
            a0 = fmadd(a0, w, fvload2(isa, x, t, k))
            b0 = fmadd(b0, v, fvload2(isa, x, t, k + V))
            a1 = fmadd(a1, w, fvload2(isa, x, t + 1, k))
            b1 = fmadd(b1, v, fvload2(isa, x, t + 1, k + V))
        if Kw + V <= K:
            w = hload2(isa, q, j, Kw, True)
            a0 = fmadd(a0, w, fvload2(isa, x, t, Kw))
            a1 = fmadd(a1, w, fvload2(isa, x, t + 1, Kw))
    else:
        for k in range(0, Kw, W):
            w = hload2(isa, q, j, k, False)
            v = hload2(isa, q, j, k + V, False)
            a0 = fmadd(a0, w, fvload2(isa, x, t, k))
            b0 = fmadd(b0, v, fvload2(isa, x, t, k + V))
            a1 = fmadd(a1, w, fvload2(isa, x, t + 1, k))
            b1 = fmadd(b1, v, fvload2(isa, x, t + 1, k + V))
        if Kw + V <= K:
            w = hload2(isa, q, j, Kw, False)
            a0 = fmadd(a0, w, fvload2(isa, x, t, Kw))
            a1 = fmadd(a1, w, fvload2(isa, x, t + 1, Kw))
    return fsum(fadd(a0, b0)), fsum(fadd(a1, b1))


@njit(parallel=True, **JIT)
def matmul_half(isa, x, q, bf16, out, n_parts):
    """F16 (widened by fpext: vcvtph2ps) or BF16 (a 16-bit shift) rows, float32 products; each widened
    weight vector serves 2 positions at a time (_g2; _g1 for an odd last one), both summing a position in
    the same order: the same bits at any T."""
    T, K = x.shape
    N = q.shape[0]
    V = 16 * blocks_per_step(isa)
    Kv = K - K % V
    step = (N + n_parts - 1) // n_parts
    for part in prange(n_parts):
        for j in range(part * step, min(N, (part + 1) * step)):
            t = 0
            while t + 2 <= T:
                out[t, j], out[t + 1, j] = _g2(isa, q, j, x, t, K, bf16)
                t += 2
            if t < T:
                out[t, j] = _g1(isa, q, j, x, t, K, bf16)
            if Kv < K:
                for t in range(T):
                    c = np.float32(0.0)
                    for k in range(Kv, K):
                        c += x[t, k] * _widen(q[j, k], bf16)
                    out[t, j] += c
