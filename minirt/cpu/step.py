"""The compiled decode step: every layer of a forward pass over T ≤ 16 positions in one Numba call.

It runs the same kernels as the per-operation path (model.Model._layers: qmatmul's matrix kernels, kernels'
norms, RoPE, attention, activations) in the same order, so the logits are the same. Python's per-operation
overhead (≈ 18 kernel calls per layer through Numba's dispatcher) goes; what is left per layer are the
parallel regions of the 4 matrix products, attention and the activation (norms, q/k norms and RoPE of a
few positions run on the calling thread: a fork/join costs more than they do).

The model is a table (kernels know nothing of models; model.StepTable builds it):
    fmt[i]            format code of matrix i = 4·layer + (0 qkv | 1 wo | 2 up | 3 down): see FORMATS; LOWRANK
                      for a low-rank matrix, whose factors V, U are entries sub[i, 0], sub[i, 1] past the 4·L
                      (rank sub[i, 2]): low-rank modes run in the step too
    qs[i]             quant bytes in qmatmul.pack's interleaved layout (groups, …; Q8_0 as uint8), else a (1, 1)
                      placeholder
    hs[i]             f16 scales di (groups, nb·16) | the F16/BF16 values (N, K)
    ms[i]             Q4_1's f16 minimums mi (groups, nb·16), else (groups, 0)
    fs[i]             a float32 matrix (N, K) (Dense), else a (1, 1) placeholder
    bs[i]             the bias (N,), or (0,)
    nw, nb_           norm weights and biases (L, 4, dim): attn, ffn, post_attn, post_ffn (biases: LayerNorm)
    qkn               q/k norm weights (L, 2, head_dim)
    win, rope_i       per layer: attention window (0 = all) and the index of its RoPE table in cos/sin
"""
from __future__ import annotations

import numpy as np
from numba import njit
from numba.typed import List

from . import kernels
from .qmatmul import matmul_half, matmul_q, quantize_x

JIT = dict(cache=True, fastmath=True, error_model="numpy")  # as parallel code: no exception on ÷0

@njit(**JIT)
def _list_of(a):
    out = List()
    out.append(a)
    return out


@njit(**JIT)
def _append(out, a):
    out.append(a)


def as_list(arrays):
    """A typed List of the arrays (one type), built by compiled (cached) functions: numba.typed.List built from
    Python compiles its methods in every process (≈ 1 s), which the warm start cannot afford. One element per
    call: a function taking the whole tuple compiles once per tuple length (the table's 4·layers entries) and
    took 17-20 s of a 70-77 s cold start (SmolLM2: 5 lists of 120 arrays); these compile once per array type."""
    out = _list_of(arrays[0])
    for a in arrays[1:]:
        _append(out, a)
    return out


FORMATS = {"F32": 0, "Q8_0": 1, "Q4_0": 2, "Q4_1": 3, "F16": 4, "BF16": 5}
LOWRANK = 15  # a low-rank matrix (modes/lowrank.py): its two factors are further entries of the table (sub)
FFNS = {"swiglu": 0, "geglu": 1, "gelu": 2}
MAX_T = 16  # positions per call (the decode kernels' range; more go through the per-operation path)


@njit(**JIT)
def _matmul_q(tag, tag_odd, xq, xde, xk, q, d, h, out, n):
    # tag_odd: unused by the interleaved kernels, which take any number of blocks (as Quant._tag)
    matmul_q(tag, xq, xde, xk, q, d, h, out, n)


@njit(**JIT)
def _linear(tag, tag_odd, f32, q8, q40, q41, f16, bf16, code, q, hs, ms, w, bias, x, out, xqb, xdeb, xsb, xkb, n):
    """out = x · Wᵀ (+ bias) for one matrix of the table, as Quant.forward / Dense.forward do for T ≤ 16.
    f32 … bf16: None where the model has no matrix of that format: Numba prunes those branches, so that
    only the kernels the model uses are compiled (and loaded from the cache)."""
    T, K = x.shape
    nb = K // 32
    xq = xqb[:T * K].reshape(T, K)
    xde = xdeb[:T * nb * 8].reshape(T, nb * 8)
    xs = xsb[:T * nb].reshape(T, nb)
    if code == 0:
        if f32 is not None:
            kernels.matmul_f32(x, w, out, n)
    elif code == 1:
        if q8 is not None:
            quantize_x(x, xq, xde, xs)
            _matmul_q(tag, tag_odd, xq, xde, xs, q.view(np.int8), hs, ms, out, n)
    elif code == 2:
        if q40 is not None:
            quantize_x(x, xq, xde, xs)  # ms: no columns: Q4_0's −8 stays in the integer sums (matmul_q)
            _matmul_q(tag, tag_odd, xq, xde, xs, q, hs, ms, out, n)
    elif code == 3:
        if q41 is not None:
            quantize_x(x, xq, xde, xs)
            _matmul_q(tag, tag_odd, xq, xde, xs, q, hs, ms, out, n)
    elif code == 4:
        if f16 is not None:
            matmul_half(tag, x, hs, False, out, n)
    else:
        if bf16 is not None:
            matmul_half(tag, x, hs, True, out, n)
    if bias.shape[0]:
        for t in range(T):
            for j in range(bias.shape[0]):
                out[t, j] += bias[j]


@njit(**JIT)
def _matrix(tag, tag_odd, has, fmt, sub, qs, hs, ms, fs, bs, i, x, out, mid, xqb, xdeb, xsb, xkb, n):
    """out = x · (matrix i of the table)ᵀ: one stored matrix, or a LOWRANK pair through the scratch mid,
    out = (x · Vᵀ) · Uᵀ + bias, with V = matrix sub[i, 0] (rank sub[i, 2] rows) and U = matrix sub[i, 1]."""
    f32, q8, q40, q41, f16, bf16 = has
    if fmt[i] != LOWRANK:
        _linear(tag, tag_odd, f32, q8, q40, q41, f16, bf16, fmt[i], qs[i], hs[i], ms[i], fs[i], bs[i], x, out,
                xqb, xdeb, xsb, xkb, n)
        return
    a, b, r = sub[i, 0], sub[i, 1], sub[i, 2]
    y = mid[:x.shape[0] * r].reshape(x.shape[0], r)
    _linear(tag, tag_odd, f32, q8, q40, q41, f16, bf16, fmt[a], qs[a], hs[a], ms[a], fs[a], bs[a], x, y,
            xqb, xdeb, xsb, xkb, n)
    _linear(tag, tag_odd, f32, q8, q40, q41, f16, bf16, fmt[b], qs[b], hs[b], ms[b], fs[b], bs[b], y, out,
            xqb, xdeb, xsb, xkb, n)
    bias = bs[i]
    for t in range(x.shape[0]):
        for j in range(bias.shape[0]):
            out[t, j] += bias[j]


@njit(**JIT)
def _norm(x, w, b, layer, eps, out):
    for t in range(x.shape[0]):
        if layer:
            kernels.layernorm_row(x[t], w, b, eps, out[t])
        else:
            kernels.rmsnorm_row(x[t], w, eps, out[t])


@njit(nogil=True, **JIT)  # the server's HTTP thread runs while a step computes
def layers(tag, tag_odd, has, fmt, sub, qs, hs, ms, fs, bs, nw, nbias, qkn, win, rope_i, cos, sin,
           layer_norm, ffn, use_rope, qk_norm, post_norms, eps, scale,
           x, slots, positions, kc, vc, h, o, qkv, q, att, up, act, scores, mid, xqb, xdeb, xsb, xkb, n,
           start, end, stop):
    """Layers start … end−1 for the T rows of the residual stream x (T, dim), in place. Row t is position
    positions[t] of the sequence whose cache is slot slots[t] of kc/vc (L, S, Hkv, ctx, hd): T positions of one
    sequence (S = 1), or rows of several sequences, each at its own positions (a batched step, minirt.batch);
    its key and value go there. Buffers as Model._buffers; mid flat scratch for a low-rank matrix's T × rank
    middle; xqb/xdeb/xsb/xkb flat scratch for the int8 activations (T·K, T·nb·8, T·nb, T·nb for the largest K).
    stop (1,): read after each layer; where another thread has set it non-zero, the call returns early, at a
    layer boundary (x then holds the residual stream entering the layer returned; the layers before it have
    stored their keys and values). Returns the layer it stopped before: end when it ran them all."""
    T = x.shape[0]
    H, hd = q.shape[1], q.shape[2]
    Hkv = kc.shape[2]
    qd = H * hd
    attf = att.reshape(T, qd)
    for li in range(start, end):
        if li > start and stop[0] != 0:
            return li
        m = 4 * li
        _norm(x, nw[li, 0], nbias[li, 0], layer_norm, eps, h)
        _matrix(tag, tag_odd, has, fmt, sub, qs, hs, ms, fs, bs, m, h, qkv, mid, xqb, xdeb, xsb, xkb, n)
        if qk_norm:
            for task in range(T * H):
                kernels.head_rmsnorm_task(qkv, 0, H, hd, qkn[li, 0], eps, task)
            for task in range(T * Hkv):
                kernels.head_rmsnorm_task(qkv, qd, Hkv, hd, qkn[li, 1], eps, task)
        r = rope_i[li]
        cr, sr = cos[r], sin[r]
        kernels.qkv_rope_rows(qkv, positions, slots, cr, sr, use_rope, q, kc[li], vc[li])
        kernels.attention_rows(q, kc[li], vc[li], slots, positions, scale, win[li], scores, att)
        _matrix(tag, tag_odd, has, fmt, sub, qs, hs, ms, fs, bs, m + 1, attf, o, mid, xqb, xdeb, xsb, xkb, n)
        if post_norms:
            _norm(o, nw[li, 2], nbias[li, 2], layer_norm, eps, o)
        x += o
        _norm(x, nw[li, 1], nbias[li, 1], layer_norm, eps, h)
        _matrix(tag, tag_odd, has, fmt, sub, qs, hs, ms, fs, bs, m + 2, h, up, mid, xqb, xdeb, xsb, xkb, n)
        # the activation kernels of the per-operation path, for every T: their exp/tanh, vectorized in a
        # function of its own, could round differently inlined here (a serial copy did, for T ≤ 2); the
        # same bits at every T keep greedy speculative decoding identical to plain decoding
        if ffn == 0:
            kernels.swiglu(up, act)
        elif ffn == 1:
            kernels.geglu(up, act)
        else:
            kernels.gelu_new(up, act)
        _matrix(tag, tag_odd, has, fmt, sub, qs, hs, ms, fs, bs, m + 3, act, o, mid, xqb, xdeb, xsb, xkb, n)
        if post_norms:
            _norm(o, nw[li, 3], nbias[li, 3], layer_norm, eps, o)
        x += o
    return end
