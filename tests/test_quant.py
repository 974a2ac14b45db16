"""Kernels on stored formats against dequantize-then-float32 (the gguf package's dequantizer and plain
numpy matmul in float64), for every format, decode and batched shapes; the default int8-activation decode
kernels against an independent numpy emulation of that arithmetic (blocks parsed here from the bytes);
and SmolLM2 run natively on its Q4_1/Q8_0 blocks against the same model expanded to float32."""
from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType, quants

import minirt
from minirt.linear import Dense, Quant, Stacked, make_linear
from minirt.readers import read_checkpoint
from minirt.readers.base import Tensor

FORMATS = ["Q8_0", "Q4_0", "Q4_1", "F16", "BF16"]


def stored(w: np.ndarray, qtype: str) -> Tensor:
    if qtype == "F16":
        data = w.astype(np.float16)
    elif qtype == "BF16":
        data = (w.view(np.uint32) >> 16).astype(np.uint16)
    else:
        data = quants.quantize(w, GGMLQuantizationType[qtype])
    return Tensor(data, qtype, w.shape)


def blocks(t: Tensor):
    """(d, offset, q) per block, parsed from GGUF block bytes: value = d·q + offset."""
    layout = {"Q8_0": (34, 2, None), "Q4_0": (18, 2, None), "Q4_1": (20, 4, 2)}[t.qtype]
    size, qoff, moff = layout
    b = t.data.reshape(t.shape[0], -1, size)
    d = b[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float64)
    if t.qtype == "Q8_0":
        return d, np.zeros_like(d), b[..., 2:].view(np.int8).astype(np.float64)
    nib = b[..., qoff:]
    q = np.concatenate([nib & 15, nib >> 4], axis=-1).astype(np.float64)  # low nibbles: values 0..15
    off = b[..., moff:moff + 2].copy().view(np.float16)[..., 0].astype(np.float64) if moff else -8 * d
    return d, off, q


def int8_activation_reference(t: Tensor, x: np.ndarray) -> np.ndarray:
    """llama.cpp's arithmetic: x rounded to int8 per block of 32 (scale max|x|/127), integer dot products
    with the quants, then y = Σ_b d·xd·Σ q·xq + offset·xd·Σ xq (the offset sees the rounded x, as q8_1's s)."""
    d, off, q = blocks(t)
    T = x.shape[0]
    xb = x.reshape(T, -1, 32).astype(np.float64)
    xd = np.abs(xb).max(-1) / 127
    xq = np.round(xb / np.where(xd > 0, xd, 1)[..., None])
    dots = np.einsum("nbi,tbi->tnb", q, xq)
    return (dots * d[None] * xd[:, None, :]).sum(-1) + (off[None] * (xd * xq.sum(-1))[:, None, :]).sum(-1)


@pytest.mark.parametrize("qtype", FORMATS)
@pytest.mark.parametrize("shape", [(96, 64), (40, 192)])
@pytest.mark.parametrize("T", [1, 3, 8, 40])
@pytest.mark.parametrize("exact", [True, False])
def test_kernel_equals_reference(qtype, shape, T, exact):
    rng = np.random.default_rng(T)
    w = rng.standard_normal(shape).astype(np.float32)
    t = stored(w, qtype)
    ref_w = t.float32() if qtype in ("F16", "BF16") else quants.dequantize(t.data, GGMLQuantizationType[qtype])
    lin = Quant(t, bias=np.arange(shape[0], dtype=np.float32), exact=exact)
    assert np.array_equal(lin.dequantized(), ref_w)
    x = rng.standard_normal((T, shape[1])).astype(np.float32)
    out = np.empty((T, shape[0]), np.float32)
    lin.forward(x, out)
    bias = np.arange(shape[0])
    dense = x.astype(np.float64) @ ref_w.T.astype(np.float64) + bias
    scale = np.abs(dense).max()
    if exact or qtype in ("F16", "BF16"):
        assert np.abs(out - dense).max() < 1e-4 * scale  # float32 rounding only
    else:  # int8 activations at any T (prompts take the decode kernels)
        assert np.abs(out - (int8_activation_reference(t, x) + bias)).max() < 1e-4 * scale
        assert np.abs(out - dense).max() < 0.03 * scale  # what int8 activations cost, as in llama.cpp


def test_quant_memory_is_the_stored_size():
    w = np.random.default_rng(0).standard_normal((256, 512)).astype(np.float32)
    for qtype, bytes_per_block in (("Q8_0", 34), ("Q4_0", 18), ("Q4_1", 20)):
        assert Quant(stored(w, qtype)).nbytes == 256 * 512 // 32 * bytes_per_block
    assert Quant(stored(w, "F16")).nbytes == 256 * 512 * 2


def test_fused_rows_and_fallback():
    rng = np.random.default_rng(1)
    a, b = (stored(rng.standard_normal((32, 64)).astype(np.float32), "Q4_1") for _ in range(2))
    fused = make_linear([a, b])
    assert isinstance(fused, Quant) and fused.out_features == 64
    assert np.array_equal(fused.dequantized(), np.concatenate([a.float32(), b.float32()]))
    c = stored(rng.standard_normal((32, 64)).astype(np.float32), "Q8_0")
    mixed = make_linear([a, c])
    assert isinstance(mixed, Stacked)  # different formats: each part on its own kernel, no float32 copy
    assert np.array_equal(mixed.dequantized(), np.concatenate([a.float32(), c.float32()]))


def test_smollm2_native_equals_float32_expansion(smollm2, smollm2_path):
    assert isinstance(smollm2.layers[0].qkv, Quant) and smollm2.layers[0].qkv.qtype == "Q4_1"
    assert isinstance(smollm2.head, Quant) and smollm2.head.qtype == "Q8_0"
    dense = minirt.Model.from_checkpoint(read_checkpoint(smollm2_path), dequantize=True)
    assert isinstance(dense.layers[0].qkv, Dense)
    ids = smollm2.tokenizer.encode("Quantized kernels must agree with the float32 expansion: 1, 2, 3.")
    assert np.abs(smollm2.logits(ids) - dense.logits(ids)).max() < 2e-3
    # a decode step and a short batch take the Numba kernels; the prompt above took the BLAS path
    cache_q, cache_d = smollm2.new_cache(64), dense.new_cache(64)
    for tok in (ids[:3], ids[3:4], ids[4:9]):
        assert np.abs(smollm2.forward(tok, cache_q, "all") - dense.forward(tok, cache_d, "all")).max() < 2e-3
    assert smollm2.weight_bytes < 0.2 * dense.weight_bytes


def test_int8_activation_decode_stays_close(smollm2, smollm2_fast):
    """The default decode path (int8 activations) against exact arithmetic on the same blocks: the
    next-token distributions of 16 decode steps stay close (measured: mean KL 0.013 nats, max 0.038;
    top token agrees on 14 of 16) — the price of llama.cpp's arithmetic, bounded here."""
    ids = smollm2.tokenizer.encode("The history of the printing press begins")
    ca, cb = smollm2.new_cache(64), smollm2_fast.new_cache(64)
    smollm2.forward(ids, ca)
    smollm2_fast.forward(ids, cb)
    kls, agree = [], 0
    tok = ids[-1]
    for _ in range(16):
        a, b = smollm2.forward([tok], ca)[0].astype(np.float64), smollm2_fast.forward([tok], cb)[0].astype(np.float64)
        pa, pb = np.exp(a - a.max()), np.exp(b - b.max())
        pa, pb = pa / pa.sum(), pb / pb.sum()
        kls.append(float((pa * (np.log(pa + 1e-30) - np.log(pb + 1e-30))).sum()))
        agree += int(a.argmax() == b.argmax())
        tok = int(a.argmax())
    assert np.mean(kls) < 0.03 and max(kls) < 0.1 and agree >= 12, (kls, agree)
