"""CPU kernels (Numba). They know nothing of files or models: arrays in, arrays out, outputs preallocated.

Shapes: x (T, D) holds T positions; matrices are (out, in); attention works on q (T, n_heads, head_dim)
against a per-layer cache (n_kv_heads, ctx, head_dim).
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from .isa import f16load, f16zero, fadd, fmadd, fsum

JIT = dict(cache=True, fastmath=True, error_model="numpy")  # as parallel code: no exception on ÷0


@njit(inline="always", **JIT)
def _dot_f32(w, j, x, t, K):
    """Σ_k w[j, k] · x[t, k]: 4 chains of 16 lanes, loads straight from the 2-D arrays (rows unit-stride)."""
    K64 = K - K % 64
    a0 = f16zero()
    a1 = f16zero()
    a2 = f16zero()
    a3 = f16zero()
    for k in range(0, K64, 64):
        a0 = fmadd(a0, f16load(w, j, k), f16load(x, t, k))
        a1 = fmadd(a1, f16load(w, j, k + 16), f16load(x, t, k + 16))
        a2 = fmadd(a2, f16load(w, j, k + 32), f16load(x, t, k + 32))
        a3 = fmadd(a3, f16load(w, j, k + 48), f16load(x, t, k + 48))
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


@njit(**JIT)
def qkv_rope_task(qkv, positions, cos, sin, use_rope, q, kc, vc, task):
    """One (position, head) task of qkv_rope_store."""
    H, hd = q.shape[1], q.shape[2]
    Hkv = kc.shape[0]
    half = hd // 2
    t = task // (H + Hkv)
    h = task % (H + Hkv)
    p = positions[t]
    if h < H:
        src = h * hd
        dst = q[t, h]
    else:
        src = H * hd + (h - H) * hd
        dst = kc[h - H, p]
        vsrc = H * hd + Hkv * hd + (h - H) * hd
        vdst = vc[h - H, p]
        for i in range(hd):
            vdst[i] = qkv[t, vsrc + i]
    if use_rope:
        for i in range(half):
            a = qkv[t, src + i]
            b = qkv[t, src + half + i]
            c = cos[p, i]
            s = sin[p, i]
            dst[i] = a * c - b * s
            dst[half + i] = b * c + a * s
    else:
        for i in range(hd):
            dst[i] = qkv[t, src + i]


@njit(parallel=True, **JIT)
def qkv_rope_store(qkv, positions, cos, sin, use_rope, q, kc, vc):
    """Split fused q|k|v rows: q → q (T, H, hd); k, v → the cache at their positions (kc, vc: (Hkv, ctx, hd)).
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


@njit(**JIT)
def attend(qv, kc, vc, s0, n, scale, sc, o):
    """One query head qv (hd,) over positions s0..n−1 of its kv head kc/vc (ctx, hd) → o (hd,); sc: scratch."""
    hd = qv.shape[0]
    m = -np.inf
    for s in range(s0, n):
        kv = kc[s]
        acc = np.float32(0.0)
        for i in range(hd):
            acc += qv[i] * kv[i]
        acc *= scale
        sc[s] = acc
        m = max(m, acc)
    total = np.float32(0.0)
    for s in range(s0, n):
        e = np.exp(sc[s] - m)
        sc[s] = e
        total += e
    o[:] = 0.0
    for s in range(s0, n):
        pr = sc[s]
        vv = vc[s]
        for i in range(hd):
            o[i] += pr * vv[i]
    inv = np.float32(1.0) / total
    for i in range(hd):
        o[i] *= inv


@njit(**JIT)
def attention(q, kc, vc, pos0, scale, window, scores, out):
    """Causal attention over the cache. q (T, H, hd); kc/vc (Hkv, ctx, hd) with positions < pos0+T filled;
    query t sits at position pos0+t and sees positions 0..pos0+t, or with window > 0 only the last `window`
    of them (sliding-window layers: position s is seen from p when p − s < window). Query head h reads kv
    head h // (H/Hkv). scores: scratch (n_parts, ≥ pos0+T), see attention_rows; out (T, H, hd)."""
    T = q.shape[0]
    positions = np.arange(pos0, pos0 + T)
    attention_rows(q, kc.reshape((1,) + kc.shape), vc.reshape((1,) + vc.shape), np.zeros(T, np.int64), positions,
                   scale, window, scores, out)


@njit(parallel=True, **JIT)
def attention_rows(q, kc, vc, slots, positions, scale, window, scores, out):
    """attention() for rows that each carry their own cache and position: row t is the query at position
    positions[t] of the sequence whose cache is slot slots[t] of kc/vc (S, Hkv, ctx, hd). T positions of one
    sequence (slots all equal, positions consecutive) is attention(); one row each of several sequences is a
    batched decode step. scores is scratch (n_parts, ≥ the furthest position + 1), one row per part: the
    (t, h) tasks are dealt to the parts in turn (a task's cost grows with its position, so contiguous ranges
    would not balance), and the scratch stays O(threads · context) rather than O(T · H · context)."""
    T, H, hd = q.shape
    group = H // kc.shape[1]
    n_parts = scores.shape[0]
    for part in prange(n_parts):
        sc = scores[part]
        for task in range(part, T * H, n_parts):
            t = task // H
            h = task % H
            n = positions[t] + 1
            s0 = max(0, n - window) if window > 0 else 0
            attend(q[t, h], kc[slots[t], h // group], vc[slots[t], h // group], s0, n, scale, sc, out[t, h])


@njit(**JIT)
def swiglu_row(gate_up, out):
    """out = silu(gate) · up, where gate_up = [gate | up] along features (LLaMA FFN); one row."""
    F = out.shape[0]
    for i in range(F):
        g = gate_up[i]
        out[i] = g / (np.float32(1.0) + np.exp(-g)) * gate_up[F + i]


@njit(parallel=True, **JIT)
def swiglu(gate_up, out):
    for t in prange(out.shape[0]):
        swiglu_row(gate_up[t], out[t])


GELU_C = math.sqrt(2.0 / math.pi)
_POW2 = np.array([2.0 ** n for n in range(-126, 128)], np.float32)  # 2^n, exact, for the exp below
EXACT = dict(cache=True, fastmath=False, error_model="numpy")


@njit(**EXACT)
def _exp(a):
    """e^a in float32 from + − × ÷ and floor alone (|a| clamped to 87): 2^n · e^r, n = round(a / ln 2), |r| ≤ ln2/2,
    e^r by its Taylor polynomial of degree 7 (relative error ≤ 1e-7 before rounding). Not libm's expf, nor fast
    math: the same bits scalar or vectorized, inlined anywhere, compiled now or loaded from Numba's cache (libm's
    tanhf in the parallel geglu gave other bits once loaded from the cache than when compiled in the process)."""
    a = min(max(a, np.float32(-87.0)), np.float32(87.0))
    n = np.floor(a * np.float32(1.4426950408889634) + np.float32(0.5))
    r = (a - n * np.float32(0.693359375)) - n * np.float32(-2.12194440e-4)  # ln 2 as exact hi + lo
    p = np.float32(1.0 / 5040)
    for c in (1.0 / 720, 1.0 / 120, 1.0 / 24, 1.0 / 6, 0.5, 1.0, 1.0):
        p = p * r + np.float32(c)
    return p * _POW2[np.int32(n) + 126]


@njit(**EXACT)
def _gelu_tanh(v):
    """0.5·v·(1 + tanh(√(2/π)·(v + 0.044715·v³)))   (the tanh approximation: GPT-2's gelu_new, Gemma's GeGLU),
    written as v / (1 + e^(−2u)) (the same function: 1 + tanh u = 2 / (1 + e^(−2u))) on the exact _exp."""
    u = np.float32(GELU_C) * (v + np.float32(0.044715) * v * v * v)
    return v / (np.float32(1.0) + _exp(np.float32(-2.0) * u))


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
