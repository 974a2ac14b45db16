"""The pinv transition: FFN outputs of a new step from the previous step's, without reading W.

If Y_t = X_t W for X_t (S × H, S ≪ H), then for new inputs X_{t+1}
    Ŷ = X_{t+1} X_tᵀ (X_t X_tᵀ)⁻¹ Y_t = X_{t+1} P W,   P = X_tᵀ (X_t X_tᵀ)⁻¹ X_t  (projector on X_t's row space)
which is exact for rows of X_{t+1} inside that row space; otherwise the error of a row x is x (I − P) W.
Everything goes through the S × S Gram matrix G = X_t X_tᵀ: Cholesky with a small ridge (never an explicit
inverse, never an H × H or H × N intermediate), and each row's relative residual ‖x − xP‖ / ‖x‖ comes from
the same factors at O(S·H) cost: ‖xP‖² = ‖L⁻¹ X_t xᵀ‖².
"""
from __future__ import annotations

import numpy as np
from numba import njit

JIT = dict(cache=True, fastmath=False)


@njit(**JIT)
def cholesky(g, ridge):
    """Lower-triangular L with L Lᵀ = G + ridge·I, or an empty array when G is not positive definite."""
    n = g.shape[0]
    L = np.zeros((n, n))
    for j in range(n):
        s = g[j, j] + ridge
        for k in range(j):
            s -= L[j, k] * L[j, k]
        if not s > 0.0:
            return np.zeros((0, 0))
        L[j, j] = np.sqrt(s)
        for i in range(j + 1, n):
            t = g[i, j]
            for k in range(j):
                t -= L[i, k] * L[j, k]
            L[i, j] = t / L[j, j]
    return L


@njit(**JIT)
def solve_lower(L, b):
    """L⁻¹ b for lower-triangular L, b (n × m), by forward substitution."""
    n, m = b.shape
    out = np.empty((n, m))
    for c in range(m):
        for i in range(n):
            t = b[i, c]
            for k in range(i):
                t -= L[i, k] * out[k, c]
            out[i, c] = t / L[i, i]
    return out


@njit(**JIT)
def solve_upper_t(L, b):
    """L⁻ᵀ b for lower-triangular L (back substitution with Lᵀ)."""
    n, m = b.shape
    out = np.empty((n, m))
    for c in range(m):
        for i in range(n - 1, -1, -1):
            t = b[i, c]
            for k in range(i + 1, n):
                t -= L[k, i] * out[k, c]
            out[i, c] = t / L[i, i]
    return out


def transition(x_prev: np.ndarray, y_prev: np.ndarray, x_new: np.ndarray, ridge: float = 1e-10):
    """(Ŷ, residual per row) for x_new from the cached pair (x_prev, y_prev = x_prev W); (None, None) when the
    Gram matrix cannot be factored even with a larger ridge (the caller computes exactly instead).

    ridge is relative to the mean diagonal of G (it floors the residuals at about √ridge); it is raised
    100-fold (up to 1e-2) while Cholesky fails, which keeps duplicate rows and S close to H finite."""
    xp = np.asarray(x_prev, dtype=np.float64)
    xn = np.asarray(x_new, dtype=np.float64)
    g = xp @ xp.T                                   # S × S
    c = xn @ xp.T                                   # S' × S
    scale = max(float(np.trace(g)) / len(g), 1e-300)
    r = ridge
    while True:
        L = cholesky(g, r * scale)
        if L.size or r >= 1e-2:
            break
        r *= 100
    if not L.size:
        return None, None
    w = solve_lower(L, np.ascontiguousarray(c.T))    # S × S': L⁻¹ X_t xᵀ
    z = solve_upper_t(L, w)                          # S × S': G⁻¹ X_t xᵀ
    y_hat = (z.T @ np.asarray(y_prev, dtype=np.float64)).astype(np.float32)
    norm2 = np.einsum("ij,ij->i", xn, xn)
    proj2 = np.einsum("ij,ij->j", w, w)
    resid = np.sqrt(np.maximum(norm2 - proj2, 0.0) / np.maximum(norm2, 1e-300))
    return y_hat, resid
