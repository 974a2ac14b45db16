"""The pinv transition against independent float64 linear algebra (numpy's pinv and projector)."""
from __future__ import annotations

import numpy as np
import pytest

from minirt.pinv import transition

H, N = 64, 96


def case(S, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((S, H)), rng.standard_normal((H, N))


@pytest.mark.parametrize("S", [1, 8, 32])
def test_exact_inside_the_row_space(S):
    x, w = case(S)
    a = np.random.default_rng(1).standard_normal((5, S))
    x_new = a @ x                                   # rows inside X_t's row space
    y_hat, resid = transition(x, x @ w, x_new)
    want = x_new @ w
    assert np.abs(y_hat - want).max() < 1e-4 * np.abs(want).max()
    assert resid.max() < 1e-3


@pytest.mark.parametrize("noise", [1e-3, 1e-2, 0.3])
def test_error_is_the_residual_term(noise):
    x, w = case(16, 2)
    x_new = x + noise * np.random.default_rng(3).standard_normal(x.shape)
    y_hat, resid = transition(x, x @ w, x_new)
    proj = np.linalg.pinv(x) @ x                    # H × H projector, fine at test size
    outside = x_new @ (np.eye(H) - proj)
    # Ŷ − X_{t+1} W = −X_{t+1}(I − P) W
    assert np.abs((y_hat - x_new @ w) + outside @ w).max() < 1e-4 * np.abs(x_new @ w).max()
    want = np.linalg.norm(outside, axis=1) / np.linalg.norm(x_new, axis=1)
    assert np.allclose(resid, want, rtol=1e-3, atol=1e-6)


def test_degenerate_inputs_stay_finite():
    x, w = case(8, 4)
    dup = np.vstack([x, x[:3]])                     # duplicate rows: singular Gram matrix
    y_hat, resid = transition(dup, dup @ w, x + 0.01)
    assert y_hat is not None and np.isfinite(y_hat).all() and np.isfinite(resid).all()
    square = np.random.default_rng(5).standard_normal((H, H))  # S = H: full row space
    y_hat, resid = transition(square, square @ w, x)
    assert np.abs(y_hat - x @ w).max() < 1e-3 * np.abs(x @ w).max() and resid.max() < 1e-3
    y_hat, resid = transition(np.zeros((4, H)), np.zeros((4, N)), x)  # nothing cached
    assert (y_hat is None and resid is None) or (np.isfinite(y_hat).all() and (resid > 0.99).all())
