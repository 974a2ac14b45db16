"""minirt's Numba path against the float64 numpy reference (tests/reference.py) on SmolLM2's real weights.

The reference reads the GGUF itself with the gguf package and applies llama.cpp's adjacent-pair RoPE to
the rows as stored, so minirt's un-permutation to rotate-half order is checked too."""
from __future__ import annotations

import numpy as np
import pytest

from minirt.readers import read_checkpoint

from . import reference as ref

PROMPTS = ["Once upon a time", "The capital of France is", "def fibonacci(n):", "In 1969, astronauts"]
STEPS = 32
MAX_ABS_LOGIT_DIFF = 2e-3  # float32 kernels vs float64 on logits of magnitude ~20


@pytest.fixture(scope="module")
def ref_forward(smollm2_path):
    w = ref.gguf_llama_weights(smollm2_path)
    cfg = read_checkpoint(smollm2_path).config
    return lambda ids: ref.llama_forward(w, cfg, ids, adjacent_rope=True)


def test_logits_match_float64_reference(smollm2, ref_forward):
    ids = smollm2.tokenizer.encode("The quick brown fox jumps over the lazy dog. 1234 ünïcödé")
    got = smollm2.logits(ids)
    want = ref_forward(np.asarray(ids))
    assert got.shape == want.shape == (len(ids), 49152)
    assert np.abs(got - want).max() < MAX_ABS_LOGIT_DIFF
    assert (got.argmax(-1) == want.argmax(-1)).all()


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_tokens_match_reference(smollm2, ref_forward, prompt):
    ids = smollm2.tokenizer.encode(prompt)
    gen = smollm2.generate(ids, max_tokens=STEPS, temperature=0)
    gen.text()
    got = gen.stats.tokens
    want = ref.greedy(ref_forward, ids, len(got))
    assert got == want
    assert len(got) == STEPS or gen.stats.stop_reason == "eog"


def test_decode_steps_match_prefill(smollm2):
    """Prefill + one-token steps through the cache equal one pass over the whole sequence."""
    ids = smollm2.tokenizer.encode("A cache must not change the answer: one two three four five six")
    full = smollm2.logits(ids)
    cache = smollm2.new_cache(len(ids))
    rows = [smollm2.forward(ids[:5], cache, logits="all")]
    rows += [smollm2.forward([t], cache) for t in ids[5:]]
    assert np.abs(np.concatenate(rows) - full).max() < 1e-3
