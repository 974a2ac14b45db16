"""K-quant encoders (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K): llama.cpp's reference algorithm (ggml-quants.c,
quantize_row_qN_K_ref, the path llama-quantize takes without an importance matrix), written again here in Numba.

Every step is float32 arithmetic in llama.cpp's order (its ggml-base is built without FMA or fast-math), so the
bytes equal llama-quantize's. Each encoder takes float32 rows whose length is a multiple of 256 and returns the
blocks as uint8 rows, in the layout gguf's reader and dequantizer expect:

  Q4_K (144 B / 256): d f16, dmin f16, 12 B of 6-bit sub-block scales and mins, 128 B of 4-bit quants
  Q5_K (176 B / 256): d f16, dmin f16, 12 B scales/mins, 32 B of high bits, 128 B of low nibbles
  Q6_K (210 B / 256): 128 B low nibbles, 64 B high 2 bits, 16 int8 sub-block scales, d f16
  Q3_K (110 B / 256): 32 B high-bit mask, 64 B of 2-bit quants, 12 B of 6-bit signed scales, d f16
  Q2_K ( 84 B / 256): 16 B of 4-bit scale|min pairs, 64 B of 2-bit quants, d f16, dmin f16

The encoders run in two passes around one numpy float32→float16 rounding of the super-block scales (Numba has
no float16 on the CPU): pass 1 finds the sub-block scales (make_qkx2_quants: a weighted least-squares search
over 16–21 candidate scales with a free minimum; make_qx_quants for Q6_K: a symmetric search over 18), pass 2
re-quantizes each value against the rounded scales and packs the bits.
"""
from __future__ import annotations

import numpy as np
from numba import njit

QK_K = 256
BLOCK_BYTES = {"Q2_K": 84, "Q3_K": 110, "Q4_K": 144, "Q5_K": 176, "Q6_K": 210}
_f = np.float32


@njit(cache=True)
def _nearest(v):
    # llama.cpp's nearest_int: round half to even (the 1.5·2^23 trick), for |v| < 2^22
    return int(np.rint(v))


@njit(cache=True)
def _qkx2(x, w, L, Laux, nmax, rmin, rdelta, nstep, use_mad=False):
    """make_qkx2_quants: L[i] in [0, nmax] with x ≈ scale·L − min; returns (scale, min ≥ 0). The error weighed is
    squared, or absolute with use_mad (Q2_K)."""
    n = x.shape[0]
    mn = x[0]
    mx = x[0]
    sum_w = w[0]
    sum_x = sum_w * x[0]
    for i in range(1, n):
        if x[i] < mn:
            mn = x[i]
        if x[i] > mx:
            mx = x[i]
        sum_w += w[i]
        sum_x += w[i] * x[i]
    if mn > 0:
        mn = _f(0)
    if mx == mn:
        for i in range(n):
            L[i] = 0
        return _f(0), -mn
    iscale = _f(nmax) / (mx - mn)
    scale = _f(1) / iscale
    best = _f(0)
    for i in range(n):
        l = min(nmax, max(0, _nearest(iscale * (x[i] - mn))))
        L[i] = l
        diff = scale * _f(l) + mn - x[i]
        best += w[i] * (abs(diff) if use_mad else diff * diff)
    for s in range(nstep + 1):
        iscale = (rmin + rdelta * _f(s) + _f(nmax)) / (mx - mn)
        sum_l = _f(0)
        sum_l2 = _f(0)
        sum_xl = _f(0)
        for i in range(n):
            l = min(nmax, max(0, _nearest(iscale * (x[i] - mn))))
            Laux[i] = l
            fl = _f(l)
            sum_l += w[i] * fl
            sum_l2 += w[i] * fl * fl
            sum_xl += w[i] * fl * x[i]
        D = sum_w * sum_l2 - sum_l * sum_l
        if D > 0:
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
            if this_min > 0:
                this_min = _f(0)
                this_scale = sum_xl / sum_l2
            cur = _f(0)
            for i in range(n):
                diff = this_scale * _f(Laux[i]) + this_min - x[i]
                cur += w[i] * (abs(diff) if use_mad else diff * diff)
            if cur < best:
                for i in range(n):
                    L[i] = Laux[i]
                best = cur
                scale = this_scale
                mn = this_min
    return scale, -mn


@njit(cache=True)
def _qkx_pass1(x, nmax, rmin, rdelta, nstep, L, ls, lm, dd):
    """Q4_K/Q5_K pass 1 over blocks x[nb, 256]: quants L, 6-bit sub-block scales ls and mins lm, and the
    float32 super-block scale and min dd[nb, 2] (to be rounded to float16)."""
    nb = x.shape[0]
    w = np.empty(32, np.float32)
    Laux = np.empty(32, np.uint8)
    scales = np.empty(8, np.float32)
    mins = np.empty(8, np.float32)
    for b in range(nb):
        max_scale = _f(0)
        max_min = _f(0)
        for j in range(8):
            xs = x[b, 32 * j:32 * j + 32]
            sum_x2 = _f(0)
            for l in range(32):
                sum_x2 += xs[l] * xs[l]
            av_x = np.sqrt(sum_x2 / _f(32))
            for l in range(32):
                w[l] = av_x + abs(xs[l])
            sc, m = _qkx2(xs, w, L[b, 32 * j:32 * j + 32], Laux, nmax, rmin, rdelta, nstep)
            scales[j] = sc
            mins[j] = m
            if sc > max_scale:
                max_scale = sc
            if m > max_min:
                max_min = m
        inv_scale = _f(63) / max_scale if max_scale > 0 else _f(0)
        inv_min = _f(63) / max_min if max_min > 0 else _f(0)
        for j in range(8):
            ls[b, j] = min(63, _nearest(inv_scale * scales[j]) & 0xFF)
            lm[b, j] = min(63, _nearest(inv_min * mins[j]) & 0xFF)
        dd[b, 0] = max_scale / _f(63)
        dd[b, 1] = max_min / _f(63)


@njit(cache=True)
def _qkx_pass2(x, nmax, L, ls, lm, dd16):
    """Re-quantize against the rounded scales d·ls, dmin·lm (dd16: the float16 values as float32); a sub-block
    whose scale rounds to zero keeps pass 1's quants, as in llama.cpp."""
    nb = x.shape[0]
    for b in range(nb):
        for j in range(8):
            d = dd16[b, 0] * _f(ls[b, j])
            if d == 0:
                continue
            dm = dd16[b, 1] * _f(lm[b, j])
            for i in range(32):
                L[b, 32 * j + i] = min(nmax, max(0, _nearest((x[b, 32 * j + i] + dm) / d)))


@njit(cache=True)
def _pack_scales(ls, lm, out):
    """The 12-byte 6-bit scale/min layout of Q4_K and Q5_K (get_scale_min_k4's inverse)."""
    for b in range(ls.shape[0]):
        for j in range(12):
            out[b, j] = 0
        for j in range(8):
            s = ls[b, j]
            m = lm[b, j]
            if j < 4:
                out[b, j] = s
                out[b, j + 4] = m
            else:
                out[b, j + 4] = (s & 0xF) | ((m & 0xF) << 4)
                out[b, j - 4] |= (s >> 4) << 6
                out[b, j] |= (m >> 4) << 6


@njit(cache=True)
def _pack_q4k(L, out):
    for b in range(L.shape[0]):
        for c in range(4):                       # 64 values per chunk: low nibbles then high nibbles
            for l in range(32):
                out[b, 32 * c + l] = L[b, 64 * c + l] | (L[b, 64 * c + l + 32] << 4)


@njit(cache=True)
def _pack_q5k(L, qh, ql):
    for b in range(L.shape[0]):
        for l in range(32):
            qh[b, l] = 0
        m1 = 1
        m2 = 2
        for c in range(4):
            for j in range(32):
                l1 = L[b, 64 * c + j]
                if l1 > 15:
                    l1 -= 16
                    qh[b, j] |= m1
                l2 = L[b, 64 * c + j + 32]
                if l2 > 15:
                    l2 -= 16
                    qh[b, j] |= m2
                ql[b, 32 * c + j] = l1 | (l2 << 4)
            m1 <<= 2
            m2 <<= 2


def _encode_qkx(rows: np.ndarray, qtype: str) -> np.ndarray:
    nmax, rmin, rdelta, nstep = (15, -1.0, 0.1, 20) if qtype == "Q4_K" else (31, -0.5, 0.1, 15)
    x = _blocks(rows)
    nb = x.shape[0]
    L = np.empty((nb, QK_K), np.uint8)
    ls = np.empty((nb, 8), np.uint8)
    lm = np.empty((nb, 8), np.uint8)
    dd = np.empty((nb, 2), np.float32)
    _qkx_pass1(x, nmax, _f(rmin), _f(rdelta), nstep, L, ls, lm, dd)
    dd16 = dd.astype(np.float16)
    _qkx_pass2(x, nmax, L, ls, lm, dd16.astype(np.float32))
    out = np.empty((nb, BLOCK_BYTES[qtype]), np.uint8)
    out[:, 0:4] = dd16.view(np.uint8)
    sc = np.empty((nb, 12), np.uint8)
    _pack_scales(ls, lm, sc)
    out[:, 4:16] = sc
    if qtype == "Q4_K":
        qs = np.empty((nb, 128), np.uint8)
        _pack_q4k(L, qs)
        out[:, 16:] = qs
    else:
        qh = np.empty((nb, 32), np.uint8)
        ql = np.empty((nb, 128), np.uint8)
        _pack_q5k(L, qh, ql)
        out[:, 16:48] = qh
        out[:, 48:] = ql
    return out.reshape(rows.shape[0], -1)


@njit(cache=True)
def _qx(x, L, nmax):
    """make_qx_quants with rmse_type 1 (weights x²), no importance: L[i] in [0, 2·nmax) with
    x ≈ scale·(L − nmax); returns scale (signed)."""
    n = x.shape[0]
    mx = _f(0)
    amax = _f(0)
    for i in range(n):
        ax = abs(x[i])
        if ax > amax:
            amax = ax
            mx = x[i]
    if amax < _f(1e-15):
        for i in range(n):
            L[i] = 0
        return _f(0)
    iscale = _f(-nmax) / mx
    sumlx = _f(0)
    suml2 = _f(0)
    for i in range(n):
        l = max(-nmax, min(nmax - 1, _nearest(iscale * x[i])))
        L[i] = l + nmax
        w = x[i] * x[i]
        fl = _f(l)
        sumlx += w * x[i] * fl
        suml2 += w * fl * fl
    scale = sumlx / suml2 if suml2 != 0 else _f(0)
    best = scale * sumlx
    for s in range(-9, 10):
        if s == 0:
            continue
        iscale = -(_f(nmax) + _f(0.1) * _f(s)) / mx
        sumlx = _f(0)
        suml2 = _f(0)
        for i in range(n):
            l = max(-nmax, min(nmax - 1, _nearest(iscale * x[i])))
            w = x[i] * x[i]
            fl = _f(l)
            sumlx += w * x[i] * fl
            suml2 += w * fl * fl
        if suml2 > 0 and sumlx * sumlx > best * suml2:
            for i in range(n):
                L[i] = nmax + max(-nmax, min(nmax - 1, _nearest(iscale * x[i])))
            scale = sumlx / suml2
            best = scale * sumlx
    return scale


@njit(cache=True)
def _q6k_pass1(x, L, sc, d, zero):
    nb = x.shape[0]
    scales = np.empty(16, np.float32)
    for b in range(nb):
        max_scale = _f(0)
        max_abs = _f(0)
        for ib in range(16):
            s = _qx(x[b, 16 * ib:16 * ib + 16], L[b, 16 * ib:16 * ib + 16], 32)
            scales[ib] = s
            if abs(s) > max_abs:
                max_abs = abs(s)
                max_scale = s
        if max_abs < _f(1e-15):
            zero[b] = True
            d[b] = 0
            continue
        zero[b] = False
        iscale = _f(-128) / max_scale
        d[b] = _f(1) / iscale
        for ib in range(16):
            sc[b, ib] = min(127, _nearest(iscale * scales[ib]))


@njit(cache=True)
def _q6k_pass2(x, L, sc, d16, zero, ql, qh):
    nb = x.shape[0]
    for b in range(nb):
        if zero[b]:
            for i in range(128):
                ql[b, i] = 0
            for i in range(64):
                qh[b, i] = 0
            for i in range(16):
                sc[b, i] = 0
            continue
        for j in range(16):
            dj = d16[b] * _f(sc[b, j])
            if dj == 0:
                continue
            for i in range(16):
                L[b, 16 * j + i] = max(-32, min(31, _nearest(x[b, 16 * j + i] / dj))) + 32
        for h in range(2):                        # two halves of 128 values
            for l in range(32):
                a = L[b, 128 * h + l]
                bb = L[b, 128 * h + l + 32]
                c = L[b, 128 * h + l + 64]
                e = L[b, 128 * h + l + 96]
                ql[b, 64 * h + l] = (a & 0xF) | ((c & 0xF) << 4)
                ql[b, 64 * h + l + 32] = (bb & 0xF) | ((e & 0xF) << 4)
                qh[b, 32 * h + l] = (a >> 4) | ((bb >> 4) << 2) | ((c >> 4) << 4) | ((e >> 4) << 6)


def _encode_q6k(rows: np.ndarray) -> np.ndarray:
    x = _blocks(rows)
    nb = x.shape[0]
    L = np.empty((nb, QK_K), np.uint8)
    sc = np.empty((nb, 16), np.int8)
    d = np.empty(nb, np.float32)
    zero = np.empty(nb, np.bool_)
    _q6k_pass1(x, L, sc, d, zero)
    d16 = d.astype(np.float16)
    ql = np.empty((nb, 128), np.uint8)
    qh = np.empty((nb, 64), np.uint8)
    _q6k_pass2(x, L, sc, d16.astype(np.float32), zero, ql, qh)
    out = np.empty((nb, 210), np.uint8)
    out[:, :128] = ql
    out[:, 128:192] = qh
    out[:, 192:208] = sc.view(np.uint8)
    out[:, 208:] = d16.reshape(nb, 1).view(np.uint8)
    return out.reshape(rows.shape[0], -1)


@njit(cache=True)
def _q2k_pass1(x, L, sc, dd):
    """Q2_K: 16 sub-blocks of 16, 2-bit quants with a free minimum (absolute error weighed by |x|); 4-bit
    sub-block scales and mins in one byte each."""
    nb = x.shape[0]
    w = np.empty(16, np.float32)
    Laux = np.empty(16, np.uint8)
    scales = np.empty(16, np.float32)
    mins = np.empty(16, np.float32)
    for b in range(nb):
        max_scale = _f(0)
        max_min = _f(0)
        for j in range(16):
            xs = x[b, 16 * j:16 * j + 16]
            for l in range(16):
                w[l] = abs(xs[l])
            s, m = _qkx2(xs, w, L[b, 16 * j:16 * j + 16], Laux, 3, _f(-0.5), _f(0.1), 15, True)
            scales[j] = s
            mins[j] = m
            if s > max_scale:
                max_scale = s
            if m > max_min:
                max_min = m
        if max_scale > 0:
            iscale = _f(15) / max_scale
            for j in range(16):
                sc[b, j] = _nearest(iscale * scales[j]) & 0xFF
            dd[b, 0] = max_scale / _f(15)
        else:
            for j in range(16):
                sc[b, j] = 0
            dd[b, 0] = 0
        if max_min > 0:
            iscale = _f(15) / max_min
            for j in range(16):
                sc[b, j] |= (_nearest(iscale * mins[j]) << 4) & 0xFF
            dd[b, 1] = max_min / _f(15)
        else:
            dd[b, 1] = 0


@njit(cache=True)
def _q2k_pass2(x, L, sc, dd16, qs):
    nb = x.shape[0]
    for b in range(nb):
        for j in range(16):
            d = dd16[b, 0] * _f(sc[b, j] & 0xF)
            if d == 0:
                continue
            dm = dd16[b, 1] * _f(sc[b, j] >> 4)
            for i in range(16):
                L[b, 16 * j + i] = min(3, max(0, _nearest((x[b, 16 * j + i] + dm) / d)))
        _pack2(L[b], qs[b])


@njit(cache=True)
def _pack2(L, qs):
    for h in range(2):
        for l in range(32):
            k = 128 * h + l
            qs[32 * h + l] = L[k] | (L[k + 32] << 2) | (L[k + 64] << 4) | (L[k + 96] << 6)


def _encode_q2k(rows: np.ndarray) -> np.ndarray:
    x = _blocks(rows)
    nb = x.shape[0]
    L = np.empty((nb, QK_K), np.uint8)
    sc = np.empty((nb, 16), np.uint8)
    dd = np.empty((nb, 2), np.float32)
    _q2k_pass1(x, L, sc, dd)
    dd16 = dd.astype(np.float16)
    qs = np.empty((nb, 64), np.uint8)
    _q2k_pass2(x, L, sc, dd16.astype(np.float32), qs)
    out = np.concatenate([sc, qs, dd16.view(np.uint8)], axis=1)
    return out.reshape(rows.shape[0], -1)


@njit(cache=True)
def _q3(x, L, nmax):
    """make_q3_quants with do_rmse: symmetric quants refined one value at a time (up to 5 sweeps) while the
    weighted fit improves; L[i] in [0, 2·nmax); returns the scale."""
    n = x.shape[0]
    mx = _f(0)
    amax = _f(0)
    for i in range(n):
        ax = abs(x[i])
        if ax > amax:
            amax = ax
            mx = x[i]
    if amax < _f(1e-15):
        for i in range(n):
            L[i] = 0
        return _f(0)
    iscale = _f(-nmax) / mx
    sumlx = _f(0)
    suml2 = _f(0)
    for i in range(n):
        l = max(-nmax, min(nmax - 1, _nearest(iscale * x[i])))
        L[i] = l
        w = x[i] * x[i]
        sumlx += w * x[i] * _f(l)
        suml2 += w * _f(l) * _f(l)
    for _ in range(5):
        changed = 0
        for i in range(n):
            w = x[i] * x[i]
            li = _f(L[i])
            slx = sumlx - w * x[i] * li
            if slx > 0:
                sl2 = suml2 - w * li * li
                new_l = max(-nmax, min(nmax - 1, _nearest(x[i] * sl2 / slx)))
                if new_l != L[i]:
                    slx += w * x[i] * _f(new_l)
                    sl2 += w * _f(new_l) * _f(new_l)
                    if sl2 > 0 and slx * slx * suml2 > sumlx * sumlx * sl2:
                        L[i] = new_l
                        sumlx = slx
                        suml2 = sl2
                        changed += 1
        if changed == 0:
            break
    for i in range(n):
        L[i] += nmax
    return sumlx / suml2 if suml2 > 0 else _f(0)


@njit(cache=True)
def _q3k_pass1(x, L, ls, d):
    """Q3_K: 16 sub-blocks of 16, 3-bit symmetric quants, 6-bit signed sub-block scales ls (stored + 32)."""
    nb = x.shape[0]
    scales = np.empty(16, np.float32)
    for b in range(nb):
        max_scale = _f(0)
        amax = _f(0)
        for j in range(16):
            s = _q3(x[b, 16 * j:16 * j + 16], L[b, 16 * j:16 * j + 16], 4)
            scales[j] = s
            if abs(s) > amax:
                amax = abs(s)
                max_scale = s
        if max_scale != 0:
            iscale = _f(-32) / max_scale
            for j in range(16):
                l = ((_nearest(iscale * scales[j]) + 128) & 0xFF) - 128      # int8_t l = nearest_int(...)
                ls[b, j] = max(-32, min(31, l)) + 32
            d[b] = _f(1) / iscale
        else:
            for j in range(16):
                ls[b, j] = 0
            d[b] = 0


@njit(cache=True)
def _q3k_pass2(x, L, ls, d16, hmask, qs, sc):
    nb = x.shape[0]
    for b in range(nb):
        for j in range(12):
            sc[b, j] = 0
        for j in range(16):
            l = ls[b, j]
            if j < 8:
                sc[b, j] = l & 0xF
            else:
                sc[b, j - 8] |= (l & 0xF) << 4
            sc[b, j % 4 + 8] |= (l >> 4) << (2 * (j // 4))
        for j in range(16):
            dj = d16[b] * _f(np.int32(ls[b, j]) - 32)
            if dj == 0:
                continue
            for i in range(16):
                L[b, 16 * j + i] = max(-4, min(3, _nearest(x[b, 16 * j + i] / dj))) + 4
        for i in range(32):
            hmask[b, i] = 0
        m = 0
        hm = 1
        for j in range(256):
            if L[b, j] > 3:
                hmask[b, m] |= hm
                L[b, j] -= 4
            m += 1
            if m == 32:
                m = 0
                hm <<= 1
        _pack2(L[b], qs[b])


def _encode_q3k(rows: np.ndarray) -> np.ndarray:
    x = _blocks(rows)
    nb = x.shape[0]
    L = np.empty((nb, QK_K), np.int8)
    ls = np.empty((nb, 16), np.uint8)
    d = np.empty(nb, np.float32)
    _q3k_pass1(x, L, ls, d)
    d16 = d.astype(np.float16)
    hmask = np.empty((nb, 32), np.uint8)
    qs = np.empty((nb, 64), np.uint8)
    sc = np.empty((nb, 12), np.uint8)
    _q3k_pass2(x, L, ls, d16.astype(np.float32), hmask, qs, sc)
    out = np.concatenate([hmask, qs, sc, d16.reshape(nb, 1).view(np.uint8)], axis=1)
    return out.reshape(rows.shape[0], -1)


def _blocks(rows: np.ndarray) -> np.ndarray:
    rows = np.ascontiguousarray(rows, dtype=np.float32)
    if rows.ndim != 2 or rows.shape[1] % QK_K:
        raise ValueError(f"K-quants need rows of a multiple of {QK_K} values, got shape {rows.shape}")
    return rows.reshape(-1, QK_K)


def quantize_k(rows: np.ndarray, qtype: str) -> np.ndarray:
    """float32 rows [n, k] (k a multiple of 256) → uint8 [n, k/256·block bytes] of qtype's blocks."""
    if qtype == "Q6_K":
        return _encode_q6k(rows)
    if qtype in ("Q4_K", "Q5_K"):
        return _encode_qkx(rows, qtype)
    if qtype == "Q3_K":
        return _encode_q3k(rows)
    if qtype == "Q2_K":
        return _encode_q2k(rows)
    raise ValueError(f"no K-quant encoder for {qtype}")
