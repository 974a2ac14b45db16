"""CPU kernels (Numba). They know nothing of files or models: arrays in, arrays out, outputs preallocated.

Shapes: x (T, D) holds T positions; matrices are (out, in); attention works on q (T, n_heads, head_dim)
against a per-layer cache (n_kv_heads, ctx, head_dim).
"""
from __future__ import annotations

import math

import numpy as np
from numba import get_num_threads, njit, prange

from .isa import (EXP_HI, EXP_LO, EXP_POLY, LN2_HI, LN2_LO, LOG2E, f32_bits, fadd, fmadd, fmaf, fstore4, fsum, hmax16,
                  narrow, prefetch_l2, sum16x16, v16, v16expf, v16fma, v16keep, v16max, v16put, v16zero, widen)

JIT = dict(cache=True, fastmath=True, error_model="numpy")  # as parallel code: no exception on ÷0


@njit(inline="always", **JIT)
def _dot_f32(w, j, x, t, K):
    """Σ_k w[j, k] · x[t, k]: 4 chains of 16 lanes, loads straight from the 2-D arrays (rows unit-stride)."""
    K64 = K - K % 64
    a0 = v16zero()
    a1 = v16zero()
    a2 = v16zero()
    a3 = v16zero()
    for k in range(0, K64, 64):
        a0 = fmadd(a0, v16(w, j, k), v16(x, t, k))
        a1 = fmadd(a1, v16(w, j, k + 16), v16(x, t, k + 16))
        a2 = fmadd(a2, v16(w, j, k + 32), v16(x, t, k + 32))
        a3 = fmadd(a3, v16(w, j, k + 48), v16(x, t, k + 48))
    s = fsum(fadd(fadd(a0, a1), fadd(a2, a3)))
    for k in range(K64, K):
        s += w[j, k] * x[t, k]
    return s


@njit(parallel=True, **JIT)
def matmul_f32(x, w, out, n_parts):
    """out[t, j] = Σ_k x[t, k] · w[j, k]: each weight row is read once and used for all T inputs; a position's
    sum is the same code at any T (the same bits). x and w: rows unit-stride."""
    T, K = x.shape
    N = w.shape[0]
    step = (N + n_parts - 1) // n_parts
    for part in prange(n_parts):  # one contiguous range of rows per thread
        for j in range(part * step, min(N, (part + 1) * step)):
            for t in range(T):
                out[t, j] = _dot_f32(w, j, x, t, K)


@njit(**JIT)
def rmsnorm_row(x, w, eps, out):
    """out = x / sqrt(mean(x²) + eps) · w   (LLaMA), one row x (D,)"""
    D = x.shape[0]
    ss = np.float32(0.0)
    for i in range(D):
        ss += x[i] * x[i]
    r = np.float32(1.0) / np.sqrt(ss / D + np.float32(eps))
    for i in range(D):
        out[i] = x[i] * r * w[i]


@njit(parallel=True, **JIT)
def rmsnorm(x, w, eps, out):
    """rmsnorm_row over the rows of x (T, D)"""
    for t in prange(x.shape[0]):
        rmsnorm_row(x[t], w, eps, out[t])


@njit(**JIT)
def layernorm_row(x, w, b, eps, out):
    """out = (x − mean) / sqrt(var + eps) · w + b   (GPT-2), one row x (D,)"""
    D = x.shape[0]
    mu = np.float32(0.0)
    for i in range(D):
        mu += x[i]
    mu /= D
    var = np.float32(0.0)
    for i in range(D):
        d = x[i] - mu
        var += d * d
    r = np.float32(1.0) / np.sqrt(var / D + np.float32(eps))
    for i in range(D):
        out[i] = (x[i] - mu) * r * w[i] + b[i]


@njit(parallel=True, **JIT)
def layernorm(x, w, b, eps, out):
    """layernorm_row over the rows of x (T, D)"""
    for t in prange(x.shape[0]):
        layernorm_row(x[t], w, b, eps, out[t])


def rope_tables(n: int, head_dim: int, theta: float, inv: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin of position · θ^(−2i/hd) (or · inv, frequencies given: RoPE scaling, ModelConfig.rope_inv_freq)
    for positions 0..n−1, computed in float64 and stored as float32 (n, hd/2). A position's row does not
    depend on n: tables of any length agree where they overlap."""
    if inv is None:
        inv = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    ang = np.arange(n, dtype=np.float64)[:, None] * inv[None, :]
    return np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)


@njit(inline="always", **JIT)
def _rope_row(qkv, t, src, cos, sin, p, use_rope, dst):
    """dst[:] = qkv[t, src:src+hd], rotated to position p with use_rope (stored as dst's type: narrow)."""
    hd = dst.shape[0]
    half = hd // 2
    if use_rope:
        for i in range(half):
            a = qkv[t, src + i]
            b = qkv[t, src + half + i]
            c = cos[p, i]
            s = sin[p, i]
            dst[i] = narrow(dst, a * c - b * s)
            dst[half + i] = narrow(dst, b * c + a * s)
    else:
        for i in range(hd):
            dst[i] = narrow(dst, qkv[t, src + i])


@njit(**JIT)
def qkv_rope_task(qkv, positions, cos, sin, use_rope, q, kc, vc, task):
    """One (position, head) task of qkv_rope_store."""
    H, hd = q.shape[1], q.shape[2]
    Hkv = kc.shape[0]
    t = task // (H + Hkv)
    h = task % (H + Hkv)
    p = positions[t]
    if h < H:
        _rope_row(qkv, t, h * hd, cos, sin, p, use_rope, q[t, h])
    else:
        _rope_row(qkv, t, H * hd + (h - H) * hd, cos, sin, p, use_rope, kc[h - H, p])
        vsrc = H * hd + Hkv * hd + (h - H) * hd
        vdst = vc[h - H, p]
        for i in range(hd):
            vdst[i] = narrow(vdst, qkv[t, vsrc + i])


@njit(**JIT)
def qkv_rope_rows(qkv, positions, slots, cos, sin, use_rope, q, kc, vc):
    """qkv_rope_task for every (row, head) of rows that each carry their own cache slot and position (a step:
    kc/vc (S, Hkv, ctx, hd)), in one call: the same arithmetic, without a call and its row views per task
    (0.3 ms of an 8-row step of SmolLM2, 30 layers)."""
    T, H, hd = q.shape
    Hkv = kc.shape[1]
    for t in range(T):
        p, s = positions[t], slots[t]
        for h in range(H):
            _rope_row(qkv, t, h * hd, cos, sin, p, use_rope, q[t, h])
        for g in range(Hkv):
            _rope_row(qkv, t, (H + g) * hd, cos, sin, p, use_rope, kc[s, g, p])
            vdst = vc[s, g, p]
            vsrc = (H + Hkv + g) * hd
            for i in range(hd):
                vdst[i] = narrow(vdst, qkv[t, vsrc + i])


@njit(parallel=True, **JIT)
def qkv_rope_store(qkv, positions, cos, sin, use_rope, q, kc, vc):
    """Split fused q|k|v rows: q → q (T, H, hd); k, v → the cache at their positions (kc, vc: (Hkv, ctx, hd),
    float32, or uint16 holding f16 bits: a float16 cache, each value rounded to the nearest f16).
    With use_rope, q and k get the rotary embedding, rotate-half layout:
    (x1, x2) → (x1·c − x2·s, x2·c + x1·s) for each pair (i, i + hd/2)."""
    for task in prange(q.shape[0] * (q.shape[1] + kc.shape[0])):
        qkv_rope_task(qkv, positions, cos, sin, use_rope, q, kc, vc, task)


@njit(**JIT)
def head_rmsnorm_task(x, start, n_heads, hd, w, eps, task):
    """One (position, head) task of head_rmsnorm."""
    t = task // n_heads
    a = start + (task % n_heads) * hd
    ss = np.float32(0.0)
    for i in range(hd):
        ss += x[t, a + i] * x[t, a + i]
    r = np.float32(1.0) / np.sqrt(ss / hd + np.float32(eps))
    for i in range(hd):
        x[t, a + i] = x[t, a + i] * r * w[i]


@njit(parallel=True, **JIT)
def head_rmsnorm(x, start, n_heads, hd, w, eps):
    """In place, per head: x[t, start + h·hd : … + hd] = RMSNorm over the head's hd values · w (q/k norms)."""
    for task in prange(x.shape[0] * n_heads):
        head_rmsnorm_task(x, start, n_heads, hd, w, eps, task)


@njit(inline="always", **JIT)
def expf(x):
    """e^x in float32 within 2 ulp (Cephes' expf: n = round(x/ln 2), r = x − n·ln 2 in two FMAs, a degree-7
    polynomial of r, times 2^n built from its bits). Arithmetic only, so a loop of it vectorizes (np.exp calls
    libm once per value: Numba has no SVML here); the same bits wherever it is inlined. Below EXP_LO it gives
    ≈ 2^−125 rather than 0, which a softmax or a sigmoid cannot tell apart."""
    x = min(max(x, np.float32(EXP_LO)), np.float32(EXP_HI))
    n = np.floor(x * np.float32(LOG2E) + np.float32(0.5))
    r = fmaf(n, np.float32(-LN2_HI), x)
    r = fmaf(n, np.float32(-LN2_LO), r)
    p = np.float32(EXP_POLY[0])
    p = fmaf(p, r, np.float32(EXP_POLY[1]))
    p = fmaf(p, r, np.float32(EXP_POLY[2]))
    p = fmaf(p, r, np.float32(EXP_POLY[3]))
    p = fmaf(p, r, np.float32(EXP_POLY[4]))
    p = fmaf(p, r, np.float32(EXP_POLY[5]))
    y = fmaf(p, r * r, r) + np.float32(1.0)
    return y * f32_bits((np.int32(n) + np.int32(126)) << np.int32(23)) * np.float32(2.0)  # 2^(n−1)·2: n ≤ 128


@njit(inline="always", **JIT)
def _scores16(qt, h, kc, s0, last):
    """The dot products of query head h of qt (H, hd) with the K rows s0 … s0+15 (rows past `last` read row
    `last`) as one vector (lane k: row s0+k): 16 independent FMA chains, one per row, and one transposed tree
    sum (sum16x16). Lane k's bits depend only on the two rows, not on its place in the block."""
    r1 = min(s0 + 1, last)
    r2 = min(s0 + 2, last)
    r3 = min(s0 + 3, last)
    r4 = min(s0 + 4, last)
    r5 = min(s0 + 5, last)
    r6 = min(s0 + 6, last)
    r7 = min(s0 + 7, last)
    r8 = min(s0 + 8, last)
    r9 = min(s0 + 9, last)
    r10 = min(s0 + 10, last)
    r11 = min(s0 + 11, last)
    r12 = min(s0 + 12, last)
    r13 = min(s0 + 13, last)
    r14 = min(s0 + 14, last)
    r15 = min(s0 + 15, last)
    c0 = c1 = c2 = c3 = c4 = c5 = c6 = c7 = c8 = c9 = c10 = c11 = c12 = c13 = c14 = c15 = v16zero()
    for i0 in range(0, qt.shape[1], 16):
        x = v16(qt, h, i0)
        c0 = v16fma(c0, x, v16(kc, s0, i0))
        c1 = v16fma(c1, x, v16(kc, r1, i0))
        c2 = v16fma(c2, x, v16(kc, r2, i0))
        c3 = v16fma(c3, x, v16(kc, r3, i0))
        c4 = v16fma(c4, x, v16(kc, r4, i0))
        c5 = v16fma(c5, x, v16(kc, r5, i0))
        c6 = v16fma(c6, x, v16(kc, r6, i0))
        c7 = v16fma(c7, x, v16(kc, r7, i0))
        c8 = v16fma(c8, x, v16(kc, r8, i0))
        c9 = v16fma(c9, x, v16(kc, r9, i0))
        c10 = v16fma(c10, x, v16(kc, r10, i0))
        c11 = v16fma(c11, x, v16(kc, r11, i0))
        c12 = v16fma(c12, x, v16(kc, r12, i0))
        c13 = v16fma(c13, x, v16(kc, r13, i0))
        c14 = v16fma(c14, x, v16(kc, r14, i0))
        c15 = v16fma(c15, x, v16(kc, r15, i0))
    return sum16x16(c0, c1, c2, c3, c4, c5, c6, c7, c8, c9, c10, c11, c12, c13, c14, c15)


@njit(inline="always", **JIT)
def _scores4x4(qt, h, nh, kc, s0, last):
    """The dot products of query heads h … h+nh−1 (nh ≤ 4) of qt (H, hd) with the K rows s0 … s0+3 (rows past
    `last` read row `last`) as one vector, lane 4j + k: head h+j, row s0+k (lanes of heads ≥ nh: 0). Each K
    vector is loaded once for the nh heads: 4·nh independent FMA chains, one transposed tree sum (sum16x16);
    a lane's bits depend only on its head and row."""
    r1 = min(s0 + 1, last)
    r2 = min(s0 + 2, last)
    r3 = min(s0 + 3, last)
    c0 = c1 = c2 = c3 = c4 = c5 = c6 = c7 = c8 = c9 = c10 = c11 = c12 = c13 = c14 = c15 = v16zero()
    for i0 in range(0, qt.shape[1], 16):
        k0 = v16(kc, s0, i0)
        k1 = v16(kc, r1, i0)
        k2 = v16(kc, r2, i0)
        k3 = v16(kc, r3, i0)
        x = v16(qt, h, i0)
        c0 = v16fma(c0, x, k0)
        c1 = v16fma(c1, x, k1)
        c2 = v16fma(c2, x, k2)
        c3 = v16fma(c3, x, k3)
        if nh > 1:
            x = v16(qt, h + 1, i0)
            c4 = v16fma(c4, x, k0)
            c5 = v16fma(c5, x, k1)
            c6 = v16fma(c6, x, k2)
            c7 = v16fma(c7, x, k3)
        if nh > 2:
            x = v16(qt, h + 2, i0)
            c8 = v16fma(c8, x, k0)
            c9 = v16fma(c9, x, k1)
            c10 = v16fma(c10, x, k2)
            c11 = v16fma(c11, x, k3)
        if nh > 3:
            x = v16(qt, h + 3, i0)
            c12 = v16fma(c12, x, k0)
            c13 = v16fma(c13, x, k1)
            c14 = v16fma(c14, x, k2)
            c15 = v16fma(c15, x, k3)
    return sum16x16(c0, c1, c2, c3, c4, c5, c6, c7, c8, c9, c10, c11, c12, c13, c14, c15)


@njit(**JIT)
def attend_part(q, kc, vc, t, h0, group, a, b, scale, sc, po, pm, pl):
    """Query heads h0 … h0+group−1 of row t of q (T, H, hd), which share the kv head kc/vc (ctx, hd), over
    positions a..b−1 (b > a). Out: the softmax's max pm[t, h], its sum of exponentials pl[t, h] and the
    unnormalized Σ_s e^(score − max)·v_s in po[t, h]; sc: scratch (≥ group · (b − a) rounded up to 16).
    With hd a multiple of 16, in 16-lane vectors (isa.v16*), K and V rows each loaded once for up to 4 heads:
    the scores of 4 heads × 4 rows (_scores4x4; a lone head: 16 rows, _scores16) as independent FMA chains and
    one transposed sum, the softmax on vectors (_softmax16), the V sums of 4 heads × 64 values in registers
    (_vsums4). A score's bits depend only on its head and row (not on the block or the chunk it falls in)."""
    hd = q.shape[2]
    L = b - a
    if hd % 16:
        _attend_part_scalar(q, kc, vc, t, h0, group, a, b, scale, sc, po, pm, pl)
        return
    Lp = (L + 15) // 16 * 16
    s2 = sc[:group * Lp].reshape((group, Lp))  # head j's scores at s2[j, s − a], rows padded to 16
    qt = q[t]
    pt = po[t]
    for s0 in range(a, b, 16):  # 16 K rows (4 KiB at hd 64: in L1) for all the group's heads
        for j0 in range(0, group, 4):
            nh = min(4, group - j0)
            if nh == 1:
                v16put(s2, j0, s0 - a, v16fma(v16zero(), scale, _scores16(qt, h0 + j0, kc, s0, b - 1)))
                continue
            for s1 in range(s0, min(s0 + 16, b), 4):
                v = v16fma(v16zero(), scale, _scores4x4(qt, h0 + j0, nh, kc, s1, b - 1))
                fstore4(s2, j0, s1 - a, v, 0)
                fstore4(s2, j0 + 1, s1 - a, v, 1)
                if nh > 2:
                    fstore4(s2, j0 + 2, s1 - a, v, 2)
                if nh > 3:
                    fstore4(s2, j0 + 3, s1 - a, v, 3)
    for j in range(group):
        pm[t, h0 + j], pl[t, h0 + j] = _softmax16(s2, j, L)
    hd64 = hd - hd % 64
    for j0 in range(0, group, 4):
        for i0 in range(0, hd64, 64):
            _vsums4(vc, s2, a, b, j0, min(4, group - j0), i0, pt, h0)
    for j in range(group):
        for i0 in range(hd64, hd, 16):  # hd not a multiple of 64: the last 16 … 48 values, a chain each
            acc = v16zero()
            for s in range(a, b):
                acc = v16fma(acc, s2[j, s - a], v16(vc, s, i0))
            v16put(pt, h0 + j, i0, acc)


@njit(inline="always", **JIT)
def _softmax16(s2, j, L):
    """s2[j, :L] ← e^(score − max), 16 at a time (isa.v16expf), and 0 in the padding s2[j, L:]; returns the max
    and the sum of the exponentials (a vector sum, then a tree)."""
    Lp = s2.shape[1]
    last = Lp - 16
    mv = v16keep(v16(s2, j, last), L - last, -np.inf)
    for s0 in range(0, last, 16):
        mv = v16max(v16(s2, j, s0), mv)
    m = hmax16(mv)
    tv = v16zero()
    for s0 in range(0, last, 16):
        e = v16expf(v16(s2, j, s0), m)
        v16put(s2, j, s0, e)
        tv = fadd(tv, e)
    e = v16keep(v16expf(v16(s2, j, last), m), L - last, 0.0)
    v16put(s2, j, last, e)
    return m, fsum(fadd(tv, e))


@njit(inline="always", **JIT)
def _vsums4(vc, s2, a, b, j0, nh, i0, pt, h0):
    """pt[h0+j0+j, i0:i0+64] = Σ_s s2[j0+j, s−a] · vc[s, i0:i0+64] for the nh ≤ 4 heads j: each V row's 4 vectors
    loaded once for all of them, 4·nh independent chains."""
    a00 = a01 = a02 = a03 = a10 = a11 = a12 = a13 = v16zero()
    a20 = a21 = a22 = a23 = a30 = a31 = a32 = a33 = v16zero()
    for s in range(a, b):
        v0 = v16(vc, s, i0)
        v1 = v16(vc, s, i0 + 16)
        v2 = v16(vc, s, i0 + 32)
        v3 = v16(vc, s, i0 + 48)
        p = s2[j0, s - a]
        a00 = v16fma(a00, p, v0)
        a01 = v16fma(a01, p, v1)
        a02 = v16fma(a02, p, v2)
        a03 = v16fma(a03, p, v3)
        if nh > 1:
            p = s2[j0 + 1, s - a]
            a10 = v16fma(a10, p, v0)
            a11 = v16fma(a11, p, v1)
            a12 = v16fma(a12, p, v2)
            a13 = v16fma(a13, p, v3)
        if nh > 2:
            p = s2[j0 + 2, s - a]
            a20 = v16fma(a20, p, v0)
            a21 = v16fma(a21, p, v1)
            a22 = v16fma(a22, p, v2)
            a23 = v16fma(a23, p, v3)
        if nh > 3:
            p = s2[j0 + 3, s - a]
            a30 = v16fma(a30, p, v0)
            a31 = v16fma(a31, p, v1)
            a32 = v16fma(a32, p, v2)
            a33 = v16fma(a33, p, v3)
    h = h0 + j0
    v16put(pt, h, i0, a00)
    v16put(pt, h, i0 + 16, a01)
    v16put(pt, h, i0 + 32, a02)
    v16put(pt, h, i0 + 48, a03)
    if nh > 1:
        v16put(pt, h + 1, i0, a10)
        v16put(pt, h + 1, i0 + 16, a11)
        v16put(pt, h + 1, i0 + 32, a12)
        v16put(pt, h + 1, i0 + 48, a13)
    if nh > 2:
        v16put(pt, h + 2, i0, a20)
        v16put(pt, h + 2, i0 + 16, a21)
        v16put(pt, h + 2, i0 + 32, a22)
        v16put(pt, h + 2, i0 + 48, a23)
    if nh > 3:
        v16put(pt, h + 3, i0, a30)
        v16put(pt, h + 3, i0 + 16, a31)
        v16put(pt, h + 3, i0 + 32, a32)
        v16put(pt, h + 3, i0 + 48, a33)


@njit(**JIT)
def _softmax_part(sc, L, t, h0, group, pm, pl):
    """sc[j·L : (j+1)·L] ← e^(score − max) for each head j of the group; the max and the sum to pm, pl."""
    for j in range(group):
        m = sc[j * L]
        for s in range(1, L):
            m = max(m, sc[j * L + s])
        tot = np.float32(0.0)
        for s in range(L):
            e = expf(sc[j * L + s] - m)
            sc[j * L + s] = e
            tot += e
        pm[t, h0 + j] = m
        pl[t, h0 + j] = tot


@njit(**JIT)
def _attend_part_scalar(q, kc, vc, t, h0, group, a, b, scale, sc, po, pm, pl):
    """attend_part for any hd, in scalar loops (that LLVM vectorizes as it can)."""
    hd = q.shape[2]
    L = b - a
    for s in range(a, b):  # no views (kc[s]) inside the loops: each costs a reference count call
        for j in range(group):
            acc = np.float32(0.0)
            for i in range(hd):
                acc += q[t, h0 + j, i] * widen(kc[s, i])
            sc[j * L + s - a] = acc * scale
    _softmax_part(sc, L, t, h0, group, pm, pl)
    for j in range(group):
        for i in range(hd):
            po[t, h0 + j, i] = 0.0
    for s in range(a, b):
        for j in range(group):
            pr = sc[j * L + s - a]
            for i in range(hd):
                po[t, h0 + j, i] += pr * widen(vc[s, i])


@njit(**JIT)
def attention(q, kc, vc, pos0, scale, window, scores, out):
    """Causal attention over the cache. q (T, H, hd); kc/vc (Hkv, ctx, hd) with positions < pos0+T filled
    (float32, or uint16 holding f16 bits: a float16 cache, widened exactly as it is read);
    query t sits at position pos0+t and sees positions 0..pos0+t, or with window > 0 only the last `window`
    of them (sliding-window layers: position s is seen from p when p − s < window). Query head h reads kv
    head h // (H/Hkv). scores: scratch (n_parts, ·), see attention_rows; out (T, H, hd)."""
    T = q.shape[0]
    positions = np.arange(pos0, pos0 + T)
    attention_rows(q, kc.reshape((1,) + kc.shape), vc.reshape((1,) + vc.shape), np.zeros(T, np.int64), positions,
                   scale, window, scores, out)


def attention_scratch(cfg, n: int) -> np.ndarray:
    """attention_rows' scores scratch for rows that see at most n positions: one row per thread (the number of
    parts) holding a kv head's query heads' scores over the thread's share, not one per (position, head)."""
    return np.empty((get_num_threads(), cfg.n_heads // cfg.n_kv_heads * ((n + 15) // 16 * 16)), np.float32)


@njit(inline="always", **JIT)
def _part_range(p, window, part, n_parts):
    """The positions a..b−1 that part `part` of n_parts attends for the query at position p."""
    n = p + 1
    s0 = max(0, n - window) if window > 0 else 0
    return s0 + (n - s0) * part // n_parts, s0 + (n - s0) * (part + 1) // n_parts


PREFETCH_BYTES = 4096


@njit(inline="always", **JIT)
def _prefetch_rows(x, a, b):
    """Prefetch to L2 the rows a..b−1 of x (rows contiguous), their first PREFETCH_BYTES. The rows of one (row,
    kv head) task are a short stream (16 KiB at 64 positions, hd 64, f32) that the hardware prefetcher is slow to
    start on; their head fetched one task ahead arrives while the task before computes, and the prefetcher takes
    the stream from there (caches cold, 1 thread: 8 rows at position 64 ~8% faster, 1 or 8 rows at 511 ~5%;
    the whole task's rows, as many prefetches, made position 511 10-15% slower)."""
    for off in range(a * x.strides[0], min(b * x.strides[0], a * x.strides[0] + PREFETCH_BYTES), 64):
        prefetch_l2(x, off)


@njit(parallel=True, **JIT)
def attention_rows(q, kc, vc, slots, positions, scale, window, scores, out):
    """attention() for rows that each carry their own cache and position: row t is the query at position
    positions[t] of the sequence whose cache is slot slots[t] of kc/vc (S, Hkv, ctx, hd). T positions of one
    sequence (slots all equal, positions consecutive) is attention(); one row each of several sequences is a
    batched decode step. The positions a row sees are split into n_parts = scores.shape[0] contiguous ranges,
    one per thread (each thread has the same share at any T and streams its part of the K/V rows); a thread
    runs every (row, kv head) pair on its ranges (attend_part: a kv head's query heads together), then the
    parts' softmaxes are merged in a fixed order. A row's ranges depend only on its position and n_parts, so
    its result has the same bits at any T. scores: scratch (n_parts, ·), used where a row of it holds
    group × a range (else each thread allocates its own)."""
    T, H, hd = q.shape
    Hkv = kc.shape[1]
    group = H // Hkv
    n_parts = scores.shape[0]
    span = 1
    for t in range(T):
        n = positions[t] + 1
        span = max(span, min(n, window) if window > 0 else n)
    po = np.empty((n_parts, T, H, hd), np.float32)
    pm = np.empty((n_parts, T, H), np.float32)
    pl = np.empty((n_parts, T, H), np.float32)
    need = group * (((span + n_parts - 1) // n_parts + 15) // 16 * 16)
    for part in prange(n_parts):
        sc = scores[part] if scores.shape[1] >= need else np.empty(need, np.float32)
        for task in range(T * Hkv):
            t = task // Hkv
            g = task % Hkv
            a, b = _part_range(positions[t], window, part, n_parts)
            if task + 1 < T * Hkv:  # the next task's K and V rows on their way to L2 while this one computes
                t1 = (task + 1) // Hkv
                a1, b1 = _part_range(positions[t1], window, part, n_parts)
                _prefetch_rows(kc[slots[t1], (task + 1) % Hkv], a1, b1)
                _prefetch_rows(vc[slots[t1], (task + 1) % Hkv], a1, b1)
            if b > a:
                attend_part(q, kc[slots[t], g], vc[slots[t], g], t, g * group, group, a, b, scale, sc, po[part],
                            pm[part], pl[part])
            else:
                for j in range(group):
                    pl[part, t, g * group + j] = 0.0
    for t in range(T):
        for h in range(H):
            m = pm[n_parts - 1, t, h]  # the last part's range is never empty
            for c in range(n_parts - 1):
                if pl[c, t, h] > 0:
                    m = max(m, pm[c, t, h])
            for i in range(hd):  # a loop, not o[:] = 0: in a parallel function that is a parallel region
                out[t, h, i] = 0.0
            tot = np.float32(0.0)
            for c in range(n_parts):
                if pl[c, t, h] > 0:
                    w = expf(pm[c, t, h] - m)
                    tot += w * pl[c, t, h]
                    for i in range(hd):
                        out[t, h, i] += w * po[c, t, h, i]
            inv = np.float32(1.0) / tot
            for i in range(hd):
                out[t, h, i] *= inv


@njit(**JIT)
def swiglu_row(gate_up, out):
    """out = silu(gate) · up, where gate_up = [gate | up] along features (LLaMA FFN); one row."""
    F = out.shape[0]
    for i in range(F):
        g = gate_up[i]
        # expf: vectorized (np.exp: a libm call each); at most e^80, since a vectorized g / inf (a reciprocal
        # estimate, fastmath) is nan, not −0
        out[i] = g / (np.float32(1.0) + expf(min(-g, np.float32(80.0)))) * gate_up[F + i]


@njit(parallel=True, **JIT)
def swiglu(gate_up, out):
    for t in prange(out.shape[0]):
        swiglu_row(gate_up[t], out[t])


GELU_C = math.sqrt(2.0 / math.pi)
EXACT = dict(cache=True, fastmath=False, error_model="numpy")


@njit(**EXACT)
def _gelu_tanh(v):
    """0.5·v·(1 + tanh(√(2/π)·(v + 0.044715·v³)))   (the tanh approximation: GPT-2's gelu_new, Gemma's GeGLU),
    written as v / (1 + e^(−2u)) (the same function: 1 + tanh u = 2 / (1 + e^(−2u))) on expf, without fast math:
    the same bits scalar or vectorized, inlined anywhere, compiled now or loaded from Numba's cache (libm's tanhf
    in the parallel geglu gave other bits once loaded from the cache than when compiled in the process)."""
    u = np.float32(GELU_C) * (v + np.float32(0.044715) * v * v * v)
    return v / (np.float32(1.0) + expf(np.float32(-2.0) * u))


@njit(**JIT)
def geglu_row(gate_up, out):
    """out = gelu_tanh(gate) · up, where gate_up = [gate | up] along features (Gemma's FFN); one row."""
    F = out.shape[0]
    for i in range(F):
        out[i] = _gelu_tanh(gate_up[i]) * gate_up[F + i]


@njit(parallel=True, **JIT)
def geglu(gate_up, out):
    for t in prange(out.shape[0]):
        geglu_row(gate_up[t], out[t])


@njit(**JIT)
def gelu_row(x, out):
    """out = 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))   (GPT-2's gelu_new, no gate); one row."""
    for i in range(out.shape[0]):
        out[i] = _gelu_tanh(x[i])


@njit(parallel=True, **JIT)
def gelu_new(x, out):
    for t in prange(out.shape[0]):
        gelu_row(x[t], out[t])
