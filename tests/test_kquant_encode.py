"""K-quant encoding (minirt/kquant_encode.py) and the per-tensor mixes of minirt quantize (minirt/quantize.py).

References: llama-quantize's own bytes for awkward rows (tests/fixtures/kquant_llama_quantize.npz, made by
tools/kquant_fixture.py with llama.cpp's build), gguf's dequantizer, and the type mix of google's real Gemma 3
Q4_K_M file. The whole-file comparison with a live llama-quantize is in test_quantize_cli.py (slow)."""
from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q

from minirt.kquant_encode import BLOCK_BYTES, quantize_k
from minirt.quantize import _convertible, encode, tensor_types, use_more_bits

FIXTURE = Path(__file__).parent / "fixtures" / "kquant_llama_quantize.npz"


@pytest.fixture(scope="module")
def ref():
    return np.load(FIXTURE)


@pytest.mark.parametrize("qtype", ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q5_0", "Q5_1", "Q8_0"])
def test_bytes_equal_llama_quantize(ref, qtype):
    """Scales from 1e-3 to 300, heavy tails, one-signed rows, zero, constant and sparse blocks, values near the
    1e-15 threshold: every block equals llama-quantize's (K-quants ours, the 32-blocks gguf's)."""
    mine = encode(ref["x"], qtype)
    assert mine.dtype == np.uint8 and mine.shape == ref[qtype].shape
    bad = np.nonzero((mine != ref[qtype]).any(axis=1))[0]
    assert bad.size == 0, f"rows {bad.tolist()} differ"


@pytest.mark.parametrize("qtype,rmse,worst", [("Q2_K", 0.35, 0.47), ("Q3_K", 0.18, 0.28), ("Q4_K", 0.08, 0.15),
                                               ("Q5_K", 0.042, 0.07), ("Q6_K", 0.022, 0.025)])
def test_dequantizes_within_the_formats_error(qtype, rmse, worst):
    rng = np.random.default_rng(7)
    gauss = rng.standard_normal((128, 512)).astype(np.float32) * rng.uniform(0.01, 3, (128, 1)).astype(np.float32)
    spread = (rng.uniform(-1, 1, (64, 256)) * 10.0 ** rng.uniform(-2, 3, (64, 1))).astype(np.float32)
    tails = rng.standard_t(1.5, (64, 256)).astype(np.float32)
    for x in (gauss, spread, tails):
        b = quantize_k(x, qtype)
        assert b.shape == (x.shape[0], x.shape[1] // 256 * BLOCK_BYTES[qtype])
        y = gguf.quants.dequantize(b, Q[qtype]).reshape(x.shape)
        blocks, yb = x.reshape(-1, 256), y.reshape(-1, 256)
        assert (np.abs(yb - blocks).max(1) <= worst * np.abs(blocks).max(1)).all()
    y = gguf.quants.dequantize(quantize_k(gauss, qtype), Q[qtype]).reshape(gauss.shape)
    assert np.sqrt(((y - gauss) ** 2).mean(1) / (gauss ** 2).mean(1)).max() < rmse
    assert np.array_equal(gguf.quants.dequantize(quantize_k(np.zeros((2, 256), np.float32), qtype), Q[qtype]),
                          np.zeros((2, 256), np.float32))


def test_rows_must_be_whole_superblocks():
    with pytest.raises(ValueError, match="multiple of 256"):
        quantize_k(np.zeros((2, 640), np.float32), "Q4_K")


def test_mix_equals_googles_gemma3_q4_k_m():
    """The real Gemma 3 270M Q4_K_M was made by llama-quantize: Q6_K ffn_down in use_more_bits layers, attn_v
    whose Q6_K falls back to Q8_0 (rows of 640), Q4_K that falls back to Q5_0, tied embeddings in Q8_0."""
    from minirt.readers.gguf import (
        _parse,  # the header only (gguf's reader takes ~10 s on this vocabulary)
    )
    from minirt.registry import pull
    meta, infos, _, mm = _parse(pull("gemma3-270m"))
    mm.close()
    matrices = [(name, list(reversed(dims))) for name, dims, _, _ in infos if _convertible(name, list(reversed(dims)))]
    assert len(matrices) == 1 + 18 * 7
    got = tensor_types(matrices, "Q4_K_M", meta["gemma3.block_count"])
    assert got == {name: Q(t).name for name, _, t, _ in infos if name in got}


def test_use_more_bits_layers():
    # llama.cpp: the first and last eighth, and every third layer between
    assert [i for i in range(30) if use_more_bits(i, 30)] == [0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29]
    assert [i for i in range(18) if use_more_bits(i, 18)] == [0, 1, 4, 7, 10, 13, 15, 16, 17]
