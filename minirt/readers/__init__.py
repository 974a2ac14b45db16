"""Readers: a file or folder → (ModelConfig, tensors under canonical names, tokenizer description).

Canonical tensor names and layouts, whatever the source:
  embed (vocab, dim) · pos_embed (ctx, dim) [gpt2] · norm.weight/.bias · head (vocab, dim) [untied only]
  layers.{i}.attn_norm.weight/.bias · layers.{i}.ffn_norm.weight/.bias
  layers.{i}.wq/wk/wv (llama) or wqkv (gpt2), with biases bq/bk/bv/bqkv where present · layers.{i}.wo (+bo)
  layers.{i}.w_gate (llama) · layers.{i}.w_up (+b_up) · layers.{i}.w_down (+b_down)
Matrices are (out_features, in_features). Q/K rows are in Hugging Face's rotate-half order: the GGUF
reader undoes llama.cpp's adjacent-pair permutation, so one RoPE kernel serves both sources.
Readers know nothing of kernels; they hand out Tensors that may still be quantized.
"""
from __future__ import annotations

import math
from pathlib import Path

from ..errors import MinirtError
from .base import Checkpoint, Tensor, TokenizerSpec


def read_checkpoint(path: str | Path) -> Checkpoint:
    p = Path(path)
    if p.is_dir() and (p / "lowrank.json").is_file():  # a low-rank export (minirt svd)
        from .gguf import read_gguf
        return read_gguf(p / "model.gguf")
    if p.is_dir():
        from .hf import read_hf_folder
        return read_hf_folder(p)
    if p.suffix == ".gguf" or _has_gguf_magic(p):
        from .gguf import read_gguf
        return read_gguf(p)
    raise MinirtError(f"{p}: not a GGUF file or a Hugging Face model folder")


def describe(path: str | Path) -> dict:
    """What `minirt show` prints: a file's architecture, sizes, tensor types and counts, tokenizer, template.
    The file is read and validated as for loading (so a bad file fails here with the same one line), but no
    model is built and no tensor data is read."""
    from collections import Counter
    from .llama2c import is_llama2c, read_llama2c
    p = Path(path)
    ck = read_llama2c(p) if p.is_file() and not _has_gguf_magic(p) and is_llama2c(p) else read_checkpoint(p)
    c, tok = ck.config, ck.tokenizer
    types = Counter(t.qtype for t in ck.tensors.values())
    params = sum(math.prod(t.shape) for t in ck.tensors.values())
    n_tok = (len(tok.tokens) if tok.kind == "bpe" and tok.tokens else None)
    return {
        "source": str(ck.source), "architecture": c.arch, "parameters": params, "layers": c.n_layers, "width": c.dim,
        "ffn width": c.hidden_dim, "heads": f"{c.n_heads} (kv {c.n_kv_heads}, head dim {c.head_dim})",
        "context": c.max_ctx, "vocabulary": c.vocab_size, "norm epsilon": c.norm_eps,
        **({"rope base": c.rope_theta} if c.traits.rope else {}),
        **({"rope scaling": c.rope_scaling} if c.rope_scaling else {}),
        **({"sliding window": c.sliding_window} if c.sliding_window else {}), "tied head": c.tied_head,
        "file type": ck.file_type, "tensors": f"{len(ck.tensors)} ({', '.join(f'{k} {n}' for k, n in sorted(types.items()))})",
        "tokenizer": tok.kind + (f", {n_tok} tokens" if n_tok else "") + (f", pre {tok.pre}" if tok.kind == "bpe" else ""),
        "chat template": "yes" if tok.chat_template else "no",
        **({"low-rank export": "yes"} if "minirt.lowrank.manifest" in ck.metadata else {}),
    }


def _has_gguf_magic(p: Path) -> bool:
    try:
        with open(p, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


__all__ = ["Checkpoint", "Tensor", "TokenizerSpec", "describe", "read_checkpoint"]
