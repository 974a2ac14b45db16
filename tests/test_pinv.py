"""The pinv transition against independent float64 linear algebra (numpy's pinv and projector)."""
from __future__ import annotations

import numpy as np
import pytest

from minirt.modes.pinv import transition

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


# ---- PinvLinear: the transition as a Linear, with a window of exactly computed rows ------------------------
from minirt.linear import Dense  # noqa: E402
from minirt.modes.pinv import PinvLinear, PinvState  # noqa: E402


def pinv_dense(S, tol, seed=0, bias=True):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((N, H)).astype(np.float32)
    b = rng.standard_normal(N).astype(np.float32) if bias else None
    st = PinvState(S, tol)
    return PinvLinear(Dense(w, b), st), w.astype(np.float64), (b if bias else np.zeros(N)).astype(np.float64), rng


def run(lin, x):
    out = np.empty((len(x), lin.out_features), np.float32)
    return lin.forward(np.ascontiguousarray(x, dtype=np.float32), out)


def test_linear_exact_inside_the_window_row_space():
    lin, w, b, rng = pinv_dense(8, 0.5)
    x = rng.standard_normal((8, H)).astype(np.float32)
    for i in range(8):                               # random rows in 64 dimensions: each is computed exactly
        assert np.allclose(run(lin, x[i:i + 1])[0], x[i] @ w.T + b, atol=1e-4)
    assert lin.state.stats.shortcut == 0
    x_new = (rng.standard_normal((5, 8)) @ x).astype(np.float32)   # inside the window's row space
    got = run(lin, x_new)
    assert lin.state.stats.shortcut == 5
    want = x_new.astype(np.float64) @ w.T + b
    assert np.abs(got - want).max() < 1e-4 * np.abs(want).max()


def test_linear_error_is_the_residual_term():
    lin, w, b, rng = pinv_dense(6, 0.9, seed=1)
    x = rng.standard_normal((6, H)).astype(np.float32)
    run(lin, x)                                       # six exact rows fill the window
    x_new = (x[2] + 0.2 * rng.standard_normal(H)).astype(np.float32)[None]
    got = run(lin, x_new).astype(np.float64)
    assert lin.state.stats.shortcut == 1
    xd = x.astype(np.float64)
    proj = np.linalg.pinv(xd) @ xd                    # numpy's projector on the window's row space
    outside = x_new.astype(np.float64) @ (np.eye(H) - proj)
    want = x_new.astype(np.float64) @ w.T + b
    assert np.allclose(got - want, -outside @ w.T, atol=1e-4 * np.abs(want).max())
    resid = lin._buffers(1)[4][0]
    assert resid == pytest.approx(np.linalg.norm(outside) / np.linalg.norm(x_new), rel=1e-4)


def test_linear_batch_equals_row_by_row():
    """One call over T rows decides and predicts exactly as T calls of one row, also when exact rows of the
    same call overwrite window slots that earlier predictions used (T > S)."""
    rng = np.random.default_rng(7)
    base = rng.standard_normal((3, H))
    x = np.vstack([rng.standard_normal((2, 3)) @ base + 0.05 * rng.standard_normal((2, H)) if i % 2 else
                   rng.standard_normal((1, H)) for i in range(12)]).astype(np.float32)
    a, _, _, _ = pinv_dense(3, 0.4, seed=3)
    b, _, _, _ = pinv_dense(3, 0.4, seed=3)
    batch = run(a, x)
    rows = np.vstack([run(b, x[i:i + 1]) for i in range(len(x))])
    assert 0 < a.state.stats.shortcut < len(x) and a.state.stats.shortcut == b.state.stats.shortcut
    assert np.allclose(batch, rows, atol=1e-4)


def test_linear_degenerate_rows_stay_finite():
    lin, w, b, rng = pinv_dense(4, 1.0, seed=5)
    x = rng.standard_normal((1, H)).astype(np.float32)
    got = run(lin, np.vstack([np.zeros((2, H)), x, x, x, 2 * x, np.zeros((1, H))]))  # zeros, duplicates
    assert np.isfinite(got).all()
    assert np.allclose(got[:2], b, atol=1e-5) and np.allclose(got[-1], b, atol=1e-5)
    want = (2 * x.astype(np.float64)) @ w.T + b
    assert np.abs(got[5] - want[0]).max() < 1e-3 * np.abs(want).max()
    assert lin.win[0] == 1                            # the duplicates were predicted, not added


# ---- in the model --------------------------------------------------------------------------------------------
def test_tol_zero_equals_dense(smollm2_fast):
    from minirt.modes.pinv import with_pinv
    pm = with_pinv(smollm2_fast, 16, 0.0)
    prompt = "The old man walked slowly along the river and"
    a = smollm2_fast.generate(prompt, max_tokens=16, temperature=0)
    a.text()
    b = pm.generate(prompt, max_tokens=16, temperature=0, mode="pinv")
    b.text()
    assert b.stats.tokens == a.stats.tokens
    assert pm.pinv.stats.rows > 0 and pm.pinv.stats.shortcut == 0
    ids = smollm2_fast.tokenizer.encode(prompt)
    assert np.array_equal(pm.logits(ids), smollm2_fast.logits(ids))


def test_tolerance_predicts_rows_and_bounds_the_error(smollm2):
    """A loose tolerance predicts some rows; every logit row stays finite, and the first position (empty
    windows: computed exactly, float32 kernels) equals dense."""
    from minirt.modes.pinv import with_pinv
    pm = with_pinv(smollm2, 16, 0.6)
    ids = smollm2.tokenizer.encode("one two three four five six seven eight nine ten one two three four")
    got, want = pm.logits(ids), smollm2.logits(ids)
    assert 0 < pm.pinv.stats.fraction < 1
    assert np.isfinite(got).all()
    assert np.abs(got[0] - want[0]).max() < 2e-3
    assert np.abs(got - want).max() > 1e-2            # and the predicted rows did change something


def test_mode_pinv_needs_the_transition(smollm2_fast):
    import minirt
    with pytest.raises(minirt.MinirtError, match="with_pinv"):
        smollm2_fast.generate("hi", mode="pinv")
    from minirt.modes.pinv import with_pinv
    with pytest.raises(minirt.MinirtError, match="window"):
        with_pinv(smollm2_fast, 0, 0.1)
    with pytest.raises(minirt.MinirtError, match="tolerance"):
        with_pinv(smollm2_fast, 8, float("nan"))


def tiny_gpt2(dim=16, hidden=64, layers=2, vocab=40, seed=0):
    """A random GPT-2 (LayerNorm, biases everywhere, fc + gelu) small enough that a window of `dim` rows spans
    every FFN input."""
    from minirt.config import ModelConfig
    from minirt.model import Model
    from minirt.readers.base import Checkpoint, Tensor, TokenizerSpec
    rng = np.random.default_rng(seed)
    cfg = ModelConfig("gpt2", vocab_size=vocab, dim=dim, n_layers=layers, n_heads=2, n_kv_heads=2, head_dim=dim // 2,
                      hidden_dim=hidden, max_ctx=128, norm_eps=1e-5)

    def t(*shape, scale=0.5):
        return Tensor(rng.normal(0, scale, shape).astype(np.float32), "F32", shape)
    tensors = {"embed": t(vocab, dim, scale=1.0), "pos_embed": t(128, dim, scale=0.3),
               "norm.weight": t(dim, scale=1.0), "norm.bias": t(dim, scale=0.1)}
    for i in range(layers):
        p = f"layers.{i}."
        tensors |= {p + "attn_norm.weight": t(dim, scale=1.0), p + "attn_norm.bias": t(dim, scale=0.1),
                    p + "ffn_norm.weight": t(dim, scale=1.0), p + "ffn_norm.bias": t(dim, scale=0.1),
                    p + "wqkv": t(3 * dim, dim), p + "bqkv": t(3 * dim, scale=0.1), p + "wo": t(dim, dim),
                    p + "bo": t(dim, scale=0.1), p + "w_up": t(hidden, dim), p + "b_up": t(hidden, scale=0.5),
                    p + "w_down": t(dim, hidden), p + "b_down": t(dim, scale=0.1)}
    return Model.from_checkpoint(Checkpoint(cfg, tensors, TokenizerSpec("none"), None))


@pytest.mark.parametrize("one_call", [True, False])
def test_gpt2_fc_predicted_exactly_once_the_window_spans_the_inputs(one_call):
    """GPT-2's fc (with bias): once S = H exact rows fill a layer's window, every later input lies in their
    row space, so rows are predicted and the logits still equal dense ones, in one call or one token a step."""
    from minirt.modes.pinv import with_pinv
    m = tiny_gpt2()
    pm = with_pinv(m, 16, 1e-3)
    ids = list(np.random.default_rng(1).integers(0, 40, 60))
    want = m.logits(ids)
    if one_call:
        got = pm.logits(ids)
    else:
        cache = pm.new_cache(len(ids))
        got = np.vstack([pm.forward([i], cache) for i in ids])
    assert pm.pinv.stats.fraction > 0.5
    assert np.abs(got - want).max() < 1e-3 * np.abs(want).max()
