"""Per-architecture traits: what distinguishes one family's forward pass from another's, as data.

The forward pass (model.py) reads these; a new family is a new entry here (plus its tensor names in the
readers), not a new copy of the loop.
    norm          "rms" (RMSNorm) | "layer" (LayerNorm with bias)
    ffn           "swiglu": silu(gate)·up | "geglu": gelu_tanh(gate)·up | "gelu": gelu_tanh(fc), no gate
    rope          rotary position embedding (rotate-half layout); else learned positions (pos_embed)
    qk_norm       RMSNorm over each head of q and k before RoPE (Gemma 3, Qwen3)
    post_norms    a norm on the attention and FFN outputs before they join the residual (Gemma 2/3)
    embed_scale   embeddings multiplied by √dim (Gemma)
    fused_qkv     the file stores q|k|v as one matrix (GPT-2's c_attn)
    swa_pattern   sliding-window attention: every swa_pattern-th layer is global (full attention, the file's
                  RoPE base), the others see the last cfg.sliding_window positions with RoPE base
                  cfg.rope_local_theta (Gemma 3: 6); 0 = no sliding window
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Traits:
    norm: str = "rms"
    ffn: str = "swiglu"
    rope: bool = True
    qk_norm: bool = False
    post_norms: bool = False
    embed_scale: bool = False
    fused_qkv: bool = False
    swa_pattern: int = 0


TRAITS = {
    "llama": Traits(),
    "gpt2": Traits(norm="layer", ffn="gelu", rope=False, fused_qkv=True),
    "gemma3": Traits(ffn="geglu", qk_norm=True, post_norms=True, embed_scale=True, swa_pattern=6),
}
