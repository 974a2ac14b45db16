"""The ISA paths of minirt/cpu: every path this machine can run computes the same integers as the portable
path and numpy; kernels on every path equal the float64 reference (exact and half formats) or llama.cpp's
int8-activation arithmetic (tests/test_quant.py's emulation); the compiled code of each path contains its
instructions; MINIRT_ISA picks the path; Numba's on-disk cache serves a second process.
Paths this CPU lacks skip, with the reason (never compiled: an AVX-512 intrinsic aborts LLVM without it)."""
from __future__ import annotations

import os
import subprocess
import sys

import numba
import numpy as np
import pytest

from minirt.cpu import isa
from minirt.cpu import qmatmul as Q
from minirt.errors import MinirtError
from minirt.linear import Quant
from tests.test_quant import int8_activation_reference, stored

HOST = isa.host_paths()
X86 = ("avx2", "avxvnni", "avx512vnni")


def runnable(path):
    if path not in HOST:
        pytest.skip(f"this CPU cannot run the {path} path (host paths: {', '.join(HOST)})")
    return isa.tag(path)


@numba.njit(cache=True)
def _int_dots(tag, q, x, nb):
    """Σ over each block pair-step of the integer dot products, per row of q (one sum per step)."""
    G = isa.blocks_per_step(tag)
    out = np.zeros((q.shape[0], nb // G), np.int32)
    for j in range(q.shape[0]):
        for b in range(0, nb, G):
            out[j, b // G] = isa.isum(isa.dot(tag, isa.wload(tag, q[j], b), isa.xload(tag, x, b * 32)))
    return out


def _int_reference(q, x, nb, G):
    """numpy: the same sums from the bytes (nibbles: low = values 0..15, high = 16..31 of a block)."""
    if q.dtype == np.uint8:
        b = q.reshape(q.shape[0], nb, 16).astype(np.int64)
        w = np.concatenate([b & 15, b >> 4], axis=2).reshape(q.shape[0], -1)
    else:
        w = q.astype(np.int64)
    p = (w * x.astype(np.int64)[None]).reshape(q.shape[0], nb // G, -1)
    return p.sum(-1)


def test_choose_and_env():
    assert isa.choose("", ["portable", "avx2"]) == "avx2"
    assert isa.choose("portable", ["portable", "avx2"]) == "portable"
    with pytest.raises(MinirtError, match="cannot run"):
        isa.choose("avx512vnni", ["portable", "avx2"])
    with pytest.raises(MinirtError, match="not a path"):
        isa.choose("sse9", ["portable"])
    assert isa.host_paths({"avx2": True, "fma": True, "f16c": True}) == ["portable", "avx2"]
    assert isa.host_paths({"avx2": True, "fma": True, "f16c": True, "avxvnni": True}) == ["portable", "avx2", "avxvnni"]
    assert isa.host_paths({"neon": True}) == ["portable"]
    assert isa.SELECTED == isa.choose()


@pytest.mark.parametrize("path", isa.PATHS)
@pytest.mark.parametrize("fmt", ["Q8_0", "Q4"])
def test_integer_dots_equal_portable_and_numpy(path, fmt):
    tag = runnable(path)
    rng = np.random.default_rng(1)
    nb = 6
    if fmt == "Q8_0":  # the extremes of both operands: pmaddubsw's i16 pairs must not saturate
        q = rng.integers(-127, 128, (64, nb * 32)).astype(np.int8)
        q[0] = -127
        q[1] = 127
    else:
        q = rng.integers(0, 256, (64, nb * 16)).astype(np.uint8)
        q[0] = 255
    x = rng.integers(-127, 128, nb * 32).astype(np.int8)
    x[:32] = -127
    x[32:64] = 127
    got = _int_dots(tag, q, x, nb)
    G = 2 if isa.path_of(tag) == "avx512vnni" else 1
    assert np.array_equal(got, _int_reference(q, x, nb, G))
    port = _int_dots(isa.tag("portable"), q, x, nb)
    assert np.array_equal(got.reshape(64, -1).sum(1), port.sum(1))


@pytest.mark.parametrize("path", isa.PATHS)
@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q4_1", "F16", "BF16"])
@pytest.mark.parametrize("T", [1, 3, 5, 16])
def test_kernels_on_every_path(path, qtype, T):
    tag = runnable(path)
    rng = np.random.default_rng(T)
    N, K = 48, 176 if qtype in ("F16", "BF16") else 192  # 176: the half kernels' lone vector step and scalar tail
    w = rng.standard_normal((N, K)).astype(np.float32)
    t = stored(w, qtype)
    lin = Quant(t)
    ref_w = lin.dequantized().astype(np.float64)
    x = rng.standard_normal((T, K)).astype(np.float32)
    dense = x.astype(np.float64) @ ref_w.T
    scale = np.abs(dense).max()
    outs = {}
    for p in ("portable", path):
        out = np.empty((T, N), np.float32)
        if lin.nb:
            xq, xde, xs, xk = lin._act_buffers(T)
            Q.quantize_x(x, xq, xde, xs)
            h, xk2 = lin._correction(xs, xk)
            Q.matmul_q(isa.tag(p), xq, xde, xk2, lin.qi, lin.di, h, out, 2)
            exact = np.empty((T, N), np.float32)  # its second term from the unrounded Σx, as Quant.forward
            h, xk2 = lin._correction(x.reshape(T, -1, 32).sum(2, dtype=np.float32), xk, exact=True)
            Q.matmul_q_exact(isa.tag(p), x, xk2, lin.qi, lin.di, h, exact, 2)
            assert np.abs(exact - dense).max() < 1e-4 * scale
        else:
            Q.matmul_half(isa.tag(p), x, lin._qn, qtype == "BF16", out, 2)
            assert np.abs(out - dense).max() < 1e-4 * scale
        outs[p] = out
    assert np.abs(outs[path] - outs["portable"]).max() < 1e-5 * scale  # the same integers, float rounding apart
    if lin.nb:
        assert np.abs(outs[path] - int8_activation_reference(t, x)).max() < 1e-4 * scale
        assert np.abs(outs[path] - dense).max() < 0.03 * scale  # what int8 activations cost


@pytest.mark.parametrize("path", isa.PATHS)
@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_1", "F16", "BF16"])
def test_a_position_has_the_same_bits_at_any_t(path, qtype):
    """Each position's result does not depend on how many positions share the call (the kernels take 8, 4, 2 or
    1 at a time): greedy speculative and Jacobi decoding stay identical to plain decoding."""
    tag = runnable(path)
    rng = np.random.default_rng(3)
    N, K = 40, 176 if qtype in ("F16", "BF16") else 128  # 176: a lone vector step and a scalar tail after the pairs
    lin = Quant(stored(rng.standard_normal((N, K)).astype(np.float32), qtype))
    x = rng.standard_normal((16, K)).astype(np.float32)

    def run(xs):
        out = np.empty((len(xs), N), np.float32)
        if not lin.nb:  # F16/BF16: positions 2 at a time, an odd last one alone
            Q.matmul_half(tag, xs, lin._qn, qtype == "BF16", out, 2)
            return out
        xq, xde, s, xk = lin._act_buffers(len(xs))
        Q.quantize_x(xs, xq, xde, s)
        h, xk = lin._correction(s, xk)
        Q.matmul_q(tag, xq, xde, xk, lin.qi, lin.di, h, out, 2)
        return out
    one = np.concatenate([run(x[t:t + 1]) for t in range(16)])
    for T in (2, 3, 5, 7, 8, 13, 16):
        assert np.array_equal(run(x[:T]), one[:T]), T


def test_fused_parts_that_end_inside_a_group():
    """Stacking matrices whose rows do not fill whole 16-row groups repacks them: the same values, and the
    kernel's rows are the parts' rows (a Stacked of mixed formats writes each part into its slice)."""
    rng = np.random.default_rng(5)
    a, b = (stored(rng.standard_normal((n, 64)).astype(np.float32), "Q4_1") for n in (40, 20))
    fused = Quant.concat([Quant(a), Quant(b)])
    assert np.array_equal(fused.dequantized(), np.concatenate([a.float32(), b.float32()]))
    x = rng.standard_normal((3, 64)).astype(np.float32)
    out, oa, ob = np.empty((3, 60), np.float32), np.empty((3, 40), np.float32), np.empty((3, 20), np.float32)
    fused.forward(x, out)
    Quant(a).forward(x, oa)
    Quant(b).forward(x, ob)
    assert np.array_equal(out, np.concatenate([oa, ob], 1))


INSTRUCTIONS = {"avx2": ["vpmaddubsw", "vpmaddwd"], "avxvnni": ["vpdpbusd"], "avx512vnni": ["vpdpbusd", "zmm"]}


def _asm(fn, *args):
    """Assembly of fn for these arguments, compiled here without the cache (Numba does not keep the assembly
    of a kernel loaded from its on-disk cache)."""
    d = numba.njit(fastmath=True)(fn.py_func)
    d(*args)
    return "\n".join(d.inspect_asm().values())


@pytest.mark.parametrize("path", isa.PATHS)
def test_compiled_code_has_the_instructions(path):
    tag = runnable(path)
    nb, R = 6, Q.ROWS
    d, xq, xde = np.zeros((1, nb * R), np.uint16), np.zeros((1, nb * 32), np.int8), np.zeros((1, nb * 8), np.float32)
    xs, xsum, dst = np.zeros((1, nb), np.float32), np.zeros((1, nb), np.int32), np.zeros((1, R), np.float32)
    asm = _asm(Q._i1, tag, np.zeros(nb * R * 16, np.uint8), d[0], d[0], xq, xde, xs, xsum, 0, nb, R * 16, 0, dst, 0)
    asm8 = _asm(Q._i1, tag, np.zeros(nb * R * 32, np.int8), d[0], d[0, :0], xq, xde, xs, xsum, 0, nb, R * 32, 0, dst, 0)
    fasm = _asm(Q._g1, tag, np.zeros((1, 64), np.uint16), 0, np.zeros((1, 64), np.float32), 0, 64, False)
    for ins in INSTRUCTIONS.get(path, []):
        # vpmaddwd plus the add of the block's starting sum: LLVM fuses them into vpdpwssd where the host has VNNI
        assert ins in asm or (ins == "vpmaddwd" and "vpdpwssd" in asm), f"{path}: no {ins} in the Q4 kernel"
        assert ins in asm8, f"{path}: no {ins} in the Q8_0 kernel"
    if path == "avx2":
        assert "vpdpbusd" not in asm and "vpsignb" in asm8  # Q8_0: |w| × (x with w's sign), as llama.cpp
    if path == "portable":
        assert "vpdpbusd" not in asm and "vpmaddubsw" not in asm
    if path in X86:
        assert "vcvtph2ps" in fasm and "vcvtph2ps" in asm  # F16C widening of weights and block scales


@pytest.mark.parametrize("path", isa.PATHS)
@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q4_1"])
def test_interleaved_layout_extremes(path, qtype):
    """The interleaved kernels' integer sums are exact at the operands' extremes (Q8_0's ±127 weights against
    ±127 activations: the VNNI paths' w+128 offset and AVX2's sign trick), for a row count that leaves a
    partly filled group, and the layout round-trips to GGUF's order."""
    tag = runnable(path)
    rng = np.random.default_rng(7)
    N, K, T = 37, 96, 5
    w = rng.standard_normal((N, K)).astype(np.float32)
    w[0], w[1, :32], w[2] = 1.0, -1.0, np.where(np.arange(K) % 2, 1.0, -1.0)
    t = stored(w, qtype)
    lin = Quant(t)
    raw = np.asarray(t.data).reshape(N, K // 32, -1)
    assert np.array_equal(lin.d, raw[:, :, :2].copy().view(np.uint16)[:, :, 0])
    assert np.array_equal(lin.qn.view(np.uint8), raw[:, :, 4 if qtype == "Q4_1" else 2:].reshape(N, -1))
    if qtype == "Q4_1":  # what the GPU upload and exports read: GGUF's order, rebuilt
        assert np.array_equal(lin.m, raw[:, :, 2:4].copy().view(np.uint16)[:, :, 0])
    x = rng.standard_normal((T, K)).astype(np.float32)
    x[0], x[1, :32], x[2] = 3.0, -3.0, np.where(np.arange(K) % 3, -2.0, 2.0)
    out = np.empty((T, N), np.float32)
    xq, xde, xs, xk = lin._act_buffers(T)
    Q.quantize_x(x, xq, xde, xs)
    h, xk = lin._correction(xs, xk)
    Q.matmul_q(tag, xq, xde, xk, lin.qi, lin.di, h, out, 2)
    ref = int8_activation_reference(t, x)
    assert np.abs(out - ref).max() < 1e-5 * np.abs(ref).max()


def test_selected_path_is_what_linear_runs():
    assert Quant(stored(np.ones((4, 64), np.float32), "Q4_1"))._tag is isa.tag()
    assert [isa.path_of(isa.tag(p)) for p in isa.PATHS] == list(isa.PATHS)
    assert isa.path_of(np.empty(3, np.int8)) is None


_CACHE_PROBE = """
import numpy as np
from minirt.cpu import isa, qmatmul as Q
T, N, nb, R = 2, 8, 4, Q.ROWS
out = np.empty((T, N), np.float32)
Q.matmul_q(isa.tag(), np.ones((T, nb * 32), np.int8), np.ones((T, nb * 8), np.float32),
           np.ones((T, nb), np.float32), np.ones((1, nb * R * 16), np.uint8), np.zeros((1, nb * R), np.uint16),
           np.zeros((1, nb * R), np.uint16), out, 1)
print(sum(Q.matmul_q.stats.cache_hits.values()), sum(Q.matmul_q.stats.cache_misses.values()))
"""


def test_on_disk_cache_serves_a_second_process():
    env = dict(os.environ)
    run = lambda: subprocess.run([sys.executable, "-c", _CACHE_PROBE], env=env, capture_output=True, text=True,
                                 check=True, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    run()  # compiles and saves, unless the cache already holds it
    hits, misses = map(int, run().stdout.split())
    assert (hits, misses) == (1, 0)


def test_cache_entry_goes_stale_when_an_intrinsic_changes(tmp_path):
    """A kernel compiled against an older isa.py must not be served after isa.py alone changed (Numba stamps
    an entry with its own file only; minirt's locator adds minirt/cpu's sources): a copy of the package, its
    own cache, one edit of isa.py."""
    import shutil
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    shutil.copytree(os.path.join(root, "minirt"), tmp_path / "minirt", ignore=shutil.ignore_patterns("__pycache__"))
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "NUMBA_CACHE_DIR": str(tmp_path / "cache")}
    run = lambda: tuple(map(int, subprocess.run([sys.executable, "-c", _CACHE_PROBE], env=env, capture_output=True,
                                                 text=True, check=True, cwd=tmp_path).stdout.split()))
    assert run() == (0, 1) and run() == (1, 0)
    with open(tmp_path / "minirt" / "cpu" / "isa.py", "a") as f:
        f.write("\n# an edit\n")
    assert run() == (0, 1)


@pytest.mark.parametrize("path", [p for p in isa.PATHS if p != "portable"])
def test_env_forces_a_lower_path(path):
    if path not in HOST:
        pytest.skip(f"this CPU cannot run the {path} path")
    code = "from minirt.cpu import isa; print(isa.SELECTED)"
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, isa.ENV: path}, capture_output=True,
                         text=True, check=True).stdout.strip()
    assert out == path
