"""ModelConfig: the shape of a model, independent of the file it came from."""
from __future__ import annotations

from dataclasses import dataclass

from .arch import TRAITS, Traits


@dataclass(frozen=True)
class ModelConfig:
    arch: str            # a key of arch.TRAITS: "llama" | "gpt2" | "gemma3"
    vocab_size: int
    dim: int             # residual width
    n_layers: int
    n_heads: int
    n_kv_heads: int      # < n_heads: grouped-query attention
    head_dim: int
    hidden_dim: int      # FFN width
    max_ctx: int         # trained context length
    norm_eps: float
    rope_theta: float = 10000.0   # RoPE base (of the global layers, where some layers are sliding-window)
    tied_head: bool = True        # output head shares the token embedding
    attn_scale: float | None = None   # scores · this (default 1/√head_dim; Gemma: query_pre_attn_scalar^-½)
    sliding_window: int = 0       # positions a sliding-window layer sees (see arch.Traits.swa_pattern)
    rope_local_theta: float = 10000.0  # RoPE base of the sliding-window layers

    @property
    def traits(self) -> Traits:
        return TRAITS[self.arch]

    @property
    def scale(self) -> float:
        return self.attn_scale if self.attn_scale is not None else self.head_dim ** -0.5

    def layer_window(self, i: int) -> int:
        """Positions layer i attends to (0: all)."""
        p = self.traits.swa_pattern
        return self.sliding_window if p and self.sliding_window and (i + 1) % p else 0

    def layer_theta(self, i: int) -> float:
        return self.rope_local_theta if self.layer_window(i) else self.rope_theta

    @property
    def q_dim(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim
