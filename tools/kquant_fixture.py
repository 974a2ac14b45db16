"""Make tests/fixtures/kquant_llama_quantize.npz: 16 float32 rows of 512 (real-looking and awkward: scales from 1e-3
to 300, heavy tails, all-positive, all-negative, zero, constant, sparse, tiny sub-blocks, values on a grid, values
near llama.cpp's 1e-15 threshold, a large offset) and the bytes llama-quantize makes of them in Q2_K, Q3_K, Q4_K,
Q5_K, Q6_K, Q5_0, Q5_1 and Q8_0 (`llama-quantize --pure`, no importance matrix). The rows go in as the ffn_down
matrix of a one-layer llama GGUF, which is all llama-quantize needs.

    python tools/kquant_fixture.py [path/to/llama-quantize]
"""
from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import gguf
import numpy as np

LLAMA_QUANTIZE = Path.home() / ".cache/minirt-anchors/llama.cpp-0.3.36/build/bin/llama-quantize"
OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "kquant_llama_quantize.npz"
# ftype names llama-quantize takes; with --pure a _M name quantizes everything to its base type
FTYPES = {"Q2_K": "Q2_K", "Q3_K": "Q3_K_M", "Q4_K": "Q4_K_M", "Q5_K": "Q5_K_M", "Q6_K": "Q6_K",
          "Q5_0": "Q5_0", "Q5_1": "Q5_1", "Q8_0": "Q8_0"}


def rows() -> np.ndarray:
    rng = np.random.default_rng(15)
    r = list(rng.standard_normal((6, 512)).astype(np.float32)
             * np.array([[1e-3], [0.02], [0.1], [1], [7], [300]], np.float32))
    r.append(rng.standard_t(2, 512).astype(np.float32) * 0.05)
    r.append(np.abs(rng.standard_normal(512)).astype(np.float32))
    r.append(-np.abs(rng.standard_normal(512)).astype(np.float32))
    r.append(np.zeros(512, np.float32))
    r.append(np.full(512, 0.25, np.float32))
    s = np.zeros(512, np.float32)
    s[[3, 100, 300, 301]] = [1.0, -2.0, 0.5, 1e-4]
    r.append(s)
    u = rng.uniform(-1, 1, 512).astype(np.float32)
    u[:32] *= 1e-6
    u[256:272] = 0
    r.append(u)
    r.append((rng.integers(-3, 4, 512) * 0.125).astype(np.float32))
    r.append(rng.standard_normal(512).astype(np.float32) * 1e-20)
    r.append(rng.standard_normal(512).astype(np.float32) + 5)
    return np.stack(r)


def main() -> None:
    exe = sys.argv[1] if len(sys.argv) > 1 else str(LLAMA_QUANTIZE)
    x = rows()
    out = {"x": x}
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "f32.gguf"
        w = gguf.GGUFWriter(str(src), "llama")
        w.add_block_count(1)
        w.add_context_length(64)
        w.add_embedding_length(512)
        w.add_feed_forward_length(x.shape[0])
        w.add_head_count(2)
        w.add_head_count_kv(2)
        w.add_layer_norm_rms_eps(1e-5)
        w.add_file_type(0)
        w.add_tensor("blk.0.ffn_down.weight", x)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        for qtype, ftype in FTYPES.items():
            dst = Path(d) / f"{qtype}.gguf"
            subprocess.run([exe, "--pure", str(src), str(dst), ftype, "1"], check=True, capture_output=True)
            t = gguf.GGUFReader(str(dst)).tensors[0]
            assert t.tensor_type.name == qtype, (qtype, t.tensor_type.name)
            out[qtype] = np.asarray(t.data).reshape(x.shape[0], -1)
    np.savez_compressed(OUT, **out)
    print(OUT, {k: v.shape for k, v in out.items()})


if __name__ == "__main__":
    main()
