"""The KV cache: keys and values of every layer for positions 0..pos-1, preallocated once; and the context
size a run uses, which sizes the caches (and through them the RoPE tables), not the model's trained maximum."""
from __future__ import annotations

import numpy as np

from .config import ModelConfig
from .errors import MinirtError

DEFAULT_CTX = 4096  # the context used when none is asked for (llama.cpp's and ollama's default)


def context_size(max_ctx: int, ctx: int | None = None) -> int:
    """The context a run uses: ctx when given (2 ≤ ctx ≤ max_ctx, the model's trained maximum), else
    min(DEFAULT_CTX, max_ctx). A file may claim a huge maximum; nothing is sized by it."""
    if ctx is None:
        return min(DEFAULT_CTX, max_ctx)
    if isinstance(ctx, bool) or not isinstance(ctx, (int, np.integer)):
        raise MinirtError(f"context size must be an integer, got {ctx!r}")
    if ctx < 2:
        raise MinirtError(f"context size must be ≥ 2, got {ctx}")
    if ctx > max_ctx:
        raise MinirtError(f"context size {ctx} exceeds the model's maximum of {max_ctx}: use --ctx {max_ctx} or less")
    return int(ctx)


# How keys and values are stored (llama.cpp's -ctk/-ctv): float32, or float16 held as its uint16 bits (the
# kernels round each value to the nearest f16 when they store it, and widen it exactly when attention reads it).
KV_TYPES = {"f32": np.float32, "f16": np.uint16}


def kv_dtype(kv_type: str) -> type:
    """The array dtype that holds a cache of kv_type ("f32" or "f16")."""
    if kv_type not in KV_TYPES:
        raise MinirtError(f"KV cache type must be one of {', '.join(KV_TYPES)}, got {kv_type!r}")
    return KV_TYPES[kv_type]


class KVCache:
    def __init__(self, cfg: ModelConfig, capacity: int, _pool=None, kv_type: str = "f32"):
        self.capacity = capacity
        if _pool is None:
            shape = (cfg.n_layers, cfg.n_kv_heads, capacity, cfg.head_dim)
            self.k = np.zeros(shape, kv_dtype(kv_type))  # calloc'd: pages cost memory only once written
            self.v = np.zeros(shape, kv_dtype(kv_type))
            self.pool, self.slot = None, 0
        else:  # slot i of a pool: see pooled()
            pool, i = _pool
            self.k, self.v, self.pool, self.slot = pool[0][:, i], pool[1][:, i], pool, i
        self.pos = 0  # number of filled positions; the next token goes to position pos

    @property
    def kv_type(self) -> str:
        return "f16" if self.k.dtype == np.uint16 else "f32"

    @classmethod
    def pooled(cls, cfg: ModelConfig, capacity: int, n: int, kv_type: str = "f32") -> list["KVCache"]:
        """n caches whose keys and values are slots of one array (L, n, Hkv, capacity, hd), so that a batched
        decode step (minirt.batch) runs all of them in one compiled call, addressing each by its slot. Layer
        first: a layer's slots, and a slot's layer (cache.k[layer]), are contiguous, as the kernels want."""
        shape = (cfg.n_layers, n, cfg.n_kv_heads, capacity, cfg.head_dim)
        pool = (np.zeros(shape, kv_dtype(kv_type)), np.zeros(shape, kv_dtype(kv_type)))
        return [cls(cfg, capacity, (pool, i)) for i in range(n)]

    def first_layers(self, n: int) -> "KVCache":
        """A view on this cache's first n layers (an early-exit drafter shares them), at the same position."""
        view = object.__new__(KVCache)
        view.capacity, view.pos, view.slot = self.capacity, self.pos, self.slot
        view.k, view.v = self.k[:n], self.v[:n]
        view.pool = None if self.pool is None else (self.pool[0][:n], self.pool[1][:n])
        return view

    def copy_prefix(self, src: "KVCache", n: int) -> None:
        """Hold src's first n positions (a server's prefix cache copies a shared prompt prefix this way)."""
        self.k[:, :, :n] = src.k[:, :, :n]
        self.v[:, :, :n] = src.v[:, :, :n]
        self.pos = n

    def truncate(self, pos: int) -> None:
        """Forget every position ≥ pos (speculative decoding rolls back rejected drafts this way)."""
        if not 0 <= pos <= self.pos:
            raise ValueError(f"cannot truncate a cache of {self.pos} positions to {pos}")
        self.pos = pos

    def reserve(self, n: int) -> None:
        if self.pos + n > self.capacity:
            raise MinirtError(f"context is full: {self.pos} + {n} tokens exceed the context of {self.capacity} "
                              "(shorten the prompt or raise --ctx)")
