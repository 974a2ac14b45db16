"""Jacobi (block-refinement) decoding: greedy output token-identical to plain greedy decoding, with exact
iterations and with the pinv transition in the iterations; the KV cache after the blocks equals a fresh run."""
from __future__ import annotations

import numpy as np
import pytest

import minirt
from minirt.modes.pinv import with_pinv

PROMPTS = [
    "Once upon a time",
    "Repeat exactly: alpha beta gamma delta epsilon. Repeat exactly: alpha beta gamma delta epsilon. Repeat exactly:",
    "def add(a, b):\n    return a + b\n\ndef sub(a, b):\n",
    "The capital of France is",
]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_is_token_identical(smollm2_fast, prompt):
    plain = smollm2_fast.generate(prompt, max_tokens=20, temperature=0)
    plain.text()
    exact_iters = smollm2_fast.generate(prompt, max_tokens=20, temperature=0, mode="jacobi", block=4)
    exact_iters.text()
    assert exact_iters.stats.tokens == plain.stats.tokens
    pm = with_pinv(smollm2_fast, 16, 0.3)
    jac = pm.generate(prompt, max_tokens=20, temperature=0, mode="jacobi", block=7)
    jac.text()
    assert jac.stats.tokens == plain.stats.tokens
    assert jac.jacobi.blocks > 0 and jac.jacobi.iterations > 0
    assert pm.pinv.stats.shortcut > 0                 # the transition did predict rows in the iterations


def test_cache_after_blocks_equals_fresh_run(smollm2):
    gen = smollm2.generate(PROMPTS[2], max_tokens=13, temperature=0, mode="jacobi", block=5)
    gen.text()
    ids = smollm2.tokenizer.encode(PROMPTS[2]) + gen.stats.tokens
    assert gen.cache.pos == len(ids) - 1
    got = smollm2.forward([ids[-1]], gen.cache)[0]
    want = smollm2.logits(ids)[-1]
    assert np.abs(got - want).max() < 2e-3


def test_bad_jacobi_arguments(smollm2_fast):
    with pytest.raises(minirt.MinirtError, match="greedily"):
        smollm2_fast.generate("hi", mode="jacobi", temperature=0.8)
    with pytest.raises(minirt.MinirtError, match="block size"):
        smollm2_fast.generate("hi", mode="jacobi", temperature=0, block=8)


def test_cli_modes(capsys):
    from minirt.cli import main
    assert main(["generate", "-p", "Once upon a time", "-n", "6", "--temperature", "0", "--mode", "jacobi",
                 "--block", "3", "--pinv-tol", "0.2"]) == 0
    err = capsys.readouterr().err
    assert "jacobi:" in err and "exact passes" in err and "of FFN rows predicted" in err
    assert main(["generate", "-p", "Once upon a time", "-n", "6", "--mode", "pinv", "--pinv-window", "8"]) == 0
    assert "pinv: window 8, tol 0.1" in capsys.readouterr().err
    assert main(["generate", "-p", "hi", "-n", "4", "--mode", "jacobi"]) == 1     # sampling: one-line error
    assert "greedily" in capsys.readouterr().err
