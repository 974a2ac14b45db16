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

from ..errors import MinirtError
from ..linear import Linear
from ..model import Model

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


# ---- the transition inside the model: a Linear that predicts rows from a window of exact ones -------------

@njit(**JIT)
def _refactor(G, L, count, ridge):
    """L ← Cholesky of G[:count, :count] + ridge·mean(diag)·I, raising the ridge 100-fold (to 1e-2) while it
    fails. Returns False when even that fails (the caller then keeps no window)."""
    if count == 0:
        return True
    scale = 0.0
    for j in range(count):
        scale += G[j, j]
    scale = max(scale / count, 1e-300)
    r = ridge
    while True:
        ok = True
        for j in range(count):
            s = G[j, j] + r * scale
            for k in range(j):
                s -= L[j, k] * L[j, k]
            if not s > 0.0:
                ok = False
                break
            L[j, j] = np.sqrt(s)
            for i in range(j + 1, count):
                t = G[i, j]
                for k in range(j):
                    t -= L[i, k] * L[j, k]
                L[i, j] = t / L[j, j]
        if ok or r >= 1e-2:
            return ok
        r *= 100.0


@njit(**JIT)
def plan_rows(x, tol, ridge, Xw, G, L, state, slot_src, exact_idx, coef, src, ncoef, resid):
    """Decide, row by row, which rows of x (T × H) the window predicts and which are computed exactly.

    The window (Xw: S × H exact inputs, G their Gram matrix, L its Cholesky factor, state = [count, head])
    holds the last S rows that were computed exactly. A row x gets w = L⁻¹ Xw xᵀ and its relative residual
    ‖x(I − P)‖/‖x‖ = sqrt(‖x‖² − ‖w‖²)/‖x‖; if that is ≤ tol (and tol > 0) the row is predicted as
    Ŷ = zᵀ Yw with z = L⁻ᵀ w, recorded here as (coef, src): src indexes [Yw rows; exact rows of this call]
    so a prediction stays right when a later exact row of the same call overwrites its slot. Otherwise the
    row is computed exactly (exact_idx) and enters the window: Gram row updated at O(S·H), L refactored.
    Returns the number of exact rows. resid: each row's residual (1 for an empty window)."""
    S, H = Xw.shape
    T = x.shape[0]
    count, head = state[0], state[1]
    n_exact = 0
    w = np.empty(S)
    for i in range(T):
        nrm2 = 0.0
        for h in range(H):
            nrm2 += float(x[i, h]) * float(x[i, h])
        r2 = 1.0
        if count > 0 and nrm2 > 0.0:
            for j in range(count):
                t = 0.0
                for h in range(H):
                    t += Xw[j, h] * x[i, h]
                for k in range(j):
                    t -= L[j, k] * w[k]
                w[j] = t / L[j, j]
            proj2 = 0.0
            for j in range(count):
                proj2 += w[j] * w[j]
            r2 = max(nrm2 - proj2, 0.0) / nrm2
        resid[i] = np.sqrt(r2)
        if tol > 0.0 and count > 0 and nrm2 > 0.0 and r2 <= tol * tol:
            for j in range(count - 1, -1, -1):     # z = L⁻ᵀ w
                t = w[j]
                for k in range(j + 1, count):
                    t -= L[k, j] * coef[i, k]
                coef[i, j] = t / L[j, j]
            for j in range(count):
                src[i, j] = slot_src[j]
            ncoef[i] = count
            continue
        ncoef[i] = 0
        exact_idx[n_exact] = i
        n_exact += 1
        if nrm2 == 0.0:
            continue  # a zero row says nothing about W
        if count < S:
            slot = count
            count += 1
        else:
            slot = head
            head = (head + 1) % S
        for h in range(H):
            Xw[slot, h] = x[i, h]
        slot_src[slot] = S + n_exact - 1
        for j in range(count):
            t = 0.0
            for h in range(H):
                t += Xw[slot, h] * Xw[j, h]
            G[slot, j] = t
            G[j, slot] = t
        if not _refactor(G, L, count, ridge):  # cannot happen for finite rows; keep just the newest
            for h in range(H):
                Xw[0, h] = Xw[slot, h]
            G[0, 0] = G[slot, slot]
            slot_src[0] = slot_src[slot]
            count, head = 1, 0
            _refactor(G, L, count, ridge)
    state[0], state[1] = count, head
    return n_exact


@njit(**JIT)
def combine_rows(rows, coef, src, ncoef, Yw, Ynew, bias, out):
    """out[i] = Σ_j coef[i, j] · Y[src[i, j]] + bias for the predicted rows i, Y = [Yw; Ynew − bias]
    (Yw holds x·W without the bias; Ynew: this call's exact rows as the wrapped Linear wrote them)."""
    S, N = Yw.shape
    for i in rows:
        for n in range(N):
            out[i, n] = bias[n]
        for j in range(ncoef[i]):
            c = np.float32(coef[i, j])
            s = src[i, j]
            if s < S:
                for n in range(N):
                    out[i, n] += c * Yw[s, n]
            else:
                for n in range(N):
                    out[i, n] += c * (Ynew[s - S, n] - bias[n])


@njit(**JIT)
def store_rows(slot_src, Yw, y_new, bias):
    """Window slots that exact rows of this call entered (slot_src ≥ S) take those rows' outputs, less the bias."""
    S, N = Yw.shape
    for s in range(S):
        e = slot_src[s] - S
        if e >= 0:
            for n in range(N):
                Yw[s, n] = y_new[e, n] - bias[n]
            slot_src[s] = s


class PinvStats:
    """Rows (tokens × layers) seen while the transition was on, and how many took the shortcut."""

    def __init__(self):
        self.rows = 0
        self.shortcut = 0
        self.repeats = 0   # predicted rows with residual < 1e-3: inputs the window already held (up to rounding)

    @property
    def fraction(self) -> float:
        return self.shortcut / self.rows if self.rows else 0.0

    @property
    def repeat_fraction(self) -> float:
        return self.repeats / self.rows if self.rows else 0.0

    def clear(self) -> None:
        self.rows = self.shortcut = self.repeats = 0


class PinvState:
    """Settings shared by the PinvLinears of one model: tolerance, on/off (Jacobi's exact passes), counters."""

    def __init__(self, window: int, tol: float, ridge: float = 1e-10):
        self.window, self.tol, self.ridge = window, tol, ridge
        self.enabled = True
        self.stats = PinvStats()
        self.linears: list[PinvLinear] = []

    def reset(self) -> None:
        """Empty every window (a new sequence)."""
        for lin in self.linears:
            lin.reset()


class PinvLinear(Linear):
    """A Linear whose rows are predicted by the pinv transition from the last S exactly computed (x, y = xW)
    pairs of this layer; a row whose relative residual exceeds the tolerance is computed exactly by the
    wrapped Linear and enters the window. Every pair (x, xW) is exact whatever position it came from, so the
    window needs no rollback: the residual bounds the error, ‖Ŷ − xW‖ ≤ ‖x(I − P)‖·‖W‖."""

    def __init__(self, inner: Linear, state: PinvState):
        self.inner, self.state = inner, state
        self.in_features, self.out_features = inner.in_features, inner.out_features
        self.bias = inner.bias
        S = state.window
        self.Xw = np.zeros((S, self.in_features))
        self.Yw = np.zeros((S, self.out_features), np.float32)   # x·W without the bias
        self.G = np.zeros((S, S))
        self.L = np.zeros((S, S))
        self.win = np.zeros(2, np.int64)                         # count, head
        self.slot_src = np.arange(S, dtype=np.int64)
        self._zero_bias = np.zeros(self.out_features, np.float32)
        self._bufs: dict[int, tuple] = {}
        state.linears.append(self)

    def reset(self) -> None:
        self.win[:] = 0
        self.slot_src[:] = np.arange(len(self.slot_src))

    def _buffers(self, T: int):
        b = self._bufs.get(T)
        if b is None:
            S = self.state.window
            b = self._bufs[T] = (np.empty(T, np.int64), np.empty((T, S)), np.empty((T, S), np.int64),
                                 np.zeros(T, np.int64), np.empty(T))
        return b

    def forward(self, x, out):
        st = self.state
        T = x.shape[0]
        exact_idx, coef, src, ncoef, resid = self._buffers(T)
        tol = st.tol if st.enabled else 0.0
        E = plan_rows(x, tol, st.ridge, self.Xw, self.G, self.L, self.win, self.slot_src, exact_idx, coef, src,
                      ncoef, resid)
        if st.enabled:
            st.stats.rows += T
            st.stats.shortcut += T - E
            if E < T:
                st.stats.repeats += int(np.count_nonzero(resid[:T][ncoef[:T] > 0] < 1e-3))
        if E == T:
            y_new = self.inner.forward(x, out)
        elif E:
            idx = exact_idx[:E]
            y_new = self.inner.forward(np.ascontiguousarray(x[idx]), np.empty((E, self.out_features), np.float32))
            out[idx] = y_new
        else:
            y_new = out[:0]
        bias = self.bias if self.bias is not None else self._zero_bias
        if E < T:  # predictions first: they may use window slots that this call's exact rows replace
            combine_rows(np.flatnonzero(ncoef[:T]), coef, src, ncoef, self.Yw, y_new, bias, out)
        if E:
            store_rows(self.slot_src, self.Yw, y_new, bias)
        return out

    @property
    def nbytes(self) -> int:
        return self.inner.nbytes


def with_pinv(model, window: int = 16, tol: float = 0.1):
    """A copy of the model whose FFN input projection (LLaMA: gate|up; GPT-2: fc) of every layer is a
    PinvLinear sharing one PinvState (model.pinv: settings and counters). Windows empty whenever a forward
    starts at position 0 (a new sequence)."""
    import copy
    if not 1 <= window <= 4096:
        raise MinirtError(f"pinv window must be between 1 and 4096 rows, got {window}")
    if not (tol >= 0 and np.isfinite(tol)):
        raise MinirtError(f"pinv tolerance must be a finite number ≥ 0, got {tol}")
    state = PinvState(window, tol)
    out = PinvModel.__new__(PinvModel)
    out.__dict__.update(model.__dict__)
    out.layers = []
    for L in model.layers:
        L2 = copy.copy(L)
        L2.up = PinvLinear(L.up.inner if isinstance(L.up, PinvLinear) else L.up, state)
        out.layers.append(L2)
    out._scratch = {}
    out.pinv = state
    return out


class PinvModel(Model):
    """A Model whose FFN input projections are PinvLinears (see with_pinv)."""

    pinv: PinvState

    def forward(self, tokens, cache, logits="last", progress=None):
        if cache.pos == 0:
            self.pinv.reset()
        return super().forward(tokens, cache, logits, progress)
