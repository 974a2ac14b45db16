"""ModelConfig: the shape of a model, independent of the file it came from."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .arch import TRAITS, Traits

ROPE_SCALINGS = ("linear", "llama3")


@dataclass(frozen=True)
class ModelConfig:
    arch: str            # a key of arch.TRAITS: "llama" | "gpt2" | "gemma3" | "qwen2" | "qwen3" | "phi3"
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
    rope_local_theta: float | None = None  # RoPE base of the sliding-window layers (None: rope_theta; Gemma 3: 10,000)
    swa_layers: tuple[bool, ...] = ()  # which layers slide, where the file lists them (else traits.swa_pattern)
    # RoPE scaling of the global layers (sliding-window layers keep plain RoPE, as Hugging Face's Gemma 3 does):
    # "linear": positions / rope_factor; "llama3": frequencies divided by rope_freq_factors, which Llama 3.1's
    # parameters (factor, low/high_freq_factor, original context) give and llama.cpp's GGUF stores as
    # rope_freqs.weight (the parameters themselves are then unknown: rope_llama3 = ())
    rope_scaling: str = ""
    rope_factor: float = 1.0
    rope_llama3: tuple[float, float, int] = ()      # (low_freq_factor, high_freq_factor, original context)
    rope_freq_factors: tuple[float, ...] = ()

    @property
    def traits(self) -> Traits:
        return TRAITS[self.arch]

    @property
    def scale(self) -> float:
        return self.attn_scale if self.attn_scale is not None else self.head_dim ** -0.5

    def layer_window(self, i: int) -> int:
        """Positions layer i attends to (0: all)."""
        if not self.sliding_window:
            return 0
        if self.swa_layers:
            return self.sliding_window if self.swa_layers[i] else 0
        p = self.traits.swa_pattern
        return self.sliding_window if not p or (i + 1) % p else 0

    def layer_theta(self, i: int) -> float:
        return self.rope_local_theta if self.layer_window(i) and self.rope_local_theta else self.rope_theta

    @property
    def q_dim(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    def rope_inv_freq(self, theta: float) -> np.ndarray:
        """RoPE's angular frequencies θ^(−2i/hd) (float64, hd/2) for the layers of base theta, scaled where
        they are the global layers and the config scales them (rope_scaling)."""
        inv = 1.0 / theta ** (np.arange(0, self.head_dim, 2, dtype=np.float64) / self.head_dim)
        if theta != self.rope_theta or not self.rope_scaling:
            return inv
        if self.rope_scaling == "linear":
            return inv / self.rope_factor
        return inv / np.asarray(self.rope_freq_factors, np.float64)


def llama3_freq_factors(theta: float, head_dim: int, factor: float, low: float, high: float,
                        orig_ctx: int) -> tuple[float, ...]:
    """Llama 3.1's RoPE scaling as per-frequency divisors (transformers' _compute_llama3_parameters; the
    rope_freqs tensor llama.cpp's converter writes): wavelengths under orig_ctx/high keep their frequency,
    those over orig_ctx/low are divided by factor, and the ones between are interpolated smoothly."""
    out = []
    for i in range(0, head_dim, 2):
        wavelen = 2 * math.pi * theta ** (i / head_dim)
        if wavelen < orig_ctx / high:
            out.append(1.0)
        elif wavelen > orig_ctx / low:
            out.append(float(factor))
        else:
            smooth = (orig_ctx / wavelen - low) / (high - low)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return tuple(out)
