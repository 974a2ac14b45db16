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


def _has_gguf_magic(p: Path) -> bool:
    try:
        with open(p, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


__all__ = ["Checkpoint", "Tensor", "TokenizerSpec", "read_checkpoint"]
