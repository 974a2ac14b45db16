"""The generation API on SmolLM2: streaming, seeds, stop strings, limits, chat."""
from __future__ import annotations

import numpy as np
import pytest

from minirt import MinirtError


def test_stream_equals_decoded_tokens(smollm2):
    gen = smollm2.generate("Once upon a time", max_tokens=24, temperature=0)
    pieces = list(gen)
    assert len(pieces) > 1
    assert "".join(pieces) == smollm2.tokenizer.decode(gen.stats.tokens)
    assert gen.stats.decode_tokens == 24 and gen.stats.stop_reason == "length"


def test_same_seed_same_text(smollm2):
    kw = dict(max_tokens=16, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)
    a = smollm2.generate("The weather today", seed=3, **kw).text()
    b = smollm2.generate("The weather today", seed=3, **kw).text()
    c = smollm2.generate("The weather today", seed=4, **kw).text()
    assert a == b
    assert a != c


def test_stop_string_cuts_output(smollm2):
    full = smollm2.generate("Count: one, two, three,", max_tokens=20, temperature=0).text()
    assert "," in full
    cut = full[:full.index(",")]
    gen = smollm2.generate("Count: one, two, three,", max_tokens=20, temperature=0, stop=[","])
    assert gen.text() == cut
    assert gen.stats.stop_reason == "stop string"


def test_chat_stops_at_end_of_turn(smollm2):
    gen = smollm2.generate("What is 2+2? Answer with one number.", chat=True, max_tokens=40, temperature=0)
    text = gen.text()
    assert gen.stats.stop_reason == "eog"
    assert "4" in text and "<|im_end|>" not in text


def test_token_id_prompt_and_logits_api(smollm2):
    ids = smollm2.tokenizer.encode("Hello")
    logits = smollm2.logits(ids)
    assert logits.shape == (len(ids), smollm2.cfg.vocab_size) and np.isfinite(logits).all()
    gen = smollm2.generate(ids, max_tokens=1, temperature=0)
    gen.text()
    assert gen.stats.tokens == [int(np.argmax(logits[-1]))]


def test_errors(smollm2):
    with pytest.raises(MinirtError, match="context"):
        smollm2.generate("word " * 9000, max_tokens=1)
    with pytest.raises(MinirtError, match="with_pinv"):
        smollm2.generate("hi", mode="pinv")
    with pytest.raises(MinirtError, match="factored model"):
        smollm2.generate("hi", mode="lowrank")
    with pytest.raises(MinirtError, match="unknown mode"):
        smollm2.generate("hi", mode="turbo")
    with pytest.raises(MinirtError, match="out of range"):
        smollm2.logits([49152])
