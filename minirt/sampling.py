"""Sampling: logits → next token. Greedy, temperature, top-k, top-p, min-p, repetition penalty, seeded.

Order (as Hugging Face's logits warpers): repetition penalty, temperature, top-k, top-p, min-p.
distribution() returns the full probability vector, so speculative decoding can apply the same rules
to the drafter's and the model's logits.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .errors import MinirtError


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.8   # 0 → greedy
    top_k: int = 40            # 0 → off
    top_p: float = 0.95        # 1 → off
    min_p: float = 0.05        # 0 → off
    repetition_penalty: float = 1.0
    seed: int | None = None

    def __post_init__(self):
        for name in ("temperature", "top_p", "min_p", "repetition_penalty"):
            if not math.isfinite(getattr(self, name)):
                raise MinirtError(f"{name.replace('_', ' ')} must be a finite number, got {getattr(self, name)}")
        if self.seed is not None and self.seed < 0:
            raise MinirtError(f"seed must be ≥ 0, got {self.seed}")
        if self.temperature < 0:
            raise MinirtError(f"temperature must be ≥ 0, got {self.temperature}")
        if self.top_k < 0:
            raise MinirtError(f"top-k must be ≥ 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise MinirtError(f"top-p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.min_p < 1:
            raise MinirtError(f"min-p must be in [0, 1), got {self.min_p}")
        if self.repetition_penalty <= 0:
            raise MinirtError(f"repetition penalty must be > 0, got {self.repetition_penalty}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


class Sampler:
    def __init__(self, params: SamplingParams = SamplingParams()):
        self.params = params
        self.rng = np.random.default_rng(params.seed)

    def penalize(self, logits: np.ndarray, history) -> np.ndarray:
        r = self.params.repetition_penalty
        x = np.asarray(logits, dtype=np.float64)
        if r != 1.0 and len(history):
            x = x.copy()
            ids = np.unique(np.asarray(history, dtype=np.int64))
            v = x[ids]
            x[ids] = np.where(v > 0, v / r, v * r)
        return x

    def distribution(self, logits: np.ndarray, history=()) -> np.ndarray:
        """The probability vector the next token is drawn from (one-hot for greedy)."""
        p = self.params
        x = self.penalize(logits, history)
        if p.greedy:
            out = np.zeros_like(x)
            out[int(np.argmax(x))] = 1.0
            return out
        x = x / p.temperature
        if p.top_k and p.top_k < len(x):
            kth = np.partition(x, -p.top_k)[-p.top_k]
            x = np.where(x >= kth, x, -np.inf)
        probs = np.exp(x - x.max())
        probs /= probs.sum()
        if p.top_p < 1.0:
            live = np.flatnonzero(probs)  # after top-k only k candidates remain: sort just those
            order = live[np.argsort(-probs[live], kind="stable")]
            cum = np.cumsum(probs[order])
            keep = cum - probs[order] < p.top_p   # keep tokens until the mass before them reaches top_p
            mask = np.zeros_like(probs, dtype=bool)
            mask[order[keep]] = True
            probs = np.where(mask, probs, 0.0)
        if p.min_p > 0:
            probs = np.where(probs >= p.min_p * probs.max(), probs, 0.0)
        return probs / probs.sum()

    def draw(self, probs: np.ndarray) -> int:
        """A token from a probability vector: its argmax when greedy, else a seeded random draw."""
        if self.params.greedy:
            return int(np.argmax(probs))
        return int(self.rng.choice(len(probs), p=probs))

    def __call__(self, logits: np.ndarray, history=()) -> int:
        if self.params.greedy:  # skips the softmax: argmax of the penalized logits is the same token
            if self.params.repetition_penalty == 1.0:  # nothing to penalize: the same argmax without the copy
                return int(np.argmax(logits))
            return int(np.argmax(self.penalize(logits, history)))
        return self.draw(self.distribution(logits, history))
