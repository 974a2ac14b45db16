"""The compiled decode step (minirt/cpu/step.py) gives the per-operation path's logits, bit for bit (it runs
the same kernels), for every architecture's traits and every matrix format; and it steps aside for what it
does not cover (model.step_fallback_reason)."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import minirt
import minirt.model as M
from minirt.arch import TRAITS, Traits
from minirt.config import ModelConfig
from minirt.linear import Dense
from minirt.readers.base import Checkpoint, Tensor, TokenizerSpec

from .test_quant import stored

VOCAB, DIM, HEADS, KV, HD, HIDDEN, LAYERS = 97, 64, 4, 2, 16, 96, 3  # HIDDEN: an odd number of blocks (3)
# formats per layer: every kernel (and F32: Dense) appears; a model of one format per file, as users have
MIXES = {"mixed": ["Q4_1", "Q8_0", "Q4_0", "F16", "BF16", "F32"], "Q4_1": ["Q4_1"], "Q8_0": ["Q8_0"], "F32": ["F32"]}


def random_checkpoint(arch: str, formats: list[str], seed: int = 0) -> Checkpoint:
    """A random model of arch's traits in minirt's canonical names, matrices stored in the given formats
    (taken in turn, one per matrix)."""
    tr = TRAITS[arch]
    n_layers = LAYERS  # Gemma 3: sliding-window layers only (as an early-exit drafter of ≤ 5 layers has)
    cfg = ModelConfig(arch, vocab_size=VOCAB, dim=DIM, n_layers=n_layers, n_heads=HEADS,
                      n_kv_heads=HEADS if tr.fused_qkv else KV, head_dim=HD, hidden_dim=HIDDEN, max_ctx=128,
                      norm_eps=1e-6, rope_theta=10000.0, sliding_window=8 if tr.swa_pattern else 0,
                      rope_local_theta=1000.0, attn_scale=0.2 if arch == "gemma3" else None)
    rng = np.random.default_rng(seed)
    fmt = iter(formats * 100)

    def f(*shape, scale=None, mean=0.0):
        scale = shape[-1] ** -0.5 if scale is None else scale
        return (mean + rng.normal(0, scale, shape)).astype(np.float32)

    def mat(*shape):
        q = next(fmt)
        w = f(*shape)
        return Tensor(w, "F32", shape) if q == "F32" else stored(w, q)

    def vec(n, scale=0.1, mean=0.0):
        return Tensor(f(n, scale=scale, mean=mean), "F32", (n,))

    t = {"embed": Tensor(f(VOCAB, DIM, scale=1.0), "F32", (VOCAB, DIM)), "norm.weight": vec(DIM, mean=1.0)}
    if tr.norm == "layer":
        t["norm.bias"] = vec(DIM)
    if not tr.rope:
        t["pos_embed"] = Tensor(f(cfg.max_ctx, DIM, scale=0.1), "F32", (cfg.max_ctx, DIM))
    kv = cfg.n_kv_heads * HD
    for i in range(n_layers):
        p = f"layers.{i}."
        norms = ["attn_norm", "ffn_norm"] + (["post_attn_norm", "post_ffn_norm"] if tr.post_norms else [])
        for n in norms:
            t[p + n + ".weight"] = vec(DIM, mean=1.0)
            if tr.norm == "layer":
                t[p + n + ".bias"] = vec(DIM)
        if tr.fused_qkv:
            t[p + "wqkv"] = mat(HEADS * HD + 2 * kv, DIM)
        else:
            q = next(fmt)
            for n, rows in (("wq", HEADS * HD), ("wk", kv), ("wv", kv)):
                w = f(rows, DIM)
                t[p + n] = Tensor(w, "F32", w.shape) if q == "F32" else stored(w, q)
        t[p + "wo"] = mat(DIM, HEADS * HD)
        if tr.ffn == "gelu":
            t[p + "w_up"] = mat(HIDDEN, DIM)
        elif tr.fused_up:  # gate|up stored as one matrix (Phi-3)
            t[p + "w_up"] = mat(2 * HIDDEN, DIM)
        else:
            q = next(fmt)
            for n in ("w_gate", "w_up"):
                w = f(HIDDEN, DIM)
                t[p + n] = Tensor(w, "F32", w.shape) if q == "F32" else stored(w, q)
        t[p + "w_down"] = mat(DIM, HIDDEN)
        if tr.qk_norm:
            t[p + "q_norm"], t[p + "k_norm"] = vec(HD, mean=1.0), vec(HD, mean=1.0)
        if arch == "qwen2":  # Q/K/V biases: the step adds each matrix's bias
            for n, rows in (("bq", HEADS * HD), ("bk", kv), ("bv", kv)):
                t[p + n] = vec(rows)
        if arch == "gpt2":
            for n, rows in (("bqkv", HEADS * HD + 2 * kv), ("bo", DIM), ("b_up", HIDDEN), ("b_down", DIM)):
                t[p + n] = vec(rows)
    return Checkpoint(cfg, t, TokenizerSpec("none"), None)


def both_paths(model, ids, prefix, monkeypatch=None):
    """Logits of ids (all rows) after prefix, per operation and compiled, and how often the step ran for ids."""
    runs = []
    real = M.StepTable.run

    def spy(self, *a):
        runs.append(1)
        return real(self, *a)
    out = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(M.StepTable, "run", spy)
        for compiled in (False, True):
            model.compiled_step = compiled
            cache = model.new_cache(len(prefix) + len(ids))
            model.forward(prefix, cache)
            runs.clear()
            out.append(model.forward(ids, cache, logits="all"))
    del model.compiled_step
    return out[0], out[1], len(runs)


@pytest.fixture(scope="module", params=[(a, m) for a in sorted(TRAITS) for m in MIXES],
                ids=lambda p: f"{p[0]}-{p[1]}")
def model(request):
    arch, mix = request.param
    return minirt.Model.from_checkpoint(random_checkpoint(arch, MIXES[mix]))


@pytest.mark.parametrize("T", [1, 2, 5, 16])
def test_compiled_step_equals_per_operation(model, T):
    assert M.step_fallback_reason(model) is None
    rng = np.random.default_rng(T)
    ids = rng.integers(0, VOCAB, T)
    prefix = rng.integers(0, VOCAB, 11)  # past the sliding window (8): the window matters
    per_op, compiled, runs = both_paths(model, ids, prefix)
    dense = any(type(getattr(L, n)) is Dense for L in model.layers for n in ("qkv", "wo", "up", "down"))
    assert runs == (0 if dense and T == 16 else 1)  # Dense switches to BLAS at 16 rows: the per-op path runs
    np.testing.assert_array_equal(compiled, per_op)
    assert np.isfinite(compiled).all() and compiled.std() > 0.1


def test_smollm2_compiled_step_equals_per_operation(smollm2_fast):
    assert M.step_fallback_reason(smollm2_fast) is None
    ids = smollm2_fast.tokenizer.encode("The compiled step")
    for T in (1, 4):
        per_op, compiled, runs = both_paths(smollm2_fast, ids[:T], ids)
        assert runs == 1
        np.testing.assert_array_equal(compiled, per_op)


def test_exact_models_go_per_operation(smollm2):
    assert "exact" in M.step_fallback_reason(smollm2)
    _, _, runs = both_paths(smollm2, [1], [1, 2])
    assert runs == 0


def test_unknown_linear_and_swapped_linear():
    m = minirt.Model.from_checkpoint(random_checkpoint("llama", MIXES["Q8_0"]))
    ids, prefix = [3, 4], [5, 6, 7]
    before = both_paths(m, ids, prefix)[1]
    # a mode swaps a Linear after the table was built: the table follows (here: the same matrix, dequantized)
    L = m.layers[1]
    L.up = Dense(L.up.dequantized())
    per_op, compiled, runs = both_paths(m, ids, prefix)
    assert runs == 1
    np.testing.assert_array_equal(compiled, per_op)
    assert not np.array_equal(compiled, before)  # float32 activations in that matrix now: not the same bits

    class Other(Dense):  # a Linear kind the step does not know (low-rank, pinv, K-quants …)
        pass
    L.wo = Other(L.wo.dequantized())
    assert "layer 1 wo: Other" == M.step_fallback_reason(m)
    assert both_paths(m, ids, prefix)[2] == 0


@pytest.mark.parametrize("storage", ["F32", "Q8_0", "F16"])
def test_lowrank_factors_run_in_the_step(storage):
    """Low-rank matrices (modes/lowrank.py) are two thin matrices in the table: the step runs them, with the
    per-operation path's bits, whatever the factors are stored in (here beside Q4_1 matrices left whole)."""
    from minirt.modes.lowrank import LowRank, with_lowrank
    m = minirt.Model.from_checkpoint(random_checkpoint("llama", MIXES["Q4_1"]))
    lr = with_lowrank(m, energy=0.9, storage=storage, force=True)
    kinds = {type(getattr(L, n)) for L in lr.layers for n in ("qkv", "wo", "up", "down")}
    assert LowRank in kinds
    assert M.step_fallback_reason(lr) is None
    rng = np.random.default_rng(1)
    for T in (1, 5):
        per_op, compiled, runs = both_paths(lr, rng.integers(0, VOCAB, T), rng.integers(0, VOCAB, 9))
        assert runs == 1
        np.testing.assert_array_equal(compiled, per_op)
        plain = both_paths(m, rng.integers(0, VOCAB, T), rng.integers(0, VOCAB, 9))[0]
        assert np.isfinite(compiled).all() and not np.array_equal(compiled, plain)


def test_lowrank_with_a_factor_the_step_does_not_run_goes_per_operation():
    """Each factor is checked: a low-rank matrix whose U is of a kind the step lacks takes the per-op path."""
    from minirt.modes.lowrank import LowRank, with_lowrank
    lr = with_lowrank(minirt.Model.from_checkpoint(random_checkpoint("llama", MIXES["Q4_1"])), energy=0.9,
                      storage="F32", force=True)
    L = next(L for L in lr.layers if type(L.up) is LowRank)

    class Other(Dense):
        pass
    L.up.u = Other(L.up.u.w)
    assert "up: Other" in M.step_fallback_reason(lr)
    assert both_paths(lr, [1, 2], [3])[2] == 0


def test_trait_fields_the_step_does_not_know(monkeypatch):
    @dataclasses.dataclass(frozen=True)
    class Later(Traits):
        attn_bias: bool = False  # a field added later (arch16): off = the step still applies
    m = minirt.Model.from_checkpoint(random_checkpoint("llama", MIXES["Q4_1"]))
    monkeypatch.setitem(TRAITS, "llama", Later())
    assert M.step_fallback_reason(m) is None
    monkeypatch.setitem(TRAITS, "llama", Later(attn_bias=True))
    assert "attn_bias" in M.step_fallback_reason(m)
    assert both_paths(m, [1, 2], [3])[2] == 0


def test_step_off_by_environment(tmp_path):
    import subprocess
    import sys
    code = "import minirt.model as M; print(M.Model.compiled_step)"
    env = {**__import__("os").environ, "MINIRT_STEP": "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_gemma3_k_quants_go_per_operation():
    """The real Gemma 3 Q4_K_M: its K-quant matrices (KQuant, Stacked) have no place in the step's table yet, so
    it takes the per-operation path (Gemma 3's traits in the step: the random gemma3 models above)."""
    from minirt.registry import pull
    g = minirt.load(pull("gemma3-270m"))
    assert M.step_fallback_reason(g) == "layer 0 qkv: Stacked"
    ids = g.tokenizer.encode("A compiled step for Gemma")
    per_op, compiled, runs = both_paths(g, ids[:3], ids)
    assert runs == 0
    np.testing.assert_array_equal(compiled, per_op)


def test_read_only_matrices_among_writable_ones():
    """Matrices mapped from a file are read-only arrays; the table holds them beside writable ones."""
    ck = random_checkpoint("llama", MIXES["F32"])
    for name, t in ck.tensors.items():
        if name.startswith("layers.0.") and t.data.ndim == 2:
            t.data.flags.writeable = False
    m = minirt.Model.from_checkpoint(ck)
    assert not m.layers[0].wo.w.flags.writeable and m.layers[1].wo.w.flags.writeable
    per_op, compiled, runs = both_paths(m, [1, 2, 3], [4, 5])
    assert runs == 1
    np.testing.assert_array_equal(compiled, per_op)


ACTIVATIONS = """
import sys
import numpy as np
from minirt.cpu import kernels
rng = np.random.default_rng(0)
gu = (rng.standard_normal((3, 2 * 1536)) * 4).astype(np.float32)
outs = [np.zeros((3, 1536), np.float32) for _ in range(4)]
kernels.geglu(gu, outs[0])               # parallel, as the step and Model._layers call it
for t in range(3):
    kernels.geglu_row(gu[t], outs[1][t])  # one row at a time
kernels.gelu_new(gu[:, :1536], outs[2])
kernels.swiglu(gu, outs[3])
sys.stdout.write(np.stack(outs).tobytes().hex())
"""


def test_activations_same_bits_compiled_or_cached(tmp_path):
    """The FFN activations give the same bits in a process that compiles them (into an empty Numba cache)
    and in one that loads them from that cache, and the same bits parallel or row by row: greedy text must
    not depend on whether the cache was warm. (libm's tanhf in the parallel geglu did: Gemma 3's greedy text
    changed between a first and a second run.) And they are the float64 functions within float32 rounding."""
    import os
    import subprocess
    import sys
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path))
    runs = [subprocess.run([sys.executable, "-c", ACTIVATIONS], env=env, capture_output=True, text=True, check=True)
            for _ in range(2)]
    compiled, cached = (np.frombuffer(bytes.fromhex(r.stdout), np.float32).reshape(4, 3, 1536) for r in runs)
    assert compiled.tobytes() == cached.tobytes()
    assert compiled[0].tobytes() == compiled[1].tobytes()  # parallel == row by row
    gu = (np.random.default_rng(0).standard_normal((3, 2 * 1536)) * 4).astype(np.float32).astype(np.float64)
    g, up = gu[:, :1536], gu[:, 1536:]
    gelu = 0.5 * g * (1 + np.tanh(np.sqrt(2 / np.pi) * (g + 0.044715 * g ** 3)))
    for got, ref in ((compiled[0], gelu * up), (compiled[2], gelu), (compiled[3], g / (1 + np.exp(-g)) * up)):
        np.testing.assert_allclose(got, ref, rtol=2e-6, atol=1e-6 * np.abs(ref).max())
