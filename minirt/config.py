"""ModelConfig: the shape of a model, independent of the file it came from."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelConfig:
    arch: str            # "llama" | "gpt2"
    vocab_size: int
    dim: int             # residual width
    n_layers: int
    n_heads: int
    n_kv_heads: int      # < n_heads: grouped-query attention
    head_dim: int
    hidden_dim: int      # FFN width
    max_ctx: int         # trained context length
    norm_eps: float
    rope_theta: float = 10000.0   # llama only
    tied_head: bool = True        # output head shares the token embedding

    @property
    def q_dim(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim
