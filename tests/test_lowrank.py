"""Low-rank mode: the truncated SVD keeps what it promises (reconstruction bound), full rank reproduces the
dense model, the break-even rule keeps matrices dense, and bad arguments fail cleanly."""
from __future__ import annotations

import numpy as np
import pytest

from minirt import MinirtError
from minirt.linear import Dense
from minirt.modes.lowrank import LowRank, factor, lowrank_linear, with_lowrank


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


# ---- activation-aware factors, parameter ratios, exports ----------------------------------------------
def test_activation_aware_minimises_error_on_activations():
    """SVD-LLM factors are optimal in the norm of the calibration activations (Eckart–Young in the whitened
    space): at every rank their output error ‖(W − W_r)Xᵀ‖ is no larger than plain SVD's, and smaller when
    the activations are far from isotropic, while plain SVD wins in the plain Frobenius norm."""
    from minirt.modes.lowrank import SVD
    rng = np.random.default_rng(3)
    w = rng.standard_normal((48, 32))
    x = rng.standard_normal((400, 32)) * np.logspace(0, -2, 32)  # a few input directions dominate
    plain, aware = SVD(w), SVD(w, x.T @ x, damping=1e-9)
    for r in (2, 8, 16):
        ep, ea = (np.linalg.norm((w - np.matmul(*d.factors(r)).astype(np.float64)) @ x.T) for d in (plain, aware))
        fp, fa = (np.linalg.norm(w - np.matmul(*d.factors(r)).astype(np.float64)) for d in (plain, aware))
        assert ea < 0.9 * ep
        sv = np.linalg.svd(w @ np.linalg.cholesky(x.T @ x), compute_uv=False)  # the rank-r optimum, directly
        assert np.isclose(ea, np.sqrt((sv[r:] ** 2).sum()), rtol=1e-4)
        assert fp <= fa
        # the energy reported is the share of the output energy kept: 1 − error² / ‖W Xᵀ‖²
        assert np.isclose(aware.energy(r), 1 - ea ** 2 / np.linalg.norm(w @ x.T) ** 2, atol=1e-3)


def test_params_ratio_sets_ranks():
    from minirt.modes.lowrank import SVD
    d = SVD(np.random.default_rng(4).standard_normal((96, 64)))
    for p in (0.3, 0.5, 0.9):
        r = d.rank(params=p)
        assert r == int(p * 96 * 64 / 160) and r * 160 <= p * 96 * 64
    assert d.rank(params=0.5, multiple=32) == 32  # block storage rounds up to whole blocks (19 → 32)


@pytest.fixture(scope="module")
def tiny_llama_gguf(tmp_path_factory):
    from .test_parity import make_llama, write_llama_gguf
    path = tmp_path_factory.mktemp("lr") / "tiny.gguf"
    write_llama_gguf(path, make_llama(tied=True))
    return path


@pytest.mark.parametrize("storage", ["F32", "F16", "Q8_0"])
def test_export_load_round_trip(storage, tiny_llama_gguf, tmp_path):
    """minirt svd's folder loads back (by path) as the same model: identical logits, same ranks."""
    import json

    import gguf

    import minirt
    from minirt.modes.lowrank import export
    base = minirt.load(tiny_llama_gguf)
    m = with_lowrank(base, params=0.4, storage=storage, head=True, force=True)
    out = export(m, tmp_path / "tiny-lr", progress=False)
    back = minirt.load(out)
    ids = list(range(1, 40, 3))
    assert np.array_equal(m.logits(ids), back.logits(ids))
    assert [(f.name, f.rank) for f in back.lowrank] == [(f.name, f.rank) for f in m.lowrank]
    assert isinstance(back.head, LowRank) and isinstance(back.layers[1].up, LowRank)
    man = json.loads((out / "lowrank.json").read_text())
    assert man["storage"] == storage and man["params"] == 0.4 and len(man["matrices"]) == 9
    names = {t.name: t for t in gguf.GGUFReader(str(out / "model.gguf")).tensors}
    assert "blk.0.attn_q.weight" not in names and "blk.0.qkv.lr_u" in names and "output.lr_v" in names
    assert names["blk.1.down.lr_v"].tensor_type.name == storage
    assert not list(tmp_path.glob("tiny-lr.part*"))


def test_export_refuses_non_empty_folder(tiny_llama_gguf, tmp_path):
    import minirt
    from minirt.modes.lowrank import export
    m = with_lowrank(minirt.load(tiny_llama_gguf), rank=4)
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "keep.txt").write_text("mine")
    with pytest.raises(MinirtError, match="not an empty folder"):
        export(m, tmp_path / "x", progress=False)
    assert (tmp_path / "x" / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize("args,needle", [
    (["--energy", "0"], "energy must be in (0, 1]"),
    (["--energy", "1.5"], "energy must be in (0, 1]"),
    (["--params", "2"], "params ratio"),
    (["--rank", "65"], "larger than min(n, m) = 64"),
    (["--energy", "0.9", "--rank", "3"], "exactly one"),
    ([], "exactly one"),
    (["--energy", "0.9", "--calibration", "no-such-file.txt"], "calibration file"),
    (["--rank", "4", "-o", "{tiny}/x"], "not a folder"),   # checked before any work
])
def test_svd_cli_bad_arguments(args, needle, tiny_llama_gguf, tmp_path):
    from .test_errors_and_fetch import assert_one_line_error, run_cli
    args = [a.replace("{tiny}", str(tiny_llama_gguf)) for a in args]
    r = run_cli("svd", tiny_llama_gguf, "-o", tmp_path / "out", *args)
    assert_one_line_error(r, needle)
    assert not (tmp_path / "out").exists()


def test_svd_cli_export_then_generate(tiny_llama_gguf, tmp_path):
    from .test_errors_and_fetch import assert_one_line_error, run_cli
    calib = tmp_path / "calib.txt"
    calib.write_text("calibration text " * 50)
    r = run_cli("svd", tiny_llama_gguf, "--params", "0.5", "-o", tmp_path / "lr", "--calibration", calib)
    assert r.returncode == 1 and "tokenizer" in r.stderr  # the tiny GGUF has no tokenizer to read text with
    r = run_cli("svd", tiny_llama_gguf, "--params", "0.5", "-o", tmp_path / "lr")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "lr" / "model.gguf").is_file() and "8 of 8 layer matrices factored" in r.stderr
    r = run_cli("perplexity", "-m", tmp_path / "lr", "-f", calib, "--mode", "lowrank", "--energy", "0.5")
    assert_one_line_error(r, "low-rank export already")
    r = run_cli("perplexity", "-m", tmp_path / "lr", "-f", calib, "--mode", "lowrank", "--factor-type", "F16")
    assert_one_line_error(r, "low-rank export already")
