"""The CPU engine's attention and exponential (minirt/cpu/kernels.py) against float64 numpy: attention_rows for
grouped query heads, sliding windows, rows of several caches and any number of thread parts; a row's result has
the same bits whatever rows run beside it (greedy speculative decoding equals plain decoding on that)."""
from __future__ import annotations

import numpy as np
import pytest
from numba import njit

from minirt.cpu import kernels


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


@pytest.mark.parametrize("H,Hkv", [(4, 4), (9, 3), (4, 1)])
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


def test_swiglu_against_float64():
    rng = np.random.default_rng(1)
    gu = (rng.standard_normal((3, 2 * 200)) * 6).astype(np.float32)
    gu[0, :4] = [-100.0, 100.0, 0.0, -87.0]
    out = np.empty((3, 200), np.float32)
    kernels.swiglu(gu, out)
    g, u = gu[:, :200].astype(np.float64), gu[:, 200:].astype(np.float64)
    ref = g / (1 + np.exp(-g)) * u
    np.testing.assert_allclose(out, ref, rtol=2e-6, atol=1e-30)
