"""minirt's Numba path against the float64 numpy reference (tests/reference.py) on SmolLM2's real weights.

The reference reads the GGUF itself with the gguf package and applies llama.cpp's adjacent-pair RoPE to
the rows as stored, so minirt's un-permutation to rotate-half order is checked too."""
from __future__ import annotations

import numpy as np
import pytest

from minirt.kvcache import KVCache
from minirt.readers import read_checkpoint

from . import reference as ref

PROMPTS = ["Once upon a time", "The capital of France is", "def fibonacci(n):", "In 1969, astronauts"]
STEPS = 32
MAX_ABS_LOGIT_DIFF = 2e-3  # float32 kernels vs float64 on logits of magnitude ~20
# A float16 KV cache against the reference that rounds its keys and values to float16 too: beyond the 1e-4 of
# float32 arithmetic, a key that float32 and float64 put on either side of an f16 rounding midpoint is stored
# one f16 ulp (2^-11 relative) apart (~0.4% of them: float32's error is ~1e-6 relative): 0.010 on this
# prompt. Rounding itself moves the reference by 0.027 here, so a cache that did not round fails.
MAX_ABS_LOGIT_DIFF_F16 = 0.02


@pytest.fixture(scope="module")
def ref_forward(smollm2_path):
    w = ref.gguf_llama_weights(smollm2_path)
    cfg = read_checkpoint(smollm2_path).config
    return lambda ids, **kw: ref.llama_forward(w, cfg, ids, adjacent_rope=True, **kw)


def test_logits_match_float64_reference(smollm2, ref_forward):
    ids = smollm2.tokenizer.encode("The quick brown fox jumps over the lazy dog. 1234 ünïcödé")
    got = smollm2.logits(ids)
    want = ref_forward(np.asarray(ids))
    assert got.shape == want.shape == (len(ids), 49152)
    assert np.abs(got - want).max() < MAX_ABS_LOGIT_DIFF
    assert (got.argmax(-1) == want.argmax(-1)).all()


def test_f16_kv_logits_match_float64_reference_with_f16_keys(smollm2, ref_forward):
    ids = np.asarray(smollm2.tokenizer.encode("The quick brown fox jumps over the lazy dog. 1234 ünïcödé"))
    got = smollm2.forward(ids, KVCache(smollm2.cfg, len(ids), kv_type="f16"), logits="all")
    want = ref_forward(ids, kv_f16=True)
    assert np.abs(got - want).max() < MAX_ABS_LOGIT_DIFF_F16
    assert (got.argmax(-1) == want.argmax(-1)).all()
    assert np.abs(got - ref_forward(ids)).max() > MAX_ABS_LOGIT_DIFF_F16  # what the test tells apart


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
