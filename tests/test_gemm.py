"""The float matrices (F32, F16, BF16). minirt/cpu/gemm.py, their prompt GEMM, equals numpy's float64 product of
the stored values, for shapes with rows, positions and columns outside whole blocks, into a strided output, split
over any number of parts; Dense / Quant take it for prompts where gemm.USE says so; the F32 decode kernel equals
float64 and gives a position the same bits at any T."""
from __future__ import annotations

import numpy as np
import pytest

from minirt.cpu import gemm
from minirt.linear import Dense, Quant
from tests.test_quant import stored


def _check(got, ref):
    assert np.abs(got - ref).max() < 1e-5 * np.abs(ref).max()


@pytest.mark.parametrize("N,K,T", [(8, 64, 4), (37, 176, 23), (5, 40, 9), (64, 1536, 130)])
@pytest.mark.parametrize("qtype", ["F32", "F16", "BF16"])
@pytest.mark.parametrize("parts", [1, 2, 3])
def test_gemm_equals_float64(N, K, T, qtype, parts):
    rng = np.random.default_rng(N * T + parts)
    w = rng.standard_normal((N, K)).astype(np.float32)
    x = rng.standard_normal((T, K)).astype(np.float32)
    big = np.full((T, N + 7), np.nan, np.float32)
    out = big[:, 3:3 + N]  # a column slice, as Stacked gives its parts
    if parts == 3:  # and a transposed one (columns not unit-stride: the block's results stored lane by lane)
        big = np.full((N + 7, T), np.nan, np.float32)
        out = big[3:3 + N].T
    if qtype == "F32":
        gemm.gemm(x, w, out, parts)
        wf = w.astype(np.float64)
    else:
        lin = Quant(stored(w, qtype))
        gemm.gemm_half(x, lin._qn, qtype == "BF16", out, parts)
        wf = lin.dequantized().astype(np.float64)
    _check(out, x.astype(np.float64) @ wf.T)
    rest = big[:3] if parts == 3 else big[:, :3], big[3 + N:] if parts == 3 else big[:, 3 + N:]
    assert all(np.isnan(r).all() for r in rest)  # nothing written outside


@pytest.mark.parametrize("qtype", ["F32", "F16", "BF16"])
def test_linear_prompt_path(qtype, monkeypatch):
    """Dense and Quant forward for a prompt (more positions than the decode kernels take): the own GEMM and the
    BLAS path both equal the float64 product (plus the bias)."""
    rng = np.random.default_rng(11)
    N, K, T = 44, 96, 40
    w = rng.standard_normal((N, K)).astype(np.float32)
    bias = rng.standard_normal(N).astype(np.float32)
    x = rng.standard_normal((T, K)).astype(np.float32)
    lin = Dense(w, bias) if qtype == "F32" else Quant(stored(w, qtype), bias)
    wf = w.astype(np.float64) if qtype == "F32" else lin.dequantized().astype(np.float64)
    ref = x.astype(np.float64) @ wf.T + bias
    for use in (True, False):
        monkeypatch.setattr(gemm, "USE", use)
        _check(lin.forward(x, np.empty((T, N), np.float32)), ref)


@pytest.mark.parametrize("K", [64, 100, 576])
def test_f32_decode_kernel(K):
    """kernels.matmul_f32 (decode, T ≤ 16): equal to float64, and a position's bits do not depend on T."""
    from minirt.cpu import kernels
    rng = np.random.default_rng(K)
    N = 37
    w = rng.standard_normal((N, K)).astype(np.float32)
    x = rng.standard_normal((16, K)).astype(np.float32)
    full = np.empty((16, N), np.float32)
    kernels.matmul_f32(x, w, full, 2)
    _check(full, x.astype(np.float64) @ w.astype(np.float64).T)
    for T in (1, 3, 5):
        out = np.empty((T, N), np.float32)
        kernels.matmul_f32(x[:T], w, out, 3)
        assert np.array_equal(out, full[:T])
