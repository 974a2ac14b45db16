"""K-quant and 5-bit kernels on the stored blocks (minirt/cpu/kquants.py, linear.KQuant/Stacked) against independent
references: the gguf package's dequantizer (bit for bit, on random blocks: every byte pattern of the quants and
scales), float64 matmuls of those dequantized weights (the exact path, and the batched BLAS path), a numpy emulation
of the int8-activation arithmetic (x rounded to int8 per block of 32: the result must be Σ w·x̂), every ISA path the
machine has against the portable one, and Gemma 3 (a real Q4_K_M mix) against the same file expanded to float32."""
from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType, quants

from minirt.cpu import isa, kquants
from minirt.linear import Dense, KQuant, Quant, Stacked, make_linear
from minirt.readers.base import Tensor

KTYPES = list(kquants.FORMATS)  # Q5_0 Q5_1 Q2_K Q3_K Q4_K Q5_K Q6_K
F16_FIELDS = {"Q5_0": [0], "Q5_1": [0, 2], "Q2_K": [80, 82], "Q3_K": [108], "Q4_K": [0, 2], "Q5_K": [0, 2],
              "Q6_K": [208]}  # byte offsets of the f16 scales in a block (llama.cpp's block_qK structs)


def random_tensor(qtype: str, N: int, K: int, seed: int = 0) -> Tensor:
    """Random stored blocks: random bytes everywhere, finite f16 scales of a realistic size."""
    rng = np.random.default_rng(seed)
    _, per, size = kquants.FORMATS[qtype]
    raw = rng.integers(0, 256, (N, K // per, size), dtype=np.uint8)
    for o in F16_FIELDS[qtype]:
        d = (rng.standard_normal((N, K // per)) * 0.01).astype(np.float16)
        raw[..., o:o + 2] = d.view(np.uint8).reshape(N, K // per, 2)
    return Tensor(raw.reshape(N, -1), qtype, (N, K))


def gguf_dequantized(t: Tensor) -> np.ndarray:
    return quants.dequantize(t.data, GGMLQuantizationType[t.qtype]).reshape(t.shape)


def int8_reference(w: np.ndarray, x: np.ndarray) -> np.ndarray:
    """llama.cpp's arithmetic in float64: x rounded to int8 per block of 32 (scale max|x|/127); the offsets meet
    the rounded activations too (llama.cpp's bsums), so the result is the dequantized weights times x̂."""
    T = x.shape[0]
    xb = x.reshape(T, -1, 32).astype(np.float64)
    xd = np.abs(xb).max(-1, keepdims=True) / 127
    xh = np.round(xb / np.where(xd > 0, xd, 1)) * xd
    return xh.reshape(T, -1) @ w.T.astype(np.float64)


@pytest.mark.parametrize("qtype", KTYPES)
def test_dequantize_equals_gguf_bit_for_bit(qtype):
    t = random_tensor(qtype, 12, 768 if qtype.endswith("K") else 96)
    lin = KQuant(t)
    want = gguf_dequantized(t)
    assert np.array_equal(lin.dequantized().view(np.uint32), want.view(np.uint32))
    assert np.array_equal(lin.rows([5, 0, 5]).view(np.uint32), want[[5, 0, 5]].view(np.uint32))
    assert lin.nbytes == t.data.nbytes  # the stored bytes, nothing more


@pytest.mark.parametrize("qtype", KTYPES)
@pytest.mark.parametrize("T", [1, 3, 7, 16, 24])
@pytest.mark.parametrize("exact", [False, True])
def test_kernels_equal_references(qtype, T, exact):
    K = 512 if qtype.endswith("K") else 160  # 160: an odd number of blocks (no 2-block steps)
    t = random_tensor(qtype, 40, K, seed=T)
    w = gguf_dequantized(t)
    rng = np.random.default_rng(T)
    x = rng.standard_normal((T, K)).astype(np.float32)
    x[:, 5] *= 10  # an outlier, as real activations have
    bias = np.linspace(-1, 1, 40).astype(np.float32)
    out = make_linear([t], [Tensor(bias, "F32", (40,))], exact=exact).forward(x, np.empty((T, 40), np.float32))
    dense = x.astype(np.float64) @ w.T.astype(np.float64) + bias
    scale = np.abs(dense).max()
    if exact:
        assert np.abs(out - dense).max() < 1e-5 * scale  # float32 rounding only
    else:  # int8 activations at any T: prompts take the decode kernels
        assert np.abs(out - (int8_reference(w, x) + bias)).max() < 1e-5 * scale
        assert np.abs(out - dense).max() < 0.05 * scale  # what int8 activations cost


OTHER_PATHS = [p for p in isa.host_paths() if p != "portable"]


# Gemma's formats (signed in-loop scales: Q5_0, Q6_K; per-row scales and offsets: Q4_K) by default; the others
# under slow (each path × format is its own compiled kernel: minutes of compiling on a cold cache)
@pytest.mark.parametrize("path", isa.PATHS[1:])
@pytest.mark.parametrize("qtype", [q if q in ("Q5_0", "Q4_K", "Q6_K") else pytest.param(q, marks=pytest.mark.slow)
                                   for q in KTYPES])
def test_isa_paths_equal_portable(path, qtype):
    if path not in OTHER_PATHS:
        pytest.skip(f"this CPU has no {path} (it has {', '.join(isa.host_paths())})")
    K, N, T = 512, 24, 5
    t = random_tensor(qtype, N, K, seed=3)
    lin = KQuant(t)
    x = np.random.default_rng(3).standard_normal((T, K)).astype(np.float32)
    xq, xde, xs16, scratch = lin._buffers(T)
    kquants.quantize_x(x, xq, xde, xs16)
    outs = {}
    for p in ("portable", path):
        outs[p] = np.empty((T, N), np.float32)
        kquants.matmul_k(isa.tag(p), lin.fmt, xq, xde, xs16, lin.q, scratch, outs[p])
        outs[p + "exact"] = np.empty((T, N), np.float32)
        kquants.sums16(x, xs16)
        kquants.matmul_k_exact(isa.tag(p), lin.fmt, x, xs16, lin.q, scratch, outs[p + "exact"])
        kquants.quantize_x(x, xq, xde, xs16)
    s = np.abs(outs["portable"]).max()
    assert np.abs(outs[path] - outs["portable"]).max() < 1e-5 * s
    assert np.abs(outs[path + "exact"] - outs["portableexact"]).max() < 1e-5 * s


def test_mixed_formats_run_each_on_its_own_kernel():
    """A Q4_K_M's fused Q/K/V mixes Q5_0 and Q8_0 (and gate/up may mix K types): no float32 copy, each part into
    its slice of the output."""
    rng = np.random.default_rng(7)
    q5 = random_tensor("Q5_0", 48, 256, seed=1)
    q8 = Tensor(quants.quantize(rng.standard_normal((16, 256)).astype(np.float32), GGMLQuantizationType.Q8_0),
                "Q8_0", (16, 256))
    q4k, q6k = random_tensor("Q4_K", 32, 256, seed=2), random_tensor("Q6_K", 32, 256, seed=3)
    ws = [q5, q8, q4k, q6k]
    lin = make_linear(ws, [None, Tensor(np.ones(16, np.float32), "F32", (16,)), None, None])
    assert isinstance(lin, Stacked) and [type(p) for p in lin.parts] == [KQuant, Quant, KQuant, KQuant]
    assert lin.nbytes == sum(t.data.nbytes for t in ws) + 128 * 4
    w = np.concatenate([gguf_dequantized(t) for t in ws])
    assert np.array_equal(lin.dequantized(), w)
    bias = np.concatenate([np.zeros(48), np.ones(16), np.zeros(64)])
    for T in (1, 4, 20):
        x = rng.standard_normal((T, 256)).astype(np.float32)
        out = lin.forward(x, np.empty((T, 128), np.float32))
        dense = x.astype(np.float64) @ w.T.astype(np.float64) + bias
        assert np.abs(out - dense).max() < 0.03 * np.abs(dense).max()
    same = make_linear([q4k, random_tensor("Q4_K", 16, 256, seed=4)])  # one format: one matrix, one kernel call
    assert isinstance(same, KQuant) and same.out_features == 48
    assert isinstance(make_linear([q4k], dequantize=True), Dense)


@pytest.fixture(scope="module")
def gemma_pair():
    import minirt
    from minirt.readers import read_checkpoint
    from minirt.registry import pull
    path = pull("gemma3-270m")
    return (minirt.Model.from_checkpoint(read_checkpoint(path), exact=True),
            minirt.Model.from_checkpoint(read_checkpoint(path), dequantize=True), minirt.load(path))


def test_gemma3_native_equals_float32_expansion(gemma_pair):
    exact, dense, native = gemma_pair
    L = native.layers[0]
    assert isinstance(L.qkv, Stacked) and L.qkv.qtype == "Q5_0+Q5_0+Q8_0"
    assert (type(L.wo), L.wo.qtype, type(L.down), L.down.qtype) == (KQuant, "Q4_K", KQuant, "Q6_K")
    assert isinstance(native.head, Quant) and native.head.qtype == "Q8_0"  # the tied head on the Q8_0 kernel
    assert native.weight_bytes < 0.25 * dense.weight_bytes
    ids = native.tokenizer.encode("The lighthouse keeper counted 17 ships, then wrote in his log: 'calm sea, "
                                  "light wind from the west, all lamps lit and the fog horn tested twice'.")
    assert len(ids) - 9 >= Quant.GEMM_MIN_ROWS
    ce, cd, cn = exact.new_cache(64), dense.new_cache(64), native.new_cache(64)
    kls = []
    for tok in (ids[:3], ids[3:4], ids[4:9], ids[9:]):  # 3, 1, 5 and ≥ 17 positions (exact: BLAS above 16)
        want = dense.forward(tok, cd, "all")
        scale = np.abs(want).max()
        assert np.abs(exact.forward(tok, ce, "all") - want).max() < 1e-4 * scale
        got = native.forward(tok, cn, "all")
        assert np.abs(got - want).max() < 0.08 * scale  # int8 activations (measured ≤ 0.035)
        p, q = (np.exp(v - v.max(-1, keepdims=True)) for v in (want, got))
        p, q = p / p.sum(-1, keepdims=True), q / q.sum(-1, keepdims=True)
        kls += list((p * (np.log(p) - np.log(q))).sum(-1))
    assert np.mean(kls) < 0.05, kls


@pytest.mark.parametrize("qtype", KTYPES + ["F16", "BF16"])
@pytest.mark.parametrize("exact", [False, True])
def test_a_position_has_the_same_bits_at_any_t(qtype, exact):
    """A position's logits do not depend on how many positions share the call (the kernels take 4, 2 or 1 at
    a time): greedy speculative decoding on Gemma 3's K-quants (and on F16 files) stays identical to plain
    decoding. Reassociating float flags broke this (a 1-position kernel summed in another order)."""
    rng = np.random.default_rng(4)
    N, K = 24, 512
    if qtype in ("F16", "BF16"):
        w = rng.standard_normal((N, K)).astype(np.float32)
        raw = w.astype(np.float16) if qtype == "F16" else (w.view(np.uint32) >> 16).astype(np.uint16)
        lin = make_linear([Tensor(raw.view(np.uint8).reshape(N, -1), qtype, (N, K))], exact=exact)
    else:
        lin = KQuant(random_tensor(qtype, N, K), exact=exact)
    x = rng.standard_normal((16, K)).astype(np.float32)
    run = lambda xs: lin.forward(xs, np.empty((len(xs), N), np.float32))  # noqa: E731
    one = np.concatenate([run(x[t:t + 1]) for t in range(16)])
    for T in (2, 3, 5, 16):
        assert np.array_equal(run(x[:T]), one[:T]), T
