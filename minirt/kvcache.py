"""The KV cache: keys and values of every layer for positions 0..pos-1, preallocated once."""
from __future__ import annotations

import numpy as np

from .config import ModelConfig
from .errors import MinirtError


class KVCache:
    def __init__(self, cfg: ModelConfig, capacity: int):
        self.capacity = capacity
        shape = (cfg.n_layers, cfg.n_kv_heads, capacity, cfg.head_dim)
        self.k = np.zeros(shape, np.float32)  # calloc'd: pages cost memory only once written
        self.v = np.zeros(shape, np.float32)
        self.pos = 0  # number of filled positions; the next token goes to position pos

    def truncate(self, pos: int) -> None:
        """Forget every position ≥ pos (speculative decoding rolls back rejected drafts this way)."""
        if not 0 <= pos <= self.pos:
            raise ValueError(f"cannot truncate a cache of {self.pos} positions to {pos}")
        self.pos = pos

    def reserve(self, n: int) -> None:
        if self.pos + n > self.capacity:
            raise MinirtError(f"context is full: {self.pos} + {n} tokens exceed the context of {self.capacity} "
                              "(shorten the prompt or raise --ctx)")
