"""CPU kernels (Numba). They know nothing of files or models: arrays in, arrays out, outputs preallocated.

Shapes: x (T, D) holds T positions; matrices are (out, in); attention works on q (T, n_heads, head_dim)
against a per-layer cache (n_kv_heads, ctx, head_dim).
"""
from __future__ import annotations

import math

import numpy as np
from numba import get_num_threads, njit, prange

from .isa import f32_bits, fadd, fmadd, fmaf, fsum, narrow, v16, v16fma, v16put, v16zero, widen

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


LOG2E, LN2_HI, LN2_LO = 1.4426950408889634, 0.693145751953125, 1.428606765330187e-06
EXP_LO, EXP_HI = -86.6, 88.72284  # ≈ 2^−125 (normal: no denormals) … past float32's largest (inf)


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
    p = np.float32(1.9875691500e-4)
    p = fmaf(p, r, np.float32(1.3981999507e-3))
    p = fmaf(p, r, np.float32(8.3334519073e-3))
    p = fmaf(p, r, np.float32(4.1665795894e-2))
    p = fmaf(p, r, np.float32(1.6666665459e-1))
    p = fmaf(p, r, np.float32(5.0000001201e-1))
    y = fmaf(p, r * r, r) + np.float32(1.0)
    return y * f32_bits((np.int32(n) + np.int32(126)) << np.int32(23)) * np.float32(2.0)  # 2^(n−1)·2: n ≤ 128


@njit(**JIT)
def attend_part(q, kc, vc, t, h0, group, a, b, scale, sc, po, pm, pl):
    """Query heads h0 … h0+group−1 of row t of q (T, H, hd), which share the kv head kc/vc (ctx, hd), over
    positions a..b−1 (b > a): each K and V row is read once for the group. Out: the softmax's max pm[t, h],
    its sum of exponentials pl[t, h] and the unnormalized Σ_s e^(score − max)·v_s in po[t, h];
    sc: scratch (≥ group·(b − a)). With hd a multiple of 16, in 16-lane vectors (isa.v16*): a dot product
    as one vector FMA chain and a tree sum, the V sums in registers (64 values at a time)."""
    hd = q.shape[2]
    L = b - a
    if hd % 16:
        _attend_part_scalar(q, kc, vc, t, h0, group, a, b, scale, sc, po, pm, pl)
        return
    qt = q[t]
    pt = po[t]
    for s in range(a, b):
        for j in range(group):
            acc = v16zero()
            for i0 in range(0, hd, 16):
                acc = v16fma(acc, v16(qt, h0 + j, i0), v16(kc, s, i0))
            sc[j * L + s - a] = fsum(acc) * scale
    _softmax_part(sc, L, t, h0, group, pm, pl)
    for j in range(group):
        for i0 in range(0, hd, 64):
            n4 = min(4, (hd - i0) // 16)
            a0 = v16zero()
            a1 = v16zero()
            a2 = v16zero()
            a3 = v16zero()
            for s in range(a, b):
                pr = sc[j * L + s - a]
                a0 = v16fma(a0, pr, v16(vc, s, i0))
                if n4 > 1:
                    a1 = v16fma(a1, pr, v16(vc, s, i0 + 16))
                if n4 > 2:
                    a2 = v16fma(a2, pr, v16(vc, s, i0 + 32))
                if n4 > 3:
                    a3 = v16fma(a3, pr, v16(vc, s, i0 + 48))
            v16put(pt, h0 + j, i0, a0)
            if n4 > 1:
                v16put(pt, h0 + j, i0 + 16, a1)
            if n4 > 2:
                v16put(pt, h0 + j, i0 + 32, a2)
            if n4 > 3:
                v16put(pt, h0 + j, i0 + 48, a3)


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
    return np.empty((get_num_threads(), cfg.n_heads // cfg.n_kv_heads * n), np.float32)


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
    need = group * ((span + n_parts - 1) // n_parts)
    for part in prange(n_parts):
        sc = scores[part] if scores.shape[1] >= need else np.empty(need, np.float32)
        for task in range(T * Hkv):
            t = task // Hkv
            g = task % Hkv
            n = positions[t] + 1
            s0 = max(0, n - window) if window > 0 else 0
            a = s0 + (n - s0) * part // n_parts
            b = s0 + (n - s0) * (part + 1) // n_parts
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
