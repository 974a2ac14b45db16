"""GGUF reader (llama, gpt2) on top of the `gguf` package, which memory-maps the file."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np

from ..config import ModelConfig
from ..errors import MinirtError
from .base import Checkpoint, Tensor, TokenizerSpec

SUPPORTED = {"F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"}

# GGUF tensor name → canonical name ({i} = layer index)
NAMES = {
    "token_embd.weight": "embed",
    "position_embd.weight": "pos_embed",
    "output_norm.weight": "norm.weight",
    "output_norm.bias": "norm.bias",
    "output.weight": "head",
    "blk.{i}.attn_norm.weight": "layers.{i}.attn_norm.weight",
    "blk.{i}.attn_norm.bias": "layers.{i}.attn_norm.bias",
    "blk.{i}.ffn_norm.weight": "layers.{i}.ffn_norm.weight",
    "blk.{i}.ffn_norm.bias": "layers.{i}.ffn_norm.bias",
    "blk.{i}.attn_q.weight": "layers.{i}.wq",
    "blk.{i}.attn_k.weight": "layers.{i}.wk",
    "blk.{i}.attn_v.weight": "layers.{i}.wv",
    "blk.{i}.attn_q.bias": "layers.{i}.bq",
    "blk.{i}.attn_k.bias": "layers.{i}.bk",
    "blk.{i}.attn_v.bias": "layers.{i}.bv",
    "blk.{i}.attn_qkv.weight": "layers.{i}.wqkv",
    "blk.{i}.attn_qkv.bias": "layers.{i}.bqkv",
    "blk.{i}.attn_output.weight": "layers.{i}.wo",
    "blk.{i}.attn_output.bias": "layers.{i}.bo",
    "blk.{i}.ffn_gate.weight": "layers.{i}.w_gate",
    "blk.{i}.ffn_gate.bias": "layers.{i}.b_gate",
    "blk.{i}.ffn_up.weight": "layers.{i}.w_up",
    "blk.{i}.ffn_up.bias": "layers.{i}.b_up",
    "blk.{i}.ffn_down.weight": "layers.{i}.w_down",
    "blk.{i}.ffn_down.bias": "layers.{i}.b_down",
}


def canonical_name(name: str) -> str | None:
    parts = name.split(".")
    if parts[0] == "blk" and len(parts) > 2 and parts[1].isdigit():
        tmpl = NAMES.get(".".join(["blk", "{i}"] + parts[2:]))
        return tmpl.format(i=int(parts[1])) if tmpl else None
    return NAMES.get(name)


def unpermute_rope_rows(n_heads: int, rows: int) -> np.ndarray:
    """Row order that undoes llama.cpp's Q/K permutation (adjacent-pair RoPE → HF rotate-half).

    llama.cpp's converter maps HF row (h, j, p) → GGUF row (h, p, j) for head h, half j ∈ {0,1} and
    pair p; the inverse gathers GGUF rows in HF order."""
    hd = rows // n_heads
    return np.arange(rows).reshape(n_heads, hd // 2, 2).transpose(0, 2, 1).reshape(-1)


def read_gguf(path: Path) -> Checkpoint:
    try:
        from gguf import GGUFReader
        reader = GGUFReader(str(path), "r")
    except MinirtError:
        raise
    except Exception as e:  # the gguf package raises many kinds on a bad file
        raise MinirtError(f"{path}: not a readable GGUF file (truncated or corrupt?): {type(e).__name__}: {e}") from None
    meta = {}
    for k, f in reader.fields.items():
        try:
            meta[k] = f.contents()
        except Exception:
            pass
    arch = meta.get("general.architecture")
    if arch not in ("llama", "gpt2"):
        raise MinirtError(f"{path}: architecture {arch!r} is not supported (llama and gpt2 are)")

    def m(key, default=None):
        v = meta.get(f"{arch}.{key}", default)
        if v is None:
            raise MinirtError(f"{path}: metadata {arch}.{key} is missing")
        return v

    size = path.stat().st_size
    tensors: dict[str, Tensor] = {}
    types = Counter()
    for t in reader.tensors:
        qtype = t.tensor_type.name
        if qtype not in SUPPORTED:
            raise MinirtError(f"{path}: tensor {t.name} has type {qtype}, which minirt does not read")
        if t.data_offset + t.n_bytes > size or t.data.nbytes != t.n_bytes:
            raise MinirtError(f"{path}: tensor {t.name} runs past the end of the file (truncated download?)")
        name = canonical_name(t.name)
        if name is None:
            continue
        shape = tuple(int(x) for x in reversed(t.shape.tolist()))  # GGUF lists ne0 (columns) first
        data = t.data
        if qtype == "BF16":
            data = data.view(np.uint16)
        tensors[name] = Tensor(data, qtype, shape if len(shape) > 1 else (shape[0],))
        if len(shape) == 2:
            types[qtype] += t.n_elements

    n_heads = int(m("attention.head_count"))
    n_kv = int(meta.get(f"{arch}.attention.head_count_kv", n_heads))
    dim = int(m("embedding_length"))
    if "embed" not in tensors:
        raise MinirtError(f"{path}: no token_embd.weight tensor")
    vocab = tensors["embed"].shape[0]
    cfg = ModelConfig(
        arch=arch, vocab_size=vocab, dim=dim, n_layers=int(m("block_count")), n_heads=n_heads, n_kv_heads=n_kv,
        head_dim=int(meta.get(f"{arch}.attention.key_length", dim // n_heads)),
        hidden_dim=int(m("feed_forward_length")), max_ctx=int(m("context_length")),
        norm_eps=float(meta.get(f"{arch}.attention.layer_norm_rms_epsilon",
                                meta.get(f"{arch}.attention.layer_norm_epsilon", 1e-5))),
        rope_theta=float(meta.get(f"{arch}.rope.freq_base", 10000.0)),
        tied_head="head" not in tensors,
    )
    if arch == "llama":
        for i in range(cfg.n_layers):
            for key, heads in ((f"layers.{i}.wq", cfg.n_heads), (f"layers.{i}.wk", cfg.n_kv_heads),
                               (f"layers.{i}.bq", cfg.n_heads), (f"layers.{i}.bk", cfg.n_kv_heads)):
                if key in tensors:  # llama.cpp permutes Q/K biases like the weights
                    tensors[key] = tensors[key].take_rows(unpermute_rope_rows(heads, tensors[key].shape[0]))
    return Checkpoint(cfg, tensors, _tokenizer(meta, path), path, types.most_common(1)[0][0] if types else "")


def _tokenizer(meta: dict, path: Path) -> TokenizerSpec:
    model = meta.get("tokenizer.ggml.model")
    common = dict(bos_id=meta.get("tokenizer.ggml.bos_token_id"), eos_id=meta.get("tokenizer.ggml.eos_token_id"),
                  chat_template=meta.get("tokenizer.chat_template"))
    if model == "gpt2":
        tokens = list(meta["tokenizer.ggml.tokens"])
        types = list(meta.get("tokenizer.ggml.token_type", [1] * len(tokens)))
        special = {t: i for i, (t, ty) in enumerate(zip(tokens, types)) if ty in (3, 4)}  # CONTROL, USER_DEFINED
        return TokenizerSpec("bpe", tokens=tokens, merges=list(meta.get("tokenizer.ggml.merges", [])), special=special,
                             pre=meta.get("tokenizer.ggml.pre", "gpt2"),
                             add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", False)), **common)
    if model is None:
        return TokenizerSpec("none", **common)
    raise MinirtError(f"{path}: tokenizer type {model!r} inside GGUF is not supported yet (byte-level BPE is)")
