"""The multi-sequence decode step: each sequence's logits equal what that sequence gives alone."""
from __future__ import annotations

import numpy as np
import pytest

from minirt.batch import MAX_ROWS, BatchStep, Pass
from minirt.errors import MinirtError
from minirt.kvcache import KVCache


def _caches(model, n, capacity, pooled):
    """n caches: slots of one pool (the server's: one compiled call per step) or separate (per operation)."""
    if pooled:
        return KVCache.pooled(model.cfg, capacity, n, model.kv_type)
    return [model.new_cache(capacity) for _ in range(n)]


def _alone(model, ids, steps):
    """Greedy tokens and logits of one sequence through Model.forward (the single-sequence path)."""
    cache = model.new_cache(64)
    logits = model.forward(ids, cache)[0]
    out = []
    for _ in range(steps):
        t = int(np.argmax(logits))
        out.append((t, logits))
        logits = model.forward([t], cache)[0]
    return out


@pytest.mark.parametrize("kv", ["f32", "f16"])
@pytest.mark.parametrize("pooled", [True, False], ids=["pooled", "separate"])
def test_batched_step_equals_each_sequence_alone(request, pooled, kv):
    m = request.getfixturevalue("smollm2_fast" if kv == "f32" else "smollm2_f16")
    prompts = ["The capital of France is", "Once upon a time", "def fib(n):", "1, 2, 3, 4,", "Hello",
               "The quick brown fox jumps over the lazy dog. " * 3]
    ids = [m.tokenizer.encode(p) for p in prompts]
    steps = 5
    alone = [_alone(m, p, steps) for p in ids]
    step = BatchStep(m)
    caches = _caches(m, len(ids), 64, pooled)
    assert (step._compiled(np.zeros(len(ids), np.int64), caches) is not None) == pooled  # the path under test
    assert caches[0].k.dtype == (np.float32 if kv == "f32" else np.uint16) and caches[0].kv_type == kv
    for c in caches:
        c.truncate(0)
    last = [m.forward(p, c)[0] for p, c in zip(ids, caches)]
    for k in range(steps):
        toks = [int(np.argmax(row)) for row in last]
        for i in range(len(ids)):
            assert toks[i] == alone[i][k][0]
            np.testing.assert_array_equal(last[i], alone[i][k][1])  # the same bits: rows never mix
        last = step(toks, caches)
        assert [c.pos for c in caches] == [len(p) + k + 1 for p in ids]


@pytest.mark.parametrize("pooled", [True, False], ids=["pooled", "separate"])
def test_more_rows_than_one_pass_and_repeated_sequences(smollm2_fast, pooled):
    """Beyond MAX_ROWS the step runs in groups; the same prompt in many slots gives the same row everywhere."""
    m = smollm2_fast
    ids = m.tokenizer.encode("Hello there")
    n = MAX_ROWS + 3
    caches = _caches(m, n, 32, pooled)
    first = [m.forward(ids, c)[0] for c in caches]
    tok = int(np.argmax(first[0]))
    ref_cache = m.new_cache(32)
    m.forward(ids, ref_cache)
    ref = m.forward([tok], ref_cache)[0]
    rows = BatchStep(m)([tok] * n, caches)
    for row in rows:
        np.testing.assert_array_equal(row, ref)


def test_step_refuses_bad_input(smollm2_fast):
    m = smollm2_fast
    step = BatchStep(m)
    c = m.new_cache(4)
    with pytest.raises(ValueError):
        step([1, 2], [c, c])
    with pytest.raises(MinirtError, match="out of range"):
        step([m.cfg.vocab_size], [c])
    m.forward([1, 2, 3, 4], c)
    with pytest.raises(MinirtError, match="context is full"):
        step([1], [c])


def test_pass_mixes_prompt_chunks_with_decode_rows(smollm2_fast):
    """Chunked prefill mixed into the decode step (Pass): decode rows of three sequences and prompt chunks of
    two more in one call, one of them joining while the pass runs (stopped at a layer boundary by the flag);
    every part's logits and every later step have the bits of the sequence alone (Model.forward)."""
    m = smollm2_fast
    texts = ["The capital of France is", "Once upon a time", "def fib(n):", "Hello, my name is", "Good morning"]
    ids = [m.tokenizer.encode(t) for t in texts]
    alone = [_alone(m, p, 3) for p in ids]
    caches = KVCache.pooled(m.cfg, 64, len(ids))
    last = {i: m.forward(ids[i], caches[i])[0] for i in range(3)}  # three sequences already decoding
    for i in range(3):
        np.testing.assert_array_equal(last[i], alone[i][0][1])
    stop = np.zeros(1, np.int64)
    p = Pass(m, caches[0].pool)
    toks = {i: int(np.argmax(last[i])) for i in range(3)}
    for i in range(3):
        p.add(caches[i], [toks[i]])
    half = len(ids[3]) // 2
    p.add(caches[3], ids[3][:half], want=False)  # a prompt in two chunks: the first gives no logits
    stop[0] = 1  # as a request arriving mid-step does: the pass stops after its first layer
    assert not p.run(stop) and p.layer == 1
    with pytest.raises(ValueError, match="have not run"):
        p.logits()
    stop[0] = 0
    p.add(caches[4], ids[4])  # runs layer 0 on its own rows, then the rest with the others
    assert p.rows == 3 + half + len(ids[4]) <= MAX_ROWS
    assert p.run(stop)
    rows = p.logits()
    assert rows[3] is None
    for i in range(3):
        np.testing.assert_array_equal(rows[i], alone[i][1][1])
    np.testing.assert_array_equal(rows[4], alone[4][0][1])
    assert [c.pos for c in caches] == [len(ids[i]) + 1 for i in range(3)] + [half, len(ids[4])]
    p = Pass(m, caches[0].pool)  # the second chunk of prompt 3, beside the next decode rows
    p.add(caches[3], ids[3][half:])
    for i in range(3):
        p.add(caches[i], [int(np.argmax(rows[i]))])
    assert p.run()
    rows = p.logits()
    np.testing.assert_array_equal(rows[0], alone[3][0][1])
    for i in range(3):
        np.testing.assert_array_equal(rows[1 + i], alone[i][2][1])
    with pytest.raises(ValueError, match="do not fit"):
        Pass(m, caches[0].pool).add(caches[0], [1] * (MAX_ROWS + 1))


@pytest.mark.slow
def test_batched_step_gemma3():
    """Gemma 3's traits (q/k norms, post norms, √dim embeddings, sliding-window layers) through the batched step."""
    import minirt
    m = minirt.load("gemma3", ctx=1024)
    ids = [m.tokenizer.encode(p) for p in ["The capital of France is", "Once upon a time", "1, 2, 3,"]]
    caches, ref = [m.new_cache(64) for _ in ids], [m.new_cache(64) for _ in ids]
    last = [m.forward(p, c)[0] for p, c in zip(ids, caches)]
    for p, c in zip(ids, ref):
        m.forward(p, c)
    step = BatchStep(m)
    for _ in range(4):
        toks = [int(np.argmax(row)) for row in last]
        alone = [m.forward([t], c)[0] for t, c in zip(toks, ref)]
        last = step(toks, caches)
        for a, b in zip(alone, last):
            np.testing.assert_array_equal(a, b)


def test_f16_cache_holds_the_f32_keys_rounded(smollm2_fast, smollm2_f16):
    """Through the whole model: the first layer's keys and values in a float16 cache are numpy's float16 of a
    float32 cache's (later layers differ: they read rounded keys), and the logits move little."""
    ids = smollm2_fast.tokenizer.encode("The capital of France is Paris, and the capital of Italy is")
    c32, c16 = smollm2_fast.new_cache(32), smollm2_f16.new_cache(32)
    l32, l16 = smollm2_fast.forward(ids, c32, logits="all"), smollm2_f16.forward(ids, c16, logits="all")
    n = len(ids)
    assert c16.k.dtype == np.uint16 and c32.k.dtype == np.float32
    np.testing.assert_array_equal(c16.k[0, :, :n], c32.k[0, :, :n].astype(np.float16).view(np.uint16))
    np.testing.assert_array_equal(c16.v[0, :, :n], c32.v[0, :, :n].astype(np.float16).view(np.uint16))
    assert not np.array_equal(c16.k[1:, :, :n], c32.k[1:, :, :n].astype(np.float16).view(np.uint16))
    assert (l16.argmax(-1) == l32.argmax(-1)).mean() >= 0.8
