"""Low-rank mode: the truncated SVD keeps what it promises (reconstruction bound), full rank reproduces the
dense model, the break-even rule keeps matrices dense, and bad arguments fail cleanly."""
from __future__ import annotations

import numpy as np
import pytest

from minirt import MinirtError
from minirt.linear import Dense
from minirt.lowrank import LowRank, factor, lowrank_linear, with_lowrank


@pytest.mark.parametrize("energy", [0.5, 0.8, 0.9, 0.99])
def test_reconstruction_bound(energy):
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((96, 40)) @ np.diag(np.linspace(3, 0.1, 40)) @ rng.standard_normal((40, 64))).astype(np.float32)
    u, v, kept = factor(w, energy=energy)
    err = np.linalg.norm(w.astype(np.float64) - u.astype(np.float64) @ v) ** 2
    total = np.linalg.norm(w.astype(np.float64)) ** 2
    assert kept >= energy
    assert err <= (1 - energy) * total + 1e-4 * total
    assert np.isclose(err, (1 - kept) * total, rtol=1e-3, atol=1e-4 * total)  # Eckart–Young: the rest is the error
    if u.shape[1] > 1:  # one rank fewer would not have reached the energy
        u2, v2, kept2 = factor(w, rank=u.shape[1] - 1)
        assert kept2 < energy


def test_lowrank_linear_matches_factors():
    rng = np.random.default_rng(1)
    u, v = rng.standard_normal((48, 6)).astype(np.float32), rng.standard_normal((6, 80)).astype(np.float32)
    lin = LowRank(u, v, np.ones(48, np.float32))
    for T in (1, 3, 20):
        x = rng.standard_normal((T, 80)).astype(np.float32)
        out = np.empty((T, 48), np.float32)
        lin.forward(x, out)
        assert np.abs(out - (x.astype(np.float64) @ (u @ v).T.astype(np.float64) + 1)).max() < 1e-3
    assert lin.nbytes == (48 * 6 + 6 * 80 + 48) * 4


def test_break_even_keeps_dense():
    w = np.random.default_rng(2).standard_normal((64, 64)).astype(np.float32)  # flat spectrum
    lin, f = lowrank_linear(Dense(w), "w", energy=0.99)
    assert isinstance(lin, Dense) and f.rank == 0
    lin, f = lowrank_linear(Dense(w), "w", rank=8)  # 8·128 < 64·64: factored
    assert isinstance(lin, LowRank) and f.rank == 8


def test_full_rank_reproduces_dense_logits(smollm2):
    small = smollm2.truncated(2)  # two layers keep the SVDs quick
    full = with_lowrank(small, energy=1.0, force=True)
    assert all(f.rank for f in full.lowrank)
    ids = smollm2.tokenizer.encode("Low rank at full rank is the same model.")
    a, b = small.logits(ids), full.logits(ids)
    assert np.abs(a - b).max() < 2e-2 * np.abs(a).max()
    assert (a.argmax(-1) == b.argmax(-1)).all()


def test_energy_trades_size_for_accuracy(smollm2):
    small = smollm2.truncated(2)
    ids = smollm2.tokenizer.encode("The quality of a low-rank model drops as the energy kept drops.")
    ref = small.logits(ids)
    errs, sizes = [], []
    for e in (0.999, 0.6):
        m = with_lowrank(small, energy=e)
        errs.append(np.abs(m.logits(ids) - ref).mean())
        sizes.append(sum(f.rank * sum(f.shape) if f.rank else f.shape[0] * f.shape[1] for f in m.lowrank))
    assert errs[0] < errs[1]
    assert sizes[0] > sizes[1]


@pytest.mark.parametrize("kw", [dict(energy=0), dict(energy=1.5), dict(rank=0), dict(rank=1000),
                                dict(energy=0.5, rank=3), dict()])
def test_bad_arguments(kw):
    with pytest.raises(MinirtError):
        factor(np.ones((8, 8), np.float32), **kw)
