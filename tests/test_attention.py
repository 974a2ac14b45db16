"""The CPU engine's attention and exponential (minirt/cpu/kernels.py) against float64 numpy: attention_rows for
grouped query heads, sliding windows, rows of several caches and any number of thread parts; a row's result has
the same bits whatever rows run beside it (greedy speculative decoding equals plain decoding on that)."""
from __future__ import annotations

import numpy as np
import pytest
from numba import njit

from minirt.cpu import kernels
from minirt.cpu.isa import v16, v16expf, v16put


@njit(cache=True, fastmath=True)
def _expf_all(x, out):
    for i in range(x.shape[0]):
        out[i] = kernels.expf(x[i])


def test_expf_within_one_ulp_of_float64():
    x = np.concatenate([np.linspace(-86.0, 88.0, 400_001), np.linspace(-1, 1, 10_001)]).astype(np.float32)
    y = np.empty_like(x)
    _expf_all(x, y)
    ref = np.exp(x.astype(np.float64))
    ulp = np.abs(y - ref) / np.spacing(ref.astype(np.float32)).astype(np.float64)
    assert ulp.max() <= 1.0, x[ulp.argmax()]
    edge = np.array([0.0, -200.0, -np.inf, 88.8, 1e4], np.float32)
    e = np.empty_like(edge)
    _expf_all(edge, e)
    assert e[0] == 1.0 and 0 <= e[1] < 1e-37 and 0 <= e[2] < 1e-37 and np.isinf(e[3]) and np.isinf(e[4])


@njit(cache=True)
def _v16expf_all(x, m, out):
    for i in range(0, x.shape[1], 16):
        v16put(out, 0, i, v16expf(v16(x, 0, i), m))


def test_v16expf_within_one_ulp_of_float64():
    """The softmax's exponential on 16 lanes: e^(x − m) within 1 ulp of the float32 x − m's, as expf; inf past
    EXP_HI, ≈ 0 below EXP_LO."""
    x = np.concatenate([np.linspace(-80.0, 90.0, 400_000), np.linspace(-1, 1, 10_010),
                        [0.0, -200.0, -np.inf, 91.0, 1e4, 0.0]]).astype(np.float32)[None, :]  # 16 × 25626
    y = np.empty_like(x)
    _v16expf_all(x, np.float32(2.0), y)
    ref = np.exp((x[0, :-6] - np.float32(2.0)).astype(np.float64))  # of the float32 difference
    ulp = np.abs(y[0, :-6] - ref) / np.spacing(ref.astype(np.float32)).astype(np.float64)
    assert ulp.max() <= 1.0, x[0, ulp.argmax()]
    e = y[0, -6:]
    assert e[0] == np.float32(np.exp(-2.0)) and 0 <= e[1] < 1e-37 and 0 <= e[2] < 1e-37 and np.isinf(e[3:5]).all()


def reference(q, kc, vc, slots, positions, scale, window):
    """float64 causal attention: row t at positions[t] of cache slots[t]; query head h reads kv head h // group."""
    T, H, hd = q.shape
    group = H // kc.shape[1]
    out = np.empty((T, H, hd))
    for t in range(T):
        n = positions[t] + 1
        s0 = max(0, n - window) if window > 0 else 0
        for h in range(H):
            k = kc[slots[t], h // group, s0:n].astype(np.float64)
            v = vc[slots[t], h // group, s0:n].astype(np.float64)
            s = k @ q[t, h].astype(np.float64) * scale
            e = np.exp(s - s.max())
            out[t, h] = e @ v / e.sum()
    return out


@pytest.mark.parametrize("H,Hkv", [(4, 4), (9, 3), (4, 1), (10, 2), (8, 1)])  # groups of 1, 3, 4, 5 (4 + 1), 8
@pytest.mark.parametrize("window", [0, 5])
@pytest.mark.parametrize("n_parts", [1, 2, 3])
@pytest.mark.parametrize("hd", [80, 24])  # 16-lane vectors (64 + 16 at a time) | not a multiple of 16: scalar loops
def test_attention_rows_against_float64(H, Hkv, window, n_parts, hd):
    rng = np.random.default_rng(H * 100 + Hkv * 10 + window + n_parts + hd)
    ctx, S = 40, 3
    kc = rng.standard_normal((S, Hkv, ctx, hd)).astype(np.float32)
    vc = rng.standard_normal((S, Hkv, ctx, hd)).astype(np.float32)
    cases = [(np.zeros(6, np.int64), np.arange(30, 36)),       # 6 positions of one sequence
             (np.zeros(3, np.int64), np.arange(0, 3)),         # from the start: ranges shorter than the parts
             (np.array([2, 0, 1, 0]), np.array([7, 33, 1, 12]))]  # one row each of several sequences
    for slots, positions in cases:
        T = len(slots)
        q = rng.standard_normal((T, H, hd)).astype(np.float32) * 2
        out = np.empty((T, H, hd), np.float32)
        for scores in (np.empty((n_parts, ctx * H // Hkv), np.float32), np.empty((n_parts, 1), np.float32)):
            kernels.attention_rows(q, kc, vc, slots, positions, 0.25, window, scores, out)  # too small: allocates
            ref = reference(q, kc, vc, slots, positions, 0.25, window)
            np.testing.assert_allclose(out, ref, rtol=0, atol=2e-6 * np.abs(ref).max())
            for t in range(T):  # a row alone: the same bits
                one = np.empty((1, H, hd), np.float32)
                kernels.attention_rows(q[t:t + 1], kc, vc, slots[t:t + 1], positions[t:t + 1], 0.25, window, scores,
                                       one)
                assert np.array_equal(one[0], out[t])


@pytest.mark.parametrize("use_rope", [True, False])
def test_f16_cache_stores_numpys_float16_of_the_f32_values(use_rope):
    """A float16 cache (uint16 bits) gets each key and value rounded to nearest, ties to even: numpy's
    astype(np.float16) of what a float32 cache gets, halfway cases, subnormals and overflow included."""
    rng = np.random.default_rng(7)
    T, H, Hkv, hd, ctx = 4, 6, 2, 32, 12
    qkv = (rng.standard_normal((T, (H + 2 * Hkv) * hd)) * 4).astype(np.float32)
    vs = qkv[:, (H + Hkv) * hd:]  # values are stored as they come: plant the hard cases there
    vs[0, :8] = np.array([1 + 2 ** -11, 1 + 3 * 2 ** -11, -(2 + 2 ** -10), 3e-6, -6e-8, 7e4, -1e5, 65520],
                         np.float32)  # ties (to even: down, up), subnormal, below half the least, overflows
    cos, sin = kernels.rope_tables(ctx, hd, 10000.0)
    positions = np.array([0, 3, 4, 9])
    q32, q16 = np.empty((T, H, hd), np.float32), np.empty((T, H, hd), np.float32)
    k32, v32 = np.zeros((Hkv, ctx, hd), np.float32), np.zeros((Hkv, ctx, hd), np.float32)
    k16, v16 = np.zeros((Hkv, ctx, hd), np.uint16), np.zeros((Hkv, ctx, hd), np.uint16)
    kernels.qkv_rope_store(qkv, positions, cos, sin, use_rope, q32, k32, v32)
    kernels.qkv_rope_store(qkv, positions, cos, sin, use_rope, q16, k16, v16)
    np.testing.assert_array_equal(q16, q32)
    with np.errstate(over="ignore"):
        np.testing.assert_array_equal(k16, k32.astype(np.float16).view(np.uint16))
        np.testing.assert_array_equal(v16, v32.astype(np.float16).view(np.uint16))
    assert np.isinf(v16[0, 0, 5:8].view(np.float16)).all() and v16[0, 0, 3] != 0  # the cases did happen


@pytest.mark.parametrize("hd", [80, 24])  # 16-lane vectors | scalar loops
def test_attention_over_f16_cache_reads_the_values_exactly(hd):
    """Attention over a float16 cache gives the bits it gives over a float32 cache holding the same values
    widened: reading widens exactly, and nothing else changes; rows of several slots included."""
    rng = np.random.default_rng(hd)
    S, H, Hkv, ctx = 3, 9, 3, 40
    k = (rng.standard_normal((S, Hkv, ctx, hd)) * 3).astype(np.float16)
    v = (rng.standard_normal((S, Hkv, ctx, hd)) * 3).astype(np.float16)
    slots, positions = np.array([2, 0, 1, 0]), np.array([7, 33, 1, 39])
    q = rng.standard_normal((4, H, hd)).astype(np.float32)
    scores = np.empty((2, ctx * H // Hkv), np.float32)
    want, got = np.empty((4, H, hd), np.float32), np.empty((4, H, hd), np.float32)
    kernels.attention_rows(q, k.astype(np.float32), v.astype(np.float32), slots, positions, 0.125, 0, scores, want)
    kernels.attention_rows(q, k.view(np.uint16), v.view(np.uint16), slots, positions, 0.125, 0, scores, got)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_allclose(got, reference(q, k, v, slots, positions, 0.125, 0), rtol=0, atol=1e-5 * np.abs(want).max())


def test_swiglu_against_float64():
    rng = np.random.default_rng(1)
    gu = (rng.standard_normal((3, 2 * 200)) * 6).astype(np.float32)
    gu[0, :4] = [-100.0, 100.0, 0.0, -87.0]
    out = np.empty((3, 200), np.float32)
    kernels.swiglu(gu, out)
    g, u = gu[:, :200].astype(np.float64), gu[:, 200:].astype(np.float64)
    ref = g / (1 + np.exp(-g)) * u
    np.testing.assert_allclose(out, ref, rtol=2e-6, atol=1e-30)
