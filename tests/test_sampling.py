"""Sampling rules against their definitions, on small hand-made distributions."""
from __future__ import annotations

import numpy as np
import pytest

from minirt import MinirtError, SamplingParams
from minirt.sampling import Sampler

LOGITS = np.log(np.array([0.5, 0.2, 0.15, 0.1, 0.05]))


def dist(**kw):
    base = dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)
    return Sampler(SamplingParams(**{**base, **kw})).distribution(LOGITS)


def test_plain_softmax():
    assert np.allclose(dist(), [0.5, 0.2, 0.15, 0.1, 0.05])


def test_temperature():
    p = np.array([0.5, 0.2, 0.15, 0.1, 0.05]) ** 2
    assert np.allclose(dist(temperature=0.5), p / p.sum())


def test_top_k():
    assert np.allclose(dist(top_k=2), [0.5 / 0.7, 0.2 / 0.7, 0, 0, 0])


def test_top_p_keeps_smallest_set_reaching_p():
    assert np.allclose(dist(top_p=0.7), [0.5 / 0.7, 0.2 / 0.7, 0, 0, 0])
    assert np.allclose(dist(top_p=0.71), np.array([0.5, 0.2, 0.15, 0, 0]) / 0.85)


def test_min_p():
    assert np.allclose(dist(min_p=0.3), np.array([0.5, 0.2, 0.15, 0, 0]) / 0.85)


def test_greedy_and_repetition_penalty():
    s = Sampler(SamplingParams(temperature=0, repetition_penalty=3.0))
    logits = np.array([2.0, 1.0, -1.0])
    assert s(logits) == 0
    assert s(logits, history=[0]) == 1  # 2/3 < 1
    assert np.allclose(s.penalize(np.array([2.0, 1.0, -1.0]), [0, 2]), [2 / 3, 1.0, -3.0])


def test_seeded_draws_reproduce_and_follow_distribution():
    draws = [Sampler(SamplingParams(temperature=1, top_k=0, top_p=1, min_p=0, seed=7)) for _ in range(2)]
    a = [draws[0](LOGITS) for _ in range(4000)]
    b = [draws[1](LOGITS) for _ in range(4000)]
    assert a == b
    freq = np.bincount(a, minlength=5) / len(a)
    assert np.abs(freq - [0.5, 0.2, 0.15, 0.1, 0.05]).max() < 0.03


@pytest.mark.parametrize("kw", [dict(temperature=-1), dict(top_p=0), dict(top_p=1.5), dict(min_p=1.0),
                                dict(top_k=-1), dict(repetition_penalty=0)])
def test_bad_parameters(kw):
    with pytest.raises(MinirtError):
        SamplingParams(**kw)
