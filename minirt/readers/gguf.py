"""GGUF reader (llama, gpt2): a lean header parser, tensors memory-mapped where they lie.

The `gguf` package supplies the typed constants (tensor types, block sizes). Its GGUFReader is not used
for reading: it builds a numpy view per metadata item and takes ~2 s on SmolLM2's 49k-token vocabulary;
parsing the header with struct takes ~0.1 s.
"""
from __future__ import annotations

import mmap
import struct
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


LOWRANK_PARTS = ("lr_u", "lr_v", "lr_b")  # factor tensors of a low-rank export (minirt.lowrank)


def canonical_name(name: str) -> str | None:
    parts = name.split(".")
    if parts[-1] in LOWRANK_PARTS:  # blk.N.SITE.lr_u → layers.N.SITE.lr_u; output.lr_u → head.lr_u
        if parts[0] == "blk" and len(parts) == 4 and parts[1].isdigit():
            return f"layers.{int(parts[1])}.{parts[2]}.{parts[3]}"
        return f"head.{parts[1]}" if parts[0] == "output" and len(parts) == 2 else None
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


_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_NUMPY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "<u1", 10: "<u8", 11: "<i8",
          12: "<f8"}


class _Header:
    """Cursor over the GGUF header bytes; every read is bounds-checked."""

    def __init__(self, buf, path: Path):
        self.buf, self.pos, self.path = buf, 0, path

    def take(self, n: int):
        if n < 0 or self.pos + n > len(self.buf):
            raise MinirtError(f"{self.path}: GGUF header runs past the end of the file (truncated or corrupt)")
        b = self.buf[self.pos:self.pos + n]
        self.pos += n
        return b

    def scalar(self, t: int):
        fmt = _SCALARS.get(t)
        if fmt is None:
            raise MinirtError(f"{self.path}: unknown GGUF value type {t} (corrupt file?)")
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        (n,) = struct.unpack("<Q", self.take(8))
        return bytes(self.take(n)).decode("utf-8", errors="replace")

    def value(self, t: int):
        if t == 8:
            return self.string()
        if t == 9:
            et, n = struct.unpack("<IQ", self.take(12))
            if et == 8:
                return [self.string() for _ in range(n)]
            if et in _NUMPY:
                dt = np.dtype(_NUMPY[et])
                return np.frombuffer(self.take(n * dt.itemsize), dt).tolist()
            return [self.value(et) for _ in range(n)]
        return self.scalar(t)


def _parse(path: Path):
    """(metadata dict, [(name, shape ne0-first, type id, offset)], data start, mmap)."""
    with open(path, "rb") as f:
        try:
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except ValueError:
            raise MinirtError(f"{path}: empty file, not a GGUF model") from None
    h = _Header(memoryview(mm), path)
    if bytes(h.take(4)) != b"GGUF":
        raise MinirtError(f"{path}: not a GGUF file (bad magic)")
    version, n_tensors, n_kv = struct.unpack("<IQQ", h.take(20))
    if version not in (2, 3):
        raise MinirtError(f"{path}: GGUF version {version} is not supported (2 and 3 are)")
    if n_tensors > 1_000_000 or n_kv > 1_000_000:
        raise MinirtError(f"{path}: corrupt GGUF header ({n_tensors} tensors, {n_kv} keys)")
    meta = {}
    for _ in range(n_kv):
        key = h.string()
        (t,) = struct.unpack("<I", h.take(4))
        meta[key] = h.value(t)
    infos = []
    for _ in range(n_tensors):
        name = h.string()
        (nd,) = struct.unpack("<I", h.take(4))
        if nd > 4:
            raise MinirtError(f"{path}: tensor {name} has {nd} dimensions (corrupt file?)")
        dims = struct.unpack(f"<{nd}Q", h.take(8 * nd))
        ttype, offset = struct.unpack("<IQ", h.take(12))
        infos.append((name, dims, ttype, offset))
    align = int(meta.get("general.alignment", 32))
    start = -(-h.pos // align) * align
    return meta, infos, start, mm


def read_gguf(path: Path) -> Checkpoint:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    meta, infos, start, mm = _parse(path)
    arch = meta.get("general.architecture")
    if arch not in ("llama", "gpt2"):
        raise MinirtError(f"{path}: architecture {arch!r} is not supported (llama and gpt2 are)")

    def m(key, default=None):
        v = meta.get(f"{arch}.{key}", default)
        if v is None:
            raise MinirtError(f"{path}: metadata {arch}.{key} is missing")
        return v

    size = len(mm)
    tensors: dict[str, Tensor] = {}
    types = Counter()
    for tname, dims, ttype, offset in infos:
        try:
            qtype = GGMLQuantizationType(ttype).name
        except ValueError:
            qtype = f"type {ttype}"
        if qtype not in SUPPORTED:
            raise MinirtError(f"{path}: tensor {tname} has type {qtype}, which minirt does not read")
        block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(ttype)]
        shape = tuple(int(x) for x in reversed(dims))  # GGUF lists ne0 (columns) first
        if not shape or shape[-1] % block:
            raise MinirtError(f"{path}: tensor {tname} has a bad shape {shape}")
        rows = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
        row_bytes = shape[-1] // block * type_size
        a = start + offset
        if a + rows * row_bytes > size:
            raise MinirtError(f"{path}: tensor {tname} runs past the end of the file (truncated download?)")
        name = canonical_name(tname)
        if name is None:
            continue
        raw = np.frombuffer(mm, np.uint8, rows * row_bytes, a).reshape(rows, row_bytes)
        if qtype in ("F32", "F16", "BF16"):
            data = raw.view({"F32": np.float32, "F16": np.float16, "BF16": np.uint16}[qtype]).reshape(shape)
        else:
            data = raw if len(shape) > 1 else raw.reshape(-1)
        tensors[name] = Tensor(data, qtype, shape)
        if len(shape) == 2:
            types[qtype] += rows * shape[-1]

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
        tied_head="head" not in tensors and "head.lr_u" not in tensors,
    )
    if arch == "llama":
        for i in range(cfg.n_layers):
            for key, heads in ((f"layers.{i}.wq", cfg.n_heads), (f"layers.{i}.wk", cfg.n_kv_heads),
                               (f"layers.{i}.bq", cfg.n_heads), (f"layers.{i}.bk", cfg.n_kv_heads)):
                if key in tensors:  # llama.cpp permutes Q/K biases like the weights
                    tensors[key] = tensors[key].take_rows(unpermute_rope_rows(heads, tensors[key].shape[0]))
    return Checkpoint(cfg, tensors, _tokenizer(meta, path), path, types.most_common(1)[0][0] if types else "", mm,
                      {k: v for k, v in meta.items() if k.startswith("minirt.")})


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
    if model == "llama":  # SentencePiece: pieces, scores and types → a tokenizer.model built in memory
        from .spm import proto_from_gguf
        return TokenizerSpec("spm", spm_proto=proto_from_gguf(meta),
                             add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", True)), **common)
    if model is None:
        return TokenizerSpec("none", **common)
    raise MinirtError(f"{path}: tokenizer type {model!r} inside GGUF is not supported yet (byte-level BPE is)")
