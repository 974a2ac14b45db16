"""Kernels on stored formats against dequantize-then-float32 (the gguf package's dequantizer and plain
numpy matmul in float64), for every format, decode and batched shapes; and SmolLM2 run natively on its
Q4_1/Q8_0 blocks against the same model expanded to float32."""
from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType, quants

import minirt
from minirt.linear import Dense, Quant, make_linear
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


@pytest.mark.parametrize("qtype", FORMATS)
@pytest.mark.parametrize("shape", [(96, 64), (40, 192)])
@pytest.mark.parametrize("T", [1, 3, 8, 40])
def test_kernel_equals_dequantize_then_matmul(qtype, shape, T):
    rng = np.random.default_rng(T)
    w = rng.standard_normal(shape).astype(np.float32)
    t = stored(w, qtype)
    ref_w = t.float32() if qtype in ("F16", "BF16") else quants.dequantize(t.data, GGMLQuantizationType[qtype])
    lin = Quant(t, bias=np.arange(shape[0], dtype=np.float32))
    assert np.array_equal(lin.dequantized(), ref_w)
    x = rng.standard_normal((T, shape[1])).astype(np.float32)
    out = np.empty((T, shape[0]), np.float32)
    lin.forward(x, out)
    want = x.astype(np.float64) @ ref_w.T.astype(np.float64) + np.arange(shape[0])
    assert np.abs(out - want).max() < 1e-4 * np.abs(want).max()


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
    mixed = make_linear([a, stored(rng.standard_normal((32, 64)).astype(np.float32), "Q8_0")])
    assert isinstance(mixed, Dense)  # different formats cannot share one kernel: float32


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
