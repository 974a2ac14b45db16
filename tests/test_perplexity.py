"""SmolLM2's perplexity on botchan.txt (ctx 512) against llama.cpp's llama-perplexity on the same GGUF
(measured on this machine kind: 26.83 over the first 20 windows, 27.02 ± 0.42 over all 145) and against
the float64 reference on the first windows."""
from __future__ import annotations

import math

import numpy as np
import pytest

from minirt.perplexity import log_softmax, perplexity
from minirt.readers import read_checkpoint

from . import reference as ref


def test_perplexity_first_20_windows_matches_llama_cpp(smollm2, botchan_text):
    r = perplexity(smollm2, botchan_text, ctx=512, chunks=20, progress=False)
    assert r.n_tokens == 74414
    assert r.chunks == 20 and r.n_scored == 20 * 255
    assert abs(r.ppl - 26.83) < 0.05, r.ppl


def test_perplexity_matches_float64_reference(smollm2, smollm2_path, botchan_text):
    ctx = 512
    r = perplexity(smollm2, botchan_text, ctx=ctx, chunks=1, progress=False)
    w = ref.gguf_llama_weights(smollm2_path)
    cfg = read_checkpoint(smollm2_path).config
    tokens = np.asarray(smollm2.tokenizer.encode(botchan_text)[:ctx])
    lp = log_softmax(ref.llama_forward(w, cfg, tokens, adjacent_rope=True))
    nll = -lp[np.arange(ctx // 2, ctx - 1), tokens[ctx // 2 + 1:]]
    assert np.abs(r.nll - nll).max() < 2e-3
    assert math.isclose(r.ppl, math.exp(nll.mean()), rel_tol=1e-4)


@pytest.mark.slow
def test_perplexity_all_windows_matches_llama_cpp(smollm2, botchan_text):
    r = perplexity(smollm2, botchan_text, ctx=512, progress=False)
    assert r.chunks == 145
    assert abs(r.ppl - 27.02) < 0.1, r.ppl
    assert abs(r.stderr - 0.42) < 0.05, r.stderr
