"""An independent float64 forward pass in plain numpy (picoGPT-style): no cache, no kernels, no minirt code.

It reads the model's matrices from a dict with Hugging Face layout (out, in), Q/K in rotate-half order.
"""
from __future__ import annotations

import numpy as np


def rmsnorm(x, w, eps):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def layernorm(x, w, b, eps):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


def softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def rope(x, theta, adjacent=False):
    """x (T, H, hd) at positions 0..T-1. Hugging Face rotates (i, i+hd/2) pairs; llama.cpp's GGUF layout
    (adjacent=True) rotates (2i, 2i+1) pairs of the permuted rows, which must give the same result."""
    T, H, hd = x.shape
    inv = theta ** (-np.arange(0, hd, 2) / hd)
    ang = np.arange(T)[:, None] * inv[None, :]
    cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
    if adjacent:
        x1, x2 = x[..., 0::2], x[..., 1::2]
        out = np.empty_like(x)
        out[..., 0::2], out[..., 1::2] = x1 * cos - x2 * sin, x2 * cos + x1 * sin
        return out
    x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def attention(q, k, v):  # q (T, H, hd), k/v (T, Hkv, hd)
    T, H, hd = q.shape
    rep = H // k.shape[1]
    k, v = np.repeat(k, rep, axis=1), np.repeat(v, rep, axis=1)
    s = np.einsum("thd,shd->hts", q, k) / np.sqrt(hd)
    s = s + np.triu(np.full((T, T), -np.inf), 1)
    return np.einsum("hts,shd->thd", softmax(s), v).reshape(T, H * hd)


def llama_forward(w, cfg, tokens, adjacent_rope=False, kv_f16=False):
    """Logits (T, vocab) of a LLaMA model; w: name → float64 array. kv_f16: keys (after RoPE) and values
    rounded to float16, as a float16 KV cache stores them."""
    x = w["embed"][tokens]
    T, hd = len(tokens), cfg.head_dim
    for i in range(cfg.n_layers):
        p = f"layers.{i}."
        h = rmsnorm(x, w[p + "attn_norm.weight"], cfg.norm_eps)
        q = rope((h @ w[p + "wq"].T).reshape(T, cfg.n_heads, hd), cfg.rope_theta, adjacent_rope)
        k = rope((h @ w[p + "wk"].T).reshape(T, cfg.n_kv_heads, hd), cfg.rope_theta, adjacent_rope)
        v = (h @ w[p + "wv"].T).reshape(T, cfg.n_kv_heads, hd)
        if kv_f16:
            k, v = k.astype(np.float16).astype(np.float64), v.astype(np.float16).astype(np.float64)
        x = x + attention(q, k, v) @ w[p + "wo"].T
        h = rmsnorm(x, w[p + "ffn_norm.weight"], cfg.norm_eps)
        g = h @ w[p + "w_gate"].T
        x = x + (g / (1 + np.exp(-g)) * (h @ w[p + "w_up"].T)) @ w[p + "w_down"].T
    x = rmsnorm(x, w["norm.weight"], cfg.norm_eps)
    return x @ w.get("head", w["embed"]).T


def gpt2_forward(w, cfg, tokens):
    T = len(tokens)
    x = w["embed"][tokens] + w["pos_embed"][:T]
    for i in range(cfg.n_layers):
        p = f"layers.{i}."
        h = layernorm(x, w[p + "attn_norm.weight"], w[p + "attn_norm.bias"], cfg.norm_eps)
        q, k, v = np.split(h @ w[p + "wqkv"].T + w[p + "bqkv"], 3, axis=-1)
        shape = (T, cfg.n_heads, cfg.head_dim)
        x = x + attention(q.reshape(shape), k.reshape(shape), v.reshape(shape)) @ w[p + "wo"].T + w[p + "bo"]
        h = layernorm(x, w[p + "ffn_norm.weight"], w[p + "ffn_norm.bias"], cfg.norm_eps)
        u = h @ w[p + "w_up"].T + w[p + "b_up"]
        u = 0.5 * u * (1 + np.tanh(np.sqrt(2 / np.pi) * (u + 0.044715 * u ** 3)))
        x = x + u @ w[p + "w_down"].T + w[p + "b_down"]
    x = layernorm(x, w["norm.weight"], w["norm.bias"], cfg.norm_eps)
    return x @ w.get("head", w["embed"]).T


GGUF_LLAMA = {"token_embd.weight": "embed", "output_norm.weight": "norm.weight", "output.weight": "head",
              "attn_norm.weight": "attn_norm.weight", "ffn_norm.weight": "ffn_norm.weight", "attn_q.weight": "wq",
              "attn_k.weight": "wk", "attn_v.weight": "wv", "attn_output.weight": "wo", "ffn_gate.weight": "w_gate",
              "ffn_up.weight": "w_up", "ffn_down.weight": "w_down"}


def gguf_llama_weights(path) -> dict[str, np.ndarray]:
    """Float64 weights straight from a GGUF file with the gguf package, rows as stored (Q/K permuted)."""
    from gguf import GGUFReader
    from gguf.quants import dequantize
    w = {}
    for t in GGUFReader(str(path)).tensors:
        parts = t.name.split(".")
        if parts[0] == "blk":
            name = f"layers.{parts[1]}." + GGUF_LLAMA[".".join(parts[2:])]
        else:
            name = GGUF_LLAMA[t.name]
        w[name] = dequantize(t.data, t.tensor_type).astype(np.float64)
    return w


def greedy(forward, prompt, steps):
    """Greedy continuation, recomputing the whole sequence each step (no cache)."""
    ids = list(prompt)
    for _ in range(steps):
        ids.append(int(np.argmax(forward(np.asarray(ids))[-1])))
    return ids[len(prompt):]
