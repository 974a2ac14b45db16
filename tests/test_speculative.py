"""Speculative decoding: greedy output token-identical to plain greedy decoding for every drafter; sampled
output distributed as the model's own (chi-square against exact marginals of a tiny model); the KV cache
after rollbacks equals a fresh run."""
from __future__ import annotations


import numpy as np
import pytest

import minirt
from minirt.config import ModelConfig
from minirt.readers.base import Checkpoint, Tensor, TokenizerSpec
from minirt.sampling import Sampler, SamplingParams

PROMPTS = [
    "Once upon a time",
    "Repeat exactly: alpha beta gamma delta epsilon. Repeat exactly: alpha beta gamma delta epsilon. Repeat exactly:",
    "def add(a, b):\n    return a + b\n\ndef sub(a, b):\n",
    "Summarize in one sentence: The printing press, invented around 1440, let books be copied quickly and cheaply.",
]


@pytest.mark.parametrize("draft", ["ngram", "layers:8"])
@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_is_token_identical(smollm2_fast, prompt, draft):
    plain = smollm2_fast.generate(prompt, max_tokens=24, temperature=0)
    plain.text()
    spec = smollm2_fast.generate(prompt, max_tokens=24, temperature=0, mode="speculative", draft=draft, draft_k=4)
    spec.text()
    assert spec.stats.tokens == plain.stats.tokens
    assert spec.spec.steps > 0


@pytest.mark.parametrize("prompt", PROMPTS[:2])
def test_greedy_lowrank_twin_is_token_identical(smollm2_fast, prompt):
    """The low-rank twin (Q8_0 factors of a 4-layer cut, to keep the SVDs quick) drafts; output is unchanged
    and the twin shares the model's embeddings, norms and head."""
    model = smollm2_fast.truncated(4)
    plain = model.generate(prompt, max_tokens=16, temperature=0)
    plain.text()
    spec = model.generate(prompt, max_tokens=16, temperature=0, mode="speculative", draft="lowrank:p0.5", draft_k=3)
    spec.text()
    assert spec.stats.tokens == plain.stats.tokens
    twin = spec.drafter.model
    assert twin.head is model.head and twin.layers[0].attn_norm is model.layers[0].attn_norm
    assert all(f.rank for f in twin.lowrank) and spec.spec.proposed > 0


def test_self_draft_accepts_everything(smollm2_fast, smollm2_path):
    """The model as its own drafter: every greedy draft is accepted, several tokens per verify call."""
    gen = smollm2_fast.generate(PROMPTS[0], max_tokens=20, temperature=0, mode="speculative",
                                draft=str(smollm2_path), draft_k=3)
    plain = smollm2_fast.generate(PROMPTS[0], max_tokens=20, temperature=0)
    assert gen.text() == plain.text()
    assert gen.spec.acceptance == 1.0 and gen.spec.mean_accepted > 3


def test_cache_after_rollbacks_equals_fresh_run(smollm2):
    gen = smollm2.generate(PROMPTS[2], max_tokens=16, temperature=0, mode="speculative", draft="layers:6")
    gen.text()
    assert gen.spec.proposed > gen.spec.accepted  # some drafts were rejected and rolled back
    ids = smollm2.tokenizer.encode(PROMPTS[2]) + gen.stats.tokens
    assert gen.cache.pos == len(ids) - 1
    got = smollm2.forward([ids[-1]], gen.cache)[0]
    want = smollm2.logits(ids)[-1]
    assert np.abs(got - want).max() < 2e-3


def test_draft_length_policy():
    """Adaptive K: grows on full acceptance up to 2K (≤ K_MAX), halves on a first-token rejection, stops after
    misses in a row, then probes at doubling intervals: a collapsed drafter costs a few probes, not K per step."""
    from minirt.modes.speculative import K_MAX, MISSES, PROBE, PROBE_MAX, DraftLength
    d = DraftLength(4)
    ks = []
    for _ in range(8):
        ks.append(d.next())
        d.update(ks[-1], ks[-1])
    assert ks == [1, 2, 3, 4, 5, 6, 6, 6] and K_MAX == 6
    d.update(d.next(), 0)
    assert d.next() == 3
    drafted = []
    for step in range(600):  # from now on every draft is rejected
        k = d.next()
        if k:
            drafted.append((step, k))
            d.update(k, 0)
    assert drafted[:2] == [(0, 3), (1, 1)] and MISSES == 3  # halved, then stopped at the third miss in a row
    gaps = [b - a for (a, _), (b, _) in zip(drafted[1:], drafted[2:])]
    assert gaps == [2 * PROBE, 4 * PROBE, PROBE_MAX, PROBE_MAX, PROBE_MAX]  # probes of one token, further apart
    assert all(k == 1 for _, k in drafted[1:])
    fixed = DraftLength(3, adaptive=False)
    fixed.update(3, 0)
    assert fixed.next() == 3
    assert PROBE_MAX >= 4 * PROBE


def test_bad_draft_arguments(smollm2_fast):
    with pytest.raises(minirt.MinirtError, match="layers"):
        smollm2_fast.generate("hi", mode="speculative", draft="layers:99")
    for bad in ("ngram:x", "ngram:0", "ngram:-1"):
        with pytest.raises(minirt.MinirtError, match="ngram"):
            smollm2_fast.generate("hi", mode="speculative", draft=bad)
    with pytest.raises(minirt.MinirtError, match="energy"):
        smollm2_fast.generate("hi", mode="speculative", draft="lowrank:abc")
    with pytest.raises(minirt.MinirtError, match="energy must be in"):
        smollm2_fast.generate("hi", mode="speculative", draft="lowrank:1.5")
    with pytest.raises(minirt.MinirtError, match="draft length"):
        smollm2_fast.generate("hi", mode="speculative", draft_k=0)


# ---- sampling: the distribution of speculative output equals the model's ------------------------------
VOCAB = 8


@pytest.fixture(scope="module")
def tiny():
    """A 2-layer LLaMA with 8 tokens and random weights large enough for peaked, distinct distributions."""
    cfg = ModelConfig("llama", vocab_size=VOCAB, dim=32, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=16,
                      hidden_dim=64, max_ctx=64, norm_eps=1e-5)
    rng = np.random.default_rng(0)

    def t(*shape, scale=0.5):
        return Tensor(rng.normal(0, scale, shape).astype(np.float32), "F32", shape)
    tensors = {"embed": t(VOCAB, 32, scale=1.0), "norm.weight": Tensor(np.ones(32, np.float32), "F32", (32,))}
    for i in range(2):
        p = f"layers.{i}."
        tensors |= {p + "attn_norm.weight": Tensor(np.ones(32, np.float32), "F32", (32,)),
                    p + "ffn_norm.weight": Tensor(np.ones(32, np.float32), "F32", (32,)),
                    p + "wq": t(32, 32), p + "wk": t(16, 32), p + "wv": t(16, 32), p + "wo": t(32, 32),
                    p + "w_gate": t(64, 32), p + "w_up": t(64, 32), p + "w_down": t(32, 64)}
    return minirt.Model.from_checkpoint(Checkpoint(cfg, tensors, TokenizerSpec("none"), None))


def exact_marginals(model, prompt, params, steps):
    """P(token at step s) for s = 1..steps, by enumerating every continuation (repetition penalty aware)."""
    s = Sampler(params)
    marg = [np.zeros(VOCAB) for _ in range(steps)]
    frontier = {(): 1.0}
    for step in range(steps):
        nxt = {}
        for seq, pr in frontier.items():
            ids = list(prompt) + list(seq)
            p = s.distribution(model.logits(ids)[-1], ids)
            for tok in np.flatnonzero(p):
                marg[step][tok] += pr * p[tok]
                nxt[seq + (int(tok),)] = pr * p[tok]
        frontier = nxt
    return marg


CHI2_999 = {7: 24.32}  # chi-square critical value, 7 degrees of freedom, significance 0.001


@pytest.mark.parametrize("params,draft", [
    (dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0), "layers:1"),
    (dict(temperature=0.7, top_k=5, top_p=0.9, min_p=0.05, repetition_penalty=1.3), "layers:1"),
    (dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0), "lowrank:0.6"),  # q from a different model
])
def test_sampled_tokens_follow_the_model(tiny, params, draft):
    prompt, steps, n = [1, 2, 3], 3, 3000
    marg = exact_marginals(tiny, prompt, SamplingParams(**params), steps)
    counts = np.zeros((steps, VOCAB))
    for seed in range(n):
        gen = tiny.generate(prompt, max_tokens=steps, seed=seed, mode="speculative", draft=draft, draft_k=2,
                            **params)
        gen.text()
        for step, tok in enumerate(gen.stats.tokens):
            counts[step, tok] += 1
    assert gen.spec.proposed > 0
    for step in range(1, steps):  # token 1 comes from the prefill; tokens 2 and 3 from verification
        live = marg[step] > 0
        assert counts[step][~live].sum() == 0
        expected = marg[step][live] * n
        chi2 = ((counts[step][live] - expected) ** 2 / expected).sum()
        assert chi2 < CHI2_999[7] if live.sum() == 8 else chi2 < 30, (step, chi2, counts[step], expected)
