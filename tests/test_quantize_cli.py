"""minirt quantize: the GGUF it writes is read back by the gguf package (names, types, metadata) and by
minirt (logits close to the source model's)."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from gguf import GGUFReader

import minirt
from minirt.readers import read_checkpoint


@pytest.fixture(scope="module")
def q8_file(smollm2_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("q") / "smol-q8_0.gguf"
    r = subprocess.run([sys.executable, "-m", "minirt", "quantize", str(smollm2_path), str(out), "--type", "Q8_0"],
                       capture_output=True, text=True, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr
    return out


def test_gguf_package_reads_it_back(q8_file, smollm2_path):
    src, dst = GGUFReader(str(smollm2_path)), GGUFReader(str(q8_file))
    assert [t.name for t in dst.tensors] == [t.name for t in src.tensors]
    for t in dst.tensors:
        want = "F32" if t.name.endswith("norm.weight") else "Q8_0"
        assert t.tensor_type.name == want, t.name
    for key in ("general.architecture", "llama.block_count", "llama.rope.freq_base", "tokenizer.ggml.merges",
                "tokenizer.ggml.tokens", "tokenizer.chat_template", "tokenizer.ggml.eos_token_id"):
        assert dst.fields[key].contents() == src.fields[key].contents(), key
    assert dst.fields["general.file_type"].contents() == 7  # MOSTLY_Q8_0


def test_minirt_runs_it_close_to_the_source(q8_file, smollm2, smollm2_path):
    from gguf import GGMLQuantizationType, quants
    src, dst = read_checkpoint(smollm2_path).tensors, read_checkpoint(q8_file).tensors
    for name in ("layers.0.wq", "layers.7.w_down", "embed"):
        want = quants.dequantize(quants.quantize(src[name].float32(), GGMLQuantizationType.Q8_0),
                                 GGMLQuantizationType.Q8_0)
        assert np.array_equal(dst[name].float32(), want), name
    m = minirt.load(q8_file, exact=True)
    ids = smollm2.tokenizer.encode("Requantized from Q4_1 to Q8_0, the model barely moves.")
    a, b = smollm2.logits(ids), m.logits(ids)
    assert np.abs(a - b).mean() < 0.3 and (a.argmax(-1) == b.argmax(-1)).mean() > 0.85
    assert m.weight_bytes > 1.4 * smollm2.weight_bytes  # 8.5 bits per weight instead of 5 (head Q8_0 in both)


def test_bad_arguments(smollm2_path, tmp_path):
    def run(*args):
        return subprocess.run([sys.executable, "-m", "minirt", "quantize", *args], capture_output=True, text=True,
                              stdin=subprocess.DEVNULL)
    for args, needle in [((str(smollm2_path), str(tmp_path / "x.gguf"), "--type", "Q3_K"), "invalid choice"),
                         ((str(smollm2_path), str(tmp_path), "--type", "Q8_0"), "is a folder"),
                         (("/nonexistent.gguf", str(tmp_path / "y.gguf"), "--type", "F16"), "does not exist")]:
        r = run(*args)
        assert r.returncode != 0 and "Traceback" not in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and needle in r.stderr, r.stderr
    assert list(tmp_path.iterdir()) == []  # nothing half-written
