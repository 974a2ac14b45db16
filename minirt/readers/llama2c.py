"""llama2.c checkpoints (karpathy/llama2.c `export.py`) and its `tokenizer.bin`.

Layouts (little-endian; matrices as PyTorch stores them, (out, in), float32 unless said):
- legacy (v0): 7 int32 (dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len), vocab_size
  negative when the classifier is not shared; then token embedding, all attention norms, all wq, wk, wv,
  wo, all ffn norms, all w1, w2, w3, the final norm, freq_cis real and imag (seq_len × head_size/2 each,
  unused) and, unshared, the classifier.
- v1: a 256-byte header: uint32 magic 0x616b3432 ("ak42"), int32 version, the 7 int32, uint8
  shared_classifier, zero padding; then all attention norms, all ffn norms, the final norm, the token
  embedding, all wq, wk, wv, wo, w1, w2, w3 and, unshared, the classifier.
- v2: as v1 with int32 group_size after the flag; norms in float32 first, then every matrix of the v1
  order (embedding first) as int8, then every matrix's float32 scales (one per group of group_size
  values, row-major): value = int8 × scale.
llama2.c's RoPE rotates adjacent pairs (as llama.cpp does, θ = 10000); the reader hands out Q/K rows in
Hugging Face's rotate-half order like every other reader. RMSNorm ε is 1e-5 (run.c).
tokenizer.bin: uint32 max_token_length, then per token: float32 score, int32 length, bytes (SentencePiece
pieces with ▁ written as a space, BOS/EOS as "\\n<s>\\n" / "\\n</s>\\n").
"""
from __future__ import annotations

import math
import struct
from pathlib import Path

import numpy as np

from ..config import ModelConfig
from ..errors import MinirtError
from .base import Checkpoint, Tensor, TokenizerSpec
from .gguf import unpermute_rope_rows
from .validate import check_config, validate

MAGIC = 0x616B3432
HEADER = 256


PER_LAYER = {"attn_norm.weight", "ffn_norm.weight", "wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down"}

def is_llama2c(path: Path) -> bool:
    """A guess from the header alone: the versioned magic, or seven plausible legacy int32."""
    try:
        with open(path, "rb") as f:
            head = f.read(28)
    except OSError:
        return False
    if len(head) < 28:
        return False
    if struct.unpack("<I", head[:4])[0] == MAGIC:
        return True
    dim, hidden, layers, heads, kv, vocab, seq = struct.unpack("<7i", head)
    return (0 < dim <= 1 << 16 and 0 < hidden <= 1 << 18 and 0 < layers <= 1024 and 0 < heads <= dim
            and 0 < kv <= heads and 0 < abs(vocab) <= 1 << 22 and 0 < seq <= 1 << 22 and dim % heads == 0)


def read_llama2c(path: str | Path) -> Checkpoint:
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(HEADER)
    if len(head) < 28:
        raise MinirtError(f"{path}: too short for a llama2.c checkpoint header (truncated?)")
    version, group = 0, 0
    if struct.unpack("<I", head[:4])[0] == MAGIC:
        if len(head) < HEADER:
            raise MinirtError(f"{path}: truncated llama2.c header ({len(head)} of {HEADER} bytes)")
        version = struct.unpack("<i", head[4:8])[0]
        if version not in (1, 2):
            raise MinirtError(f"{path}: llama2.c format version {version} is not supported (0, 1 and 2 are)")
        dim, hidden, n_layers, n_heads, n_kv, vocab, seq = struct.unpack("<7i", head[8:36])
        shared = bool(head[36])
        if version == 2:
            group = struct.unpack("<i", head[37:41])[0]
        start = HEADER
    else:
        dim, hidden, n_layers, n_heads, n_kv, vocab, seq = struct.unpack("<7i", head[:28])
        shared, vocab = vocab > 0, abs(vocab)
        start = 28
    if not (0 < dim and 0 < hidden and 0 < n_layers <= 1024 and 0 < n_heads and 0 < n_kv <= n_heads
            and dim % n_heads == 0 and n_heads % n_kv == 0 and (dim // n_heads) % 2 == 0 and 0 < vocab and 0 < seq):
        raise MinirtError(f"{path}: implausible llama2.c header (dim {dim}, hidden {hidden}, layers {n_layers}, "
                          f"heads {n_heads}/{n_kv}, vocab {vocab}, seq {seq}): not a llama2.c checkpoint?")
    hs = dim // n_heads
    kv_dim = n_kv * hs
    L = n_layers
    cfg = ModelConfig("llama", vocab_size=vocab, dim=dim, n_layers=L, n_heads=n_heads, n_kv_heads=n_kv, head_dim=hs,
                      hidden_dim=hidden, max_ctx=seq, norm_eps=1e-5, rope_theta=10000.0, tied_head=shared)
    check_config(cfg, path)  # bounded before any size below is computed from it
    mats = [("embed", (vocab, dim), 1)] + [
        (name, shape, L) for name, shape in (("wq", (dim, dim)), ("wk", (kv_dim, dim)), ("wv", (kv_dim, dim)),
                                             ("wo", (dim, dim)), ("w_gate", (hidden, dim)), ("w_down", (dim, hidden)),
                                             ("w_up", (hidden, dim)))]
    if not shared:
        mats.append(("head", (vocab, dim), 1))
    norms = [("attn_norm.weight", (dim,), L), ("ffn_norm.weight", (dim,), L), ("norm.weight", (dim,), 1)]
    if version == 0:
        layout = ([mats[0], norms[0]] + mats[1:5] + [norms[1]] + mats[5:8] + [norms[2]]
                  + [("freq_cis", (seq, hs // 2), 2)] + mats[8:])
    elif version == 1:
        layout = norms + mats
    else:
        layout = norms
    n_floats = sum(math.prod(s) * k for _, s, k in layout)
    n_q = sum(math.prod(s) * k for _, s, k in mats) if version == 2 else 0
    if version == 2:
        if group <= 0 or any(math.prod(s) % group for _, s, _ in mats):
            raise MinirtError(f"{path}: llama2.c v2 group size {group} does not divide the matrices")
    expected = start + 4 * n_floats + n_q + (4 * n_q // group if version == 2 else 0)
    if size != expected:
        what = "truncated" if size < expected else "longer than its header says"
        raise MinirtError(f"{path}: {what} ({size} bytes, a llama2.c v{version} checkpoint of this shape has "
                          f"{expected})")
    mm = np.memmap(path, dtype=np.uint8, mode="r")
    raw: dict[str, np.ndarray] = {}
    pos = start

    def take(count: int, dtype) -> np.ndarray:
        nonlocal pos
        nbytes = int(count) * np.dtype(dtype).itemsize
        a = mm[pos:pos + nbytes].view(dtype)
        pos += nbytes
        return a

    def stacked(name: str, k: int) -> bool:  # per-layer arrays keep their layer axis, even with one layer
        return k > 1 or name in PER_LAYER

    for name, shape, k in layout:
        raw[name] = take(k * np.prod(shape), np.float32).reshape((k,) + shape) if stacked(name, k) else \
            take(np.prod(shape), np.float32).reshape(shape)
    if version == 2:
        q = {name: take(k * np.prod(shape), np.int8).reshape((k,) + shape) for name, shape, k in mats}
        for name, shape, k in mats:
            s = take(k * np.prod(shape) // group, np.float32)
            raw[name] = (q[name].reshape(-1, group).astype(np.float32) * s[:, None]).reshape(q[name].shape)
        for name, shape, k in mats:
            if not stacked(name, k):
                raw[name] = raw[name].reshape(shape)

    f32 = lambda a: Tensor(np.asarray(a), "F32", tuple(a.shape))  # noqa: E731
    t = {"embed": f32(raw["embed"]), "norm.weight": f32(raw["norm.weight"])}
    if not shared:
        t["head"] = f32(raw["head"])
    for i in range(L):
        for name in ("attn_norm.weight", "ffn_norm.weight", "wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down"):
            t[f"layers.{i}.{name}"] = f32(raw[name][i])
        t[f"layers.{i}.wq"] = t[f"layers.{i}.wq"].take_rows(unpermute_rope_rows(n_heads, dim))
        t[f"layers.{i}.wk"] = t[f"layers.{i}.wk"].take_rows(unpermute_rope_rows(n_kv, kv_dim))
    return validate(Checkpoint(cfg, t, TokenizerSpec("none"), path, "F32", mm))


def read_llama2c_tokenizer(path: str | Path, vocab_size: int) -> dict:
    """tokenizer.bin → the GGUF tokenizer metadata llama.cpp's convert-llama2c-to-ggml writes (SentencePiece
    "llama" vocabulary: tokens with ▁ for spaces, scores, token types; unk 0, bos 1, eos 2)."""
    path = Path(path)
    data = path.read_bytes()
    if len(data) < 4:
        raise MinirtError(f"{path}: too short for a llama2.c tokenizer.bin")
    (max_len,) = struct.unpack_from("<I", data, 0)
    pos, tokens, scores, types = 4, [], [], []
    for i in range(vocab_size):
        if pos + 8 > len(data):
            raise MinirtError(f"{path}: ends after {i} of {vocab_size} tokens (truncated, or a tokenizer for "
                              f"another vocabulary)")
        score, n = struct.unpack_from("<fi", data, pos)
        pos += 8
        if n < 0 or n > max(max_len, 64) or pos + n > len(data):
            raise MinirtError(f"{path}: token {i} has a bad length {n} (corrupt or truncated)")
        text = data[pos:pos + n].decode("utf-8", errors="replace")
        pos += n
        if i == 0:
            text, ty = "<unk>", 2
        elif i in (1, 2):
            text, ty = ("<s>", "</s>")[i - 1], 3
        elif len(text) == 6 and text.startswith("<0x") and text.endswith(">"):
            ty = 6
        else:
            ty = 1
        tokens.append(text.replace(" ", "\u2581"))
        scores.append(float(score))
        types.append(ty)
    if pos != len(data):
        raise MinirtError(f"{path}: {len(data) - pos} bytes left after {vocab_size} tokens (a tokenizer for a "
                          f"larger vocabulary?)")
    return {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.scores": scores,
            "tokenizer.ggml.token_type": types, "tokenizer.ggml.unknown_token_id": 0,
            "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.add_bos_token": True,
            "tokenizer.ggml.add_eos_token": False}
