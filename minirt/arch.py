"""Per-architecture traits: what distinguishes one family's forward pass from another's, as data.

The forward pass (model.py) reads these; a new family is a new entry here (plus its tensor names in the
readers), not a new copy of the loop.
    norm          "rms" (RMSNorm) | "layer" (LayerNorm with bias)
    ffn           "swiglu": silu(gate)·up | "geglu": gelu_tanh(gate)·up | "gelu": gelu_tanh(fc), no gate
    rope          rotary position embedding (rotate-half layout); else learned positions (pos_embed)
    qk_norm       RMSNorm over each head of q and k before RoPE (Gemma 3, Qwen3)
    post_norms    a norm on the attention and FFN outputs before they join the residual (Gemma 2/3)
    embed_scale   embeddings multiplied by √dim (Gemma)
    fused_qkv     the file stores q|k|v as one matrix (GPT-2's c_attn, Phi-3's qkv_proj)
    fused_up      the file stores gate|up as one matrix (Phi-3's gate_up_proj)
    swa_pattern   where cfg.sliding_window > 0: every swa_pattern-th layer is global (full attention, the file's
                  RoPE base), the others see the last cfg.sliding_window positions with RoPE base
                  cfg.rope_local_theta where set (Gemma 3: 6); 0 = every layer slides (Mistral, Phi-3); an explicit
                  per-layer list in the config (cfg.swa_layers) overrides the pattern
    gguf_pairs    llama.cpp's converter permutes this family's Q/K rows to adjacent RoPE pairs (LLaMA's
                  "normal" RoPE); the others keep Hugging Face's rotate-half rows ("neox")
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
    fused_up: bool = False
    swa_pattern: int = 0
    gguf_pairs: bool = False


TRAITS = {
    "llama": Traits(gguf_pairs=True),           # also Mistral (llama.cpp writes it as llama)
    "qwen2": Traits(),                           # Q/K/V biases: present as tensors
    "qwen3": Traits(qk_norm=True),
    "phi3": Traits(fused_qkv=True, fused_up=True),
    "gpt2": Traits(norm="layer", ffn="gelu", rope=False, fused_qkv=True),
    "gemma3": Traits(ffn="geglu", qk_norm=True, post_norms=True, embed_scale=True, swa_pattern=6),
}
