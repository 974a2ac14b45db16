"""Kernels on K-quant and 5-bit blocks as stored (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, Q5_0, Q5_1), on the integer dot
products of isa.py.

Each matrix row is its GGUF bytes, untouched: super-blocks of 256 values (K-quants) or blocks of 32 (Q5_0/Q5_1).
Every format is read as unsigned quants u with a scale and an offset per group of 16 values:
    w = sc[g]·u + mn[g]          (u: 0..3 Q2_K, 0..7 Q3_K, 0..15 Q4_K, 0..31 Q5_K/Q5_0/Q5_1, 0..63 Q6_K)
A row's sc/mn are decoded once per row into a small per-thread scratch (the packed 6-bit scales of Q4_K/Q5_K, the
int8 scales of Q6_K, …) and then used for every position. The quants are unpacked 32 (avx512vnni: 64) at a time
straight from the stored bytes to u8 lanes (kload) and fed to isa.dot with the int8 activations, as llama.cpp's
vec_dot_qK_q8_K does:
    y[t, j] = Σ_b xd[t,b] · Σ_lanes sc · (Σ_4 u·xq)  +  Σ_g mn[g] · xd[t,b(g)] · Σ_16 xq[t]
(the second term is llama.cpp's "bsums": the offsets meet the same rounded activations, so the result is exactly
Σ w·x̂ with x̂ = xd·xq the int8 activations). The exact variant uses float32 activations (fdot, float sums).

The format is a tag like the ISA path: an empty uint8 array whose number of dimensions names it (FORMAT_TAGS),
so each (path, format) pair is its own compiled specialization and its own on-disk cache entry.
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

from .isa import (I32, Vec, _blocks, _is_int_tag, _lt, _ptr, _shuffle, blocks_per_step, dot, fdot, fload, fma_acc,
                  fmadd, fsum, fzero, half, xload)

JIT = dict(cache=True, fastmath=True)

# name → (format id = the tag's ndim, values per block, bytes per block)
FORMATS = {"Q5_0": (1, 32, 22), "Q5_1": (2, 32, 24), "Q2_K": (3, 256, 84), "Q3_K": (4, 256, 110),
           "Q4_K": (5, 256, 144), "Q5_K": (6, 256, 176), "Q6_K": (7, 256, 210)}
FORMAT_TAGS = {name: np.empty((0,) * fid, np.uint8) for name, (fid, _, _) in FORMATS.items()}
I8 = ir.IntType(8)
SIGNED = (1, 7)  # Q5_0, Q6_K: signed quants, scales read in the loop: no per-row scale pass, no offsets


def _fmt(t) -> int | None:
    if isinstance(t, types.Array) and t.dtype == types.uint8 and 1 <= t.ndim <= 7:
        return t.ndim
    return None


def _vsplat(b, v, n):
    """A runtime i8 value in all n lanes."""
    ty = ir.VectorType(I8, n)
    one = b.insert_element(ir.Constant(ty, ir.Undefined), v, ir.Constant(I32, 0))
    return b.shuffle_vector(one, one, ir.Constant(ir.VectorType(I32, n), [0] * n))


def _c(ty, v):
    return ir.Constant(ty, v)


def _load32(ctx, b, aty, arr, blk, f):
    """The 32 unsigned quants of block blk (of 32 values) of one row, as <32 x i8> (see the module docstring)."""
    i64 = blk.type
    v32 = _lt("u8", 32)

    def ld(off, ty=v32):
        return b.load(_ptr(ctx, b, aty, arr, off, ty), align=1)

    def k8(v):  # the i8 splat of a runtime i64
        return _vsplat(b, b.trunc(v, I8), 32)

    m15, m3, m1 = (_c(v32, [x] * 32) for x in (15, 3, 1))
    if f in (1, 2):  # Q5_0 / Q5_1: [d (m)] qh(u32) qs[16]; value i = nibble i | bit i of qh << 4
        off = b.mul(blk, _c(i64, 22 if f == 1 else 24))
        hoff = b.add(off, _c(i64, 2 if f == 1 else 4))
        qh = ld(hoff, I32)
        qs = ld(b.add(hoff, _c(i64, 4)), _lt("u8", 16))
        nib = _shuffle(b, b.and_(qs, _c(qs.type, [15] * 16)), b.lshr(qs, _c(qs.type, [4] * 16)), list(range(32)))
        hb = b.zext(b.bitcast(qh, ir.VectorType(ir.IntType(1), 32)), v32)
        u = b.or_(nib, b.shl(hb, _c(v32, [4] * 32)))
        return b.sub(u, _c(v32, [16] * 32)) if f == 1 else u  # Q5_0: signed values, no offsets
    sb = b.lshr(blk, _c(i64, 3))
    k = b.and_(blk, _c(i64, 7))
    h = b.lshr(k, _c(i64, 2))      # which half of the super-block (Q2_K, Q3_K, Q6_K)
    j = b.and_(k, _c(i64, 3))      # which quarter of that half
    if f == 3:  # Q2_K: scales[16] qs[64] d dmin
        base = b.mul(sb, _c(i64, 84))
        qs = ld(b.add(base, b.add(_c(i64, 16), b.mul(h, _c(i64, 32)))))
        return b.and_(b.lshr(qs, k8(b.shl(j, _c(i64, 1)))), m3)
    if f == 4:  # Q3_K: hmask[32] qs[64] scales[12] d; u = 2 bits | (hmask bit k) << 2
        base = b.mul(sb, _c(i64, 110))
        hm = ld(base)
        qs = ld(b.add(base, b.add(_c(i64, 32), b.mul(h, _c(i64, 32)))))
        lo = b.and_(b.lshr(qs, k8(b.shl(j, _c(i64, 1)))), m3)
        return b.or_(lo, b.shl(b.and_(b.lshr(hm, k8(k)), m1), _c(v32, [2] * 32)))
    if f in (5, 6):  # Q4_K: d dmin scales[12] qs[128]; Q5_K: … qh[32] qs[128]; block k: qs[32·(k/2)…] nibble k%2
        base = b.mul(sb, _c(i64, 144 if f == 5 else 176))
        qoff = 16 if f == 5 else 48
        qs = ld(b.add(base, b.add(_c(i64, qoff), b.mul(b.lshr(k, _c(i64, 1)), _c(i64, 32)))))
        u = b.and_(b.lshr(qs, k8(b.shl(b.and_(k, _c(i64, 1)), _c(i64, 2)))), m15)
        if f == 5:
            return u
        qh = ld(b.add(base, _c(i64, 16)))
        return b.or_(u, b.shl(b.and_(b.lshr(qh, k8(k)), m1), _c(v32, [4] * 32)))
    # f == 7, Q6_K: ql[128] qh[64] scales[16] d; block k = 4h + j: ql[64h + 32(j%2)] nibble j/2, qh[128 + 32h] >> 2j
    base = b.mul(sb, _c(i64, 210))
    ql = ld(b.add(base, b.add(b.mul(h, _c(i64, 64)), b.mul(b.and_(j, _c(i64, 1)), _c(i64, 32)))))
    qh = ld(b.add(base, b.add(_c(i64, 128), b.mul(h, _c(i64, 32)))))
    lo = b.and_(b.lshr(ql, k8(b.shl(b.lshr(j, _c(i64, 1)), _c(i64, 2)))), m15)
    hi = b.and_(b.lshr(qh, k8(b.shl(j, _c(i64, 1)))), m3)
    return b.sub(b.or_(lo, b.shl(hi, _c(v32, [4] * 32))), _c(v32, [32] * 32))  # signed, no offsets


@intrinsic
def kload(typingctx, isa, fmt, row, blk):
    """Quants of blocks blk..blk+G−1 (of 32 values) of one stored row (1-D uint8): unsigned u8 lanes, or for Q5_0
    and Q6_K the signed values (u − 16, u − 32: i8 lanes; isa.dot takes either), which need no offsets."""
    if not _is_int_tag(isa) or _fmt(fmt) is None or not isinstance(row, types.Array):
        return None
    g, f = _blocks(isa), _fmt(fmt)

    def cg(ctx, b, sig, args):
        _, _, arr, bl = args
        vs = [_load32(ctx, b, sig.args[2], arr, b.add(bl, _c(bl.type, i)), f) for i in range(g)]
        return vs[0] if g == 1 else _shuffle(b, vs[0], vs[1], list(range(64)))
    return Vec("i8" if f in SIGNED else "u8", 32 * g)(isa, fmt, row, blk), cg


@intrinsic
def kscale(typingctx, isa, fmt, row, s, blk):
    """Scale lanes of blocks blk..blk+G−1: Q5_0 reads its f16 d straight from the row (d over 8 lanes); the
    other formats read the row's decoded scales s (row_scales; each group of 16 over its 4 lanes)."""
    if not _is_int_tag(isa) or _fmt(fmt) is None:
        return None
    g, f = _blocks(isa), _fmt(fmt)

    def cg(ctx, b, sig, args):
        _, _, arr, sarr, bl = args
        if f == 7:  # Q6_K: d (f16 at 208) × the int8 scales 192 + 2k, 2k + 1 of each block k
            sb = b.lshr(bl, _c(bl.type, 3))
            base = b.mul(sb, _c(bl.type, 210))
            soff = b.add(base, b.add(_c(bl.type, 192), b.shl(b.and_(bl, _c(bl.type, 7)), _c(bl.type, 1))))
            sv = b.load(_ptr(ctx, b, sig.args[2], arr, soff, ir.VectorType(I8, 2 * g)), align=1)
            dh = b.load(_ptr(ctx, b, sig.args[2], arr, b.add(base, _c(bl.type, 208)), ir.IntType(16)), align=1)
            d = b.fpext(b.bitcast(dh, ir.HalfType()), ir.FloatType())
            dv = b.insert_element(ir.Constant(ir.VectorType(ir.FloatType(), 2 * g), ir.Undefined), d, _c(I32, 0))
            dv = _shuffle(b, dv, dv, [0] * (2 * g))
            v = b.fmul(b.sitofp(sv, ir.VectorType(ir.FloatType(), 2 * g)), dv)
            return _shuffle(b, v, v, [2 * k + i // 4 for k in range(g) for i in range(8)])
        if f != 1:
            off = b.mul(bl, _c(bl.type, 2))
            v = b.load(_ptr(ctx, b, sig.args[3], sarr, off, _lt("f32", 2 * g)), align=4)
            return _shuffle(b, v, v, [2 * k + i // 4 for k in range(g) for i in range(8)])
        hv = ir.Constant(ir.VectorType(ir.IntType(16), g), None)
        for k in range(g):
            off = b.mul(b.add(bl, _c(bl.type, k)), _c(bl.type, 22))
            hv = b.insert_element(hv, b.load(_ptr(ctx, b, sig.args[2], arr, off, ir.IntType(16)), align=1),
                                  _c(I32, k))
        fv = b.fpext(b.bitcast(hv, ir.VectorType(ir.HalfType(), g)), ir.VectorType(ir.FloatType(), g))
        return _shuffle(b, fv, fv, [k for k in range(g) for _ in range(8)])
    return Vec("f32", 8 * g)(isa, fmt, row, s, blk), cg


# ---- per-row scales ---------------------------------------------------------------------------------------
@njit(inline="always", **JIT)
def _f16(row, o):
    return half(np.uint16(row[o]) | (np.uint16(row[o + 1]) << np.uint16(8)))


@njit(inline="always", **JIT)
def _scale_min_k4(sc, j):
    """Q4_K/Q5_K: the 6-bit scale and min of sub-block j from the 12 packed bytes sc (llama.cpp get_scale_min_k4)."""
    if j < 4:
        return np.int32(sc[j]) & 63, np.int32(sc[j + 4]) & 63
    a, b, c = np.int32(sc[j - 4]), np.int32(sc[j]), np.int32(sc[j + 4])
    return (c & 15) | ((a >> 6) << 4), (c >> 4) | ((b >> 6) << 4)


@njit(inline="always", **JIT)
def _scale_k3(sc, i):
    """Q3_K: the 6-bit scale i (0..15) from the 12 packed bytes, minus 32."""
    lo = (np.int32(sc[i]) & 15) if i < 8 else (np.int32(sc[i - 8]) >> 4)
    hi = (np.int32(sc[8 + i % 4]) >> (2 * (i // 4))) & 3
    return (lo | (hi << 4)) - 32


@njit(**JIT)
def row_scales(fmt, row, sc, mn):
    """sc, mn per group of 16 values of one stored row: value = sc·u + mn (u as kload gives it)."""
    f = fmt.ndim
    ng = sc.shape[0]
    if f == 1 or f == 2:
        bs = 22 if f == 1 else 24
        for b in range(ng // 2):
            d = _f16(row, b * bs)
            m = np.float32(-16.0) * d if f == 1 else _f16(row, b * bs + 2)
            sc[2 * b] = sc[2 * b + 1] = d
            mn[2 * b] = mn[2 * b + 1] = m
        return
    for s in range(ng // 16):
        if f == 3:  # Q2_K
            o = s * 84
            d, dmin = _f16(row, o + 80), _f16(row, o + 82)
            for i in range(16):
                v = np.int32(row[o + i])
                sc[16 * s + i] = d * np.float32(v & 15)
                mn[16 * s + i] = -(dmin * np.float32(v >> 4))
        elif f == 4:  # Q3_K
            o = s * 110
            d = _f16(row, o + 108)
            p = row[o + 96:o + 108]
            for i in range(16):
                v = d * np.float32(_scale_k3(p, i))
                sc[16 * s + i] = v
                mn[16 * s + i] = np.float32(-4.0) * v
        elif f == 5 or f == 6:  # Q4_K, Q5_K
            o = s * (144 if f == 5 else 176)
            d, dmin = _f16(row, o), _f16(row, o + 2)
            p = row[o + 4:o + 16]
            for i in range(8):
                a, m = _scale_min_k4(p, i)
                sc[16 * s + 2 * i] = sc[16 * s + 2 * i + 1] = d * np.float32(a)
                mn[16 * s + 2 * i] = mn[16 * s + 2 * i + 1] = -(dmin * np.float32(m))
        else:  # Q6_K
            o = s * 210
            d = _f16(row, o + 208)
            for i in range(16):
                v = np.int32(row[o + 192 + i])
                v = d * np.float32(v - 256 if v > 127 else v)
                sc[16 * s + i] = v
                mn[16 * s + i] = np.float32(-32.0) * v


# ---- activations ---------------------------------------------------------------------------------------------
@njit(**JIT)
def quantize_x(x, xq, xde, xs16):
    """x (T, K) → int8 xq per block of 32 (scale max|x|/127, as llama.cpp's q8), the scales over 8 lanes xde
    (T, K/4), and xs16 (T, K/16) = scale · Σ xq over each 16 (llama.cpp's bsums, in float)."""
    T, K = x.shape
    for t in range(T):
        for b in range(K // 32):
            amax = np.float32(0.0)
            for i in range(32):
                amax = max(amax, abs(x[t, b * 32 + i]))
            dd = amax / np.float32(127.0)
            inv = np.float32(1.0) / dd if dd > 0 else np.float32(0.0)
            for i in range(8):
                xde[t, b * 8 + i] = dd
            for h in range(2):
                s = 0
                for i in range(16):
                    q = np.int8(np.round(x[t, b * 32 + 16 * h + i] * inv))
                    xq[t, b * 32 + 16 * h + i] = q
                    s += np.int32(q)
                xs16[t, 2 * b + h] = dd * np.float32(s)


@njit(**JIT)
def sums16(x, xs16):
    """Float sums of x over each 16 values (the exact path's offsets)."""
    T, K = x.shape
    for t in range(T):
        for g in range(K // 16):
            s = np.float32(0.0)
            for i in range(16):
                s += x[t, 16 * g + i]
            xs16[t, g] = s


# ---- decode kernels ------------------------------------------------------------------------------------------
@njit(**JIT)
def _k1(isa, fmt, qr, sc, x0, e0, nb):
    G = blocks_per_step(isa)
    a0 = fzero(isa)
    for b in range(0, nb, G):
        w = kload(isa, fmt, qr, b)
        s = kscale(isa, fmt, qr, sc, b)
        a0 = fma_acc(a0, dot(isa, w, xload(isa, x0, b * 32)), fload(isa, e0, b * 8), s)
    return fsum(a0)


@njit(**JIT)
def _k2(isa, fmt, qr, sc, xq, xde, t, nb):
    G = blocks_per_step(isa)
    a0 = fzero(isa)
    a1 = fzero(isa)
    x0, x1, e0, e1 = xq[t], xq[t + 1], xde[t], xde[t + 1]
    for b in range(0, nb, G):
        w = kload(isa, fmt, qr, b)
        s = kscale(isa, fmt, qr, sc, b)
        o, oe = b * 32, b * 8
        a0 = fma_acc(a0, dot(isa, w, xload(isa, x0, o)), fload(isa, e0, oe), s)
        a1 = fma_acc(a1, dot(isa, w, xload(isa, x1, o)), fload(isa, e1, oe), s)
    return fsum(a0), fsum(a1)


@njit(**JIT)
def _k4(isa, fmt, qr, sc, xq, xde, t, nb):
    G = blocks_per_step(isa)
    a0 = fzero(isa)
    a1 = fzero(isa)
    a2 = fzero(isa)
    a3 = fzero(isa)
    x0, x1, x2, x3 = xq[t], xq[t + 1], xq[t + 2], xq[t + 3]
    e0, e1, e2, e3 = xde[t], xde[t + 1], xde[t + 2], xde[t + 3]
    for b in range(0, nb, G):
        w = kload(isa, fmt, qr, b)
        s = kscale(isa, fmt, qr, sc, b)
        o, oe = b * 32, b * 8
        a0 = fma_acc(a0, dot(isa, w, xload(isa, x0, o)), fload(isa, e0, oe), s)
        a1 = fma_acc(a1, dot(isa, w, xload(isa, x1, o)), fload(isa, e1, oe), s)
        a2 = fma_acc(a2, dot(isa, w, xload(isa, x2, o)), fload(isa, e2, oe), s)
        a3 = fma_acc(a3, dot(isa, w, xload(isa, x3, o)), fload(isa, e3, oe), s)
    return fsum(a0), fsum(a1), fsum(a2), fsum(a3)


@njit(inline="always", **JIT)
def _offsets(mn, xs16, t):
    c = np.float32(0.0)
    for g in range(mn.shape[0]):
        c += mn[g] * xs16[t, g]
    return c


@njit(parallel=True, **JIT)
def matmul_k(isa, fmt, xq, xde, xs16, q, scratch, out):
    """out[t, j] = row j of q (stored bytes) · the int8 activations of position t; scratch (n_parts, 2, K/16)
    float32 holds each thread's row scales (its first dimension is the number of threads)."""
    T, K = xq.shape
    N = q.shape[0]
    nb = K // 32
    n_parts = scratch.shape[0]
    step = (N + n_parts - 1) // n_parts
    for part in prange(n_parts):  # one contiguous range of rows per thread
        sc, mn = scratch[part, 0], scratch[part, 1]
        for j in range(part * step, min(N, (part + 1) * step)):
            qr = q[j]
            if fmt.ndim != 1 and fmt.ndim != 7:  # SIGNED
                row_scales(fmt, qr, sc, mn)
            t = 0
            while t + 4 <= T:
                out[t, j], out[t + 1, j], out[t + 2, j], out[t + 3, j] = _k4(isa, fmt, qr, sc, xq, xde, t, nb)
                t += 4
            if t + 2 <= T:
                out[t, j], out[t + 1, j] = _k2(isa, fmt, qr, sc, xq, xde, t, nb)
                t += 2
            if t < T:
                out[t, j] = _k1(isa, fmt, qr, sc, xq[t], xde[t], nb)
            if fmt.ndim != 1 and fmt.ndim != 7:
                for t in range(T):
                    out[t, j] += _offsets(mn, xs16, t)


@njit(parallel=True, **JIT)
def matmul_k_exact(isa, fmt, x, xs16, q, scratch, out):
    """As matmul_k with float32 activations x (T, K) and their float sums xs16: no activation rounding."""
    T, K = x.shape
    N = q.shape[0]
    nb = K // 32
    G = blocks_per_step(isa)
    n_parts = scratch.shape[0]
    step = (N + n_parts - 1) // n_parts
    for part in prange(n_parts):
        sc, mn = scratch[part, 0], scratch[part, 1]
        for j in range(part * step, min(N, (part + 1) * step)):
            qr = q[j]
            if fmt.ndim != 1 and fmt.ndim != 7:
                row_scales(fmt, qr, sc, mn)
            for t in range(T):
                xr = x[t]
                a = fzero(isa)
                for b in range(0, nb, G):
                    a = fmadd(a, fdot(isa, kload(isa, fmt, qr, b), xr, b * 32), kscale(isa, fmt, qr, sc, b))
                out[t, j] = fsum(a)
                if fmt.ndim != 1 and fmt.ndim != 7:
                    out[t, j] += _offsets(mn, xs16, t)


# ---- dequantization: the gguf package's arithmetic, bit for bit (no fastmath: no fused multiply-adds) -----------
@njit(inline="always", cache=True)
def R(row, o):
    return np.int64(row[o])


@njit(cache=True)
def _unpack(fmt, row, u):
    """All unsigned quants of a stored row into u (K values), in value order (scalar; for dequantization)."""
    f = fmt.ndim
    K = u.shape[0]
    if f == 1 or f == 2:
        bs = 22 if f == 1 else 24
        ho = 2 if f == 1 else 4
        for b in range(K // 32):
            o = b * bs + ho
            qh = np.int64(row[o]) | (np.int64(row[o + 1]) << 8) | (np.int64(row[o + 2]) << 16) | \
                (np.int64(row[o + 3]) << 24)
            for i in range(16):
                v = np.int64(row[o + 4 + i])
                u[32 * b + i] = (v & 15) | (((qh >> i) & 1) << 4)
                u[32 * b + 16 + i] = (v >> 4) | (((qh >> (i + 16)) & 1) << 4)
        return
    for s in range(K // 256):
        for k in range(8):
            h, j = k // 4, k % 4
            for i in range(32):
                if f == 3:
                    v = (R(row, s * 84 + 16 + 32 * h + i) >> (2 * j)) & 3
                elif f == 4:
                    o = s * 110
                    v = ((R(row, o + 32 + 32 * h + i) >> (2 * j)) & 3) | (((R(row, o + i) >> k) & 1) << 2)
                elif f == 5:
                    v = (R(row, s * 144 + 16 + 32 * (k // 2) + i) >> (4 * (k % 2))) & 15
                elif f == 6:
                    o = s * 176
                    v = ((R(row, o + 48 + 32 * (k // 2) + i) >> (4 * (k % 2))) & 15) | (((R(row, o + 16 + i) >> k) & 1) << 4)
                else:
                    o = s * 210
                    v = ((R(row, o + 64 * h + 32 * (j % 2) + i) >> (4 * (j // 2))) & 15) | \
                        (((R(row, o + 128 + 32 * h + i) >> (2 * j)) & 3) << 4)
                u[256 * s + 32 * k + i] = v


@njit(cache=True, nogil=True)
def dequantize(fmt, q, a, b, w):
    """Rows a..b−1 of q (stored bytes) as float32 into w[0 : b−a], as gguf.quants.dequantize computes them."""
    f = fmt.ndim
    K = w.shape[1]
    u = np.empty(K, np.int32)
    for r in range(a, b):
        row = q[r]
        _unpack(fmt, row, u)
        out = w[r - a]
        if f == 1 or f == 2:
            bs = 22 if f == 1 else 24
            for blk in range(K // 32):
                d = _f16(row, blk * bs)
                if f == 1:
                    for i in range(32):
                        out[32 * blk + i] = d * np.float32(u[32 * blk + i] - 16)
                else:
                    m = _f16(row, blk * bs + 2)
                    for i in range(32):
                        out[32 * blk + i] = d * np.float32(u[32 * blk + i]) + m
            continue
        for s in range(K // 256):
            for g in range(16):
                if f == 3:
                    o = s * 84
                    sv = np.int32(row[o + g])
                    dl = _f16(row, o + 80) * np.float32(sv & 15)
                    ml = _f16(row, o + 82) * np.float32(sv >> 4)
                    for i in range(16):
                        out[256 * s + 16 * g + i] = dl * np.float32(u[256 * s + 16 * g + i]) - ml
                elif f == 4:
                    o = s * 110
                    dl = _f16(row, o + 108) * np.float32(_scale_k3(row[o + 96:o + 108], g))
                    for i in range(16):
                        out[256 * s + 16 * g + i] = dl * np.float32(u[256 * s + 16 * g + i] - 4)
                elif f == 5 or f == 6:
                    o = s * (144 if f == 5 else 176)
                    a6, m6 = _scale_min_k4(row[o + 4:o + 16], g // 2)
                    dl = _f16(row, o) * np.float32(a6)
                    ml = _f16(row, o + 2) * np.float32(m6)
                    for i in range(16):
                        out[256 * s + 16 * g + i] = dl * np.float32(u[256 * s + 16 * g + i]) - ml
                else:
                    o = s * 210
                    v = np.int32(row[o + 192 + g])
                    dl = _f16(row, o + 208) * np.float32(v - 256 if v > 127 else v)
                    for i in range(16):
                        out[256 * s + 16 * g + i] = dl * np.float32(u[256 * s + 16 * g + i] - 32)


@njit(cache=True, nogil=True)
def dequantize_rows(fmt, q, ids, w):
    """Rows ids of q into w (len(ids), K), as dequantize: embedding lookups in one call."""
    for i in range(ids.shape[0]):
        dequantize(fmt, q, ids[i], ids[i] + 1, w[i:i + 1])
