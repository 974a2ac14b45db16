"""GGUF reader (the families of arch.TRAITS): a lean header parser, tensors memory-mapped where they lie.

The `gguf` package supplies the typed constants (tensor types, block sizes). Its GGUFReader is not used
for reading: it builds a numpy view per metadata item and takes ~2 s on SmolLM2's 49k-token vocabulary;
parsing the header with struct takes ~0.1 s.
"""
from __future__ import annotations

import math
import mmap
import struct
from collections import Counter
from pathlib import Path

import numpy as np

from ..arch import TRAITS
from ..config import ModelConfig
from ..errors import MinirtError
from .base import Checkpoint, Tensor, TokenizerSpec
from .validate import LIMITS, need_float, need_int, tensor_nbytes, validate

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
    "blk.{i}.attn_q_norm.weight": "layers.{i}.q_norm",               # Gemma 3: q/k norms, post norms
    "blk.{i}.attn_k_norm.weight": "layers.{i}.k_norm",
    "blk.{i}.post_attention_norm.weight": "layers.{i}.post_attn_norm.weight",
    "blk.{i}.post_ffw_norm.weight": "layers.{i}.post_ffn_norm.weight",
    "rope_freqs.weight": "rope_freqs",                                 # llama3 RoPE scaling (into the config)
}


# general.file_type (llama_ftype) as llama.cpp names it (llama_model_ftype_name, without "MOSTLY_")
FILE_TYPE_NAMES = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K",
                   11: "Q3_K_S", 12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S",
                   17: "Q5_K_M", 18: "Q6_K", 21: "Q2_K_S", 25: "IQ4_NL", 30: "IQ4_XS", 32: "BF16"}
# without the key, llama.cpp names a file after its most frequent tensor type, a K type as its _M mix
GUESSED = {"Q3_K": "Q3_K_M", "Q4_K": "Q4_K_M", "Q5_K": "Q5_K_M"}


def file_type_name(meta: dict, matrix_types: Counter) -> str:
    """The file type for reports, as llama.cpp names it: general.file_type where the file has a known one,
    else the most frequent matrix type (by number of matrices)."""
    ft = meta.get("general.file_type")
    if isinstance(ft, int) and ft in FILE_TYPE_NAMES:
        return FILE_TYPE_NAMES[ft]
    if not matrix_types:
        return ""
    t = matrix_types.most_common(1)[0][0]
    return GUESSED.get(t, t)


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
MAX_DEPTH = 4          # arrays of arrays (llama.cpp's reader takes none; gguf-py writes none)
MAX_NAME = 256         # tensor name bytes (llama.cpp: GGML_MAX_NAME = 64; minirt is a little more lenient)
INT64_MAX = (1 << 63) - 1


_U64 = struct.Struct("<Q")


class _Header:
    """Cursor over the GGUF header bytes; every read is bounds-checked, every count bounded by the bytes left."""

    def __init__(self, buf, path: Path):
        self.buf, self.pos, self.path = buf, 0, path

    def fail(self, what: str):
        raise MinirtError(f"{self.path}: corrupt GGUF header ({what})")

    def truncated(self):
        raise MinirtError(f"{self.path}: GGUF header runs past the end of the file (truncated or corrupt)")

    def take(self, n: int):
        if n < 0 or self.pos + n > len(self.buf):
            self.truncated()
        b = self.buf[self.pos:self.pos + n]
        self.pos += n
        return b

    def left(self) -> int:
        return len(self.buf) - self.pos

    def scalar(self, t: int):
        fmt = _SCALARS.get(t)
        if fmt is None:
            self.fail(f"unknown value type {t}")
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        (n,) = struct.unpack("<Q", self.take(8))
        return bytes(self.take(n)).decode("utf-8", errors="replace")

    def strings(self, n: int) -> list[str]:
        """n strings in a row (a vocabulary: 262,144 of them for Gemma), read in one tight loop."""
        buf, pos, end, out = self.buf, self.pos, len(self.buf), [""] * n
        for i in range(n):
            if pos + 8 > end:
                self.truncated()
            (k,) = _U64.unpack_from(buf, pos)
            if k > end - pos - 8:
                self.truncated()
            out[i] = str(buf[pos + 8:pos + 8 + k], "utf-8", "replace")
            pos += 8 + k
        self.pos = pos
        return out

    def value(self, t: int, depth: int = 0):
        if t == 8:
            return self.string()
        if t == 9:
            if depth >= MAX_DEPTH:
                self.fail(f"arrays nested more than {MAX_DEPTH} deep")
            et, n = struct.unpack("<IQ", self.take(12))
            least = {8: 8, 9: 12}.get(et, np.dtype(_NUMPY[et]).itemsize if et in _NUMPY else 1)
            if n * least > self.left():
                self.fail(f"an array of {n} items in {self.left()} bytes")
            if et == 8:
                return self.strings(n)
            if et in _NUMPY:
                dt = np.dtype(_NUMPY[et])
                return np.frombuffer(self.take(n * dt.itemsize), dt).tolist()
            if et != 9:
                self.fail(f"unknown value type {et}")
            return [self.value(et, depth + 1) for _ in range(n)]
        return self.scalar(t)


def _parse(path: Path):
    """(metadata dict, [(name, shape ne0-first, type id, offset)], data start, mmap), with the data placement
    checked as llama.cpp's gguf_init_from_file checks it: a power-of-two alignment; every tensor of a known
    type, its size without int64 overflow, at exactly the next aligned offset after the one before (so none
    is shifted, overlaps or lies outside the data section); and the data section ending where the file ends."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
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
    if n_kv * 13 + n_tensors * 24 > h.left():  # the smallest key and tensor entries
        h.fail(f"{n_tensors} tensors and {n_kv} keys cannot fit in {len(mm)} bytes")
    meta = {}
    for _ in range(n_kv):
        key = h.string()
        (t,) = struct.unpack("<I", h.take(4))
        if key in meta:
            h.fail(f"duplicate key {key}")
        meta[key] = h.value(t)
    align = meta.get("general.alignment", 32)
    if isinstance(align, bool) or not isinstance(align, int) or align <= 0 or align & (align - 1):
        h.fail(f"general.alignment {str(align)[:40]} is not a power of two")
    infos, seen = [], set()
    for _ in range(n_tensors):
        name = h.string()
        if len(name) > MAX_NAME or name in seen:
            h.fail(f"tensor name {name[:MAX_NAME]!r} too long or repeated")
        seen.add(name)
        (nd,) = struct.unpack("<I", h.take(4))
        if not 1 <= nd <= 4:
            h.fail(f"tensor {name} has {nd} dimensions")
        dims = struct.unpack(f"<{nd}Q", h.take(8 * nd))
        ttype, offset = struct.unpack("<IQ", h.take(12))
        try:
            block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(ttype)]
        except (ValueError, KeyError):
            h.fail(f"tensor {name} has unknown type code {ttype}")
        n = 1
        for d in dims:
            n *= d
        if n > INT64_MAX or any(d > INT64_MAX for d in dims) or dims[0] % block:
            h.fail(f"tensor {name} has a bad shape {list(reversed(dims))}")
        infos.append((name, dims, ttype, offset, n // block * type_size))
    start = -(-h.pos // align) * align
    expect = 0
    for name, dims, ttype, offset, nbytes in infos:
        if offset != expect:
            h.fail(f"tensor {name} at offset {offset}, expected {expect}: shifted, overlapping or misaligned")
        expect = offset + -(-nbytes // align) * align
        if start + offset + nbytes > len(mm):
            raise MinirtError(f"{path}: tensor {name} runs past the end of the file (truncated download?)")
    if infos and len(mm) > start + expect:
        h.fail(f"{len(mm) - start - expect} bytes after the last tensor: a tensor count, type or shape is wrong")
    return meta, [i[:4] for i in infos], start, mm


def _meta_int(meta: dict, key: str, path, default=None, lo: int = 1, hi: int | None = None) -> int:
    v = meta.get(key, default)
    if v is None:
        raise MinirtError(f"{path}: metadata {key} is missing")
    return need_int(v, f"metadata {key}", path, lo, hi)


def _family_options(arch: str, meta: dict, path: Path, dim: int, n_heads: int, head_dim: int, n_layers: int,
                    tensors: dict, ignored: list) -> dict:
    """ModelConfig fields a family's GGUF keys (and rope_freqs tensor) give beyond the common ones, as llama.cpp
    reads them: RoPE scaling (linear; llama3 as rope_freqs.weight), sliding windows, Gemma 3's options."""
    out: dict = {}
    kind = meta.get(f"{arch}.rope.scaling.type")
    factor = meta.get(f"{arch}.rope.scaling.factor", meta.get(f"{arch}.rope.scale_linear"))
    if kind not in (None, "none", "linear"):
        raise MinirtError(f"{path}: RoPE scaling {str(kind)[:40]!r} is not supported (linear and llama3 are)")
    if any(n.startswith("rope_factors_") for n in ignored):
        raise MinirtError(f"{path}: RoPE scaling 'longrope' (rope_factors_long/short) is not supported "
                          f"(linear and llama3 are)")
    if (kind == "linear" or kind is None) and factor is not None and factor != 1.0:
        out.update(rope_scaling="linear", rope_factor=need_float(factor, f"metadata {arch}.rope.scaling.factor", path))
    if "rope_freqs" in tensors:  # llama3 scaling, as llama.cpp's converter stores it (llama.cpp divides by these)
        if out:
            raise MinirtError(f"{path}: both linear RoPE scaling and rope_freqs factors (corrupt file?)")
        t = tensors.pop("rope_freqs")
        if t.shape != (head_dim // 2,):
            raise MinirtError(f"{path}: rope_freqs.weight has shape {list(t.shape)}, expected [{head_dim // 2}]")
        out.update(rope_scaling="llama3", rope_freq_factors=tuple(float(x) for x in t.float32()))
    window = meta.get(f"{arch}.attention.sliding_window")
    if window:
        out["sliding_window"] = _meta_int(meta, f"{arch}.attention.sliding_window", path, 0, lo=0,
                                          hi=LIMITS["max_ctx"])
        pattern = meta.get(f"{arch}.attention.sliding_window_pattern")
        if isinstance(pattern, list):  # llama.cpp: one flag per layer (true: sliding)
            if len(pattern) != n_layers or not all(isinstance(x, (bool, int)) for x in pattern):
                raise MinirtError(f"{path}: metadata {arch}.attention.sliding_window_pattern is not {n_layers} flags")
            out["swa_layers"] = tuple(bool(x) for x in pattern)
        elif pattern is not None:  # llama.cpp: every n-th layer is dense (0: none is)
            n = _meta_int(meta, f"{arch}.attention.sliding_window_pattern", path, lo=0, hi=LIMITS["n_layers"])
            out["swa_layers"] = tuple(n == 0 or i % n < n - 1 for i in range(n_layers))
    if arch == "gemma3":
        # llama.cpp: local (sliding-window) layers use RoPE base 10,000 unless the file says otherwise; queries
        # are scaled by 1/√head_dim, except the 27B model, whose query_pre_attn_scalar is width / heads
        out.update(rope_local_theta=need_float(meta.get(f"{arch}.rope.freq_base_swa", 10000.0),
                                               f"metadata {arch}.rope.freq_base_swa", path),
                   attn_scale=(dim // n_heads if dim == 5376 else head_dim) ** -0.5)
    return out


def read_gguf(path: Path) -> Checkpoint:
    from gguf import GGMLQuantizationType
    meta, infos, start, mm = _parse(path)
    arch = meta.get("general.architecture")
    if arch not in TRAITS:
        raise MinirtError(f"{path}: architecture {str(arch)[:40]!r} is not supported ({', '.join(TRAITS)} are)")

    tensors: dict[str, Tensor] = {}
    ignored: list[str] = []
    names: dict[str, str] = {}
    types = Counter()
    for tname, dims, ttype, offset in infos:
        qtype = GGMLQuantizationType(ttype).name
        shape = tuple(int(x) for x in reversed(dims))  # GGUF lists ne0 (columns) first
        name = canonical_name(tname)
        if name is None:
            ignored.append(tname)
            continue
        if qtype not in SUPPORTED:
            raise MinirtError(f"{path}: tensor {tname} has type {qtype}, which minirt does not read")
        if name in tensors:
            raise MinirtError(f"{path}: tensors {tname} and another both map to {name} (corrupt file?)")
        nbytes = tensor_nbytes(qtype, shape)
        rows = math.prod(shape[:-1])
        raw = np.frombuffer(mm, np.uint8, nbytes, start + offset).reshape(rows, nbytes // rows if rows else 0)
        if qtype in ("F32", "F16", "BF16"):
            data = raw.view({"F32": np.float32, "F16": np.float16, "BF16": np.uint16}[qtype]).reshape(shape)
        else:
            data = raw if len(shape) > 1 else raw.reshape(-1)
        tensors[name] = Tensor(data, qtype, shape)
        names[name] = tname
        if len(shape) == 2:
            types[qtype] += 1

    lim = LIMITS
    n_heads = _meta_int(meta, f"{arch}.attention.head_count", path, hi=lim["n_heads"])
    n_kv = _meta_int(meta, f"{arch}.attention.head_count_kv", path, n_heads, hi=lim["n_kv_heads"])
    dim = _meta_int(meta, f"{arch}.embedding_length", path, hi=lim["dim"])
    explicit = f"{arch}.attention.key_length" in meta
    head_dim = _meta_int(meta, f"{arch}.attention.key_length", path, dim // n_heads or 1, hi=lim["head_dim"])
    if _meta_int(meta, f"{arch}.attention.value_length", path, head_dim) != head_dim:
        raise MinirtError(f"{path}: attention value_length differs from key_length, which minirt does not run")
    if "embed" not in tensors:
        raise MinirtError(f"{path}: checkpoint is missing tensor token_embd.weight")
    n_layers = _meta_int(meta, f"{arch}.block_count", path, hi=lim["n_layers"])
    options = _family_options(arch, meta, path, dim, n_heads, head_dim, n_layers, tensors, ignored)
    eps = meta.get(f"{arch}.attention.layer_norm_rms_epsilon", meta.get(f"{arch}.attention.layer_norm_epsilon", 1e-5))
    cfg = ModelConfig(
        arch=arch, vocab_size=tensors["embed"].shape[0], dim=dim,
        n_layers=n_layers, n_heads=n_heads,
        n_kv_heads=n_kv, head_dim=head_dim,
        hidden_dim=_meta_int(meta, f"{arch}.feed_forward_length", path, hi=lim["hidden_dim"]),
        max_ctx=_meta_int(meta, f"{arch}.context_length", path, hi=lim["max_ctx"]),
        norm_eps=need_float(eps, "metadata layer_norm epsilon", path, 1.0),
        rope_theta=need_float(meta.get(f"{arch}.rope.freq_base", 10000.0), f"metadata {arch}.rope.freq_base", path),
        tied_head="head" not in tensors and "head.lr_u" not in tensors,
        **options,
    )
    ck = Checkpoint(cfg, tensors, _tokenizer(meta, path), path, file_type_name(meta, types), mm,
                    {k: v for k, v in meta.items() if k.startswith("minirt.")}, ignored=ignored, names=names)
    validate(ck, explicit_head_dim=explicit)  # shapes checked before the Q/K rows are reordered
    tensors = ck.tensors
    if TRAITS[arch].gguf_pairs:
        for i in range(cfg.n_layers):
            for key, heads in ((f"layers.{i}.wq", cfg.n_heads), (f"layers.{i}.wk", cfg.n_kv_heads),
                               (f"layers.{i}.bq", cfg.n_heads), (f"layers.{i}.bk", cfg.n_kv_heads)):
                if key in tensors:  # llama.cpp permutes Q/K biases like the weights
                    tensors[key] = tensors[key].take_rows(unpermute_rope_rows(heads, tensors[key].shape[0]))
    return ck


def read_gguf_tokenizer(path: str | Path) -> TokenizerSpec:
    """The tokenizer of a GGUF file alone (llama.cpp's vocabulary-only ggml-vocab-*.gguf files too)."""
    path = Path(path)
    meta, _, _, mm = _parse(path)
    mm.close()
    return _tokenizer(meta, path)


def _tokenizer(meta: dict, path: Path) -> TokenizerSpec:
    model = meta.get("tokenizer.ggml.model")

    def ints(key: str, n: int) -> list:
        v = meta.get(key)
        if not isinstance(v, list) or len(v) != n or not all(type(x) is int for x in v):
            raise MinirtError(f"{path}: metadata {key} is not a list of {n} integers (corrupt vocabulary)")
        return v

    def opt_id(key: str):
        v = meta.get(key)
        if v is not None and (type(v) is not int or v < 0):
            raise MinirtError(f"{path}: metadata {key} is {str(v)[:40]}, not a token id")
        return v

    template = meta.get("tokenizer.chat_template")
    common = dict(bos_id=opt_id("tokenizer.ggml.bos_token_id"), eos_id=opt_id("tokenizer.ggml.eos_token_id"),
                  chat_template=template if isinstance(template, str) else None)
    if model in ("gpt2", "llama"):
        tokens = meta.get("tokenizer.ggml.tokens")
        if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
            raise MinirtError(f"{path}: metadata tokenizer.ggml.tokens is not a list of strings")
        types = ints("tokenizer.ggml.token_type", len(tokens)) if "tokenizer.ggml.token_type" in meta else None
    if model == "gpt2":
        special: dict[str, int] = {}
        for i, (t, ty) in enumerate(zip(tokens, types or [])):
            if ty in (3, 4):  # CONTROL, USER_DEFINED
                if t in special or not t:
                    raise MinirtError(f"{path}: special token {t[:40]!r} (id {i}) is empty or repeated")
                special[t] = i
        merges = meta.get("tokenizer.ggml.merges", [])
        if not isinstance(merges, list) or not all(isinstance(m, str) for m in merges):
            raise MinirtError(f"{path}: metadata tokenizer.ggml.merges is not a list of strings")
        pre = meta.get("tokenizer.ggml.pre", "default")  # llama.cpp's default regexes where the key is missing
        return TokenizerSpec("bpe", tokens=tokens, merges=merges, special=special, pre=pre if isinstance(pre, str) else "",
                             add_bos=meta.get("tokenizer.ggml.add_bos_token", False) is True, **common)
    if model == "llama":  # SentencePiece BPE: pieces, scores and types as arrays (minirt.spm runs them)
        scores = meta.get("tokenizer.ggml.scores")
        if scores is not None and (not isinstance(scores, list) or len(scores) != len(tokens)
                                   or not all(isinstance(x, (int, float)) for x in scores)):
            raise MinirtError(f"{path}: metadata tokenizer.ggml.scores is not a list of {len(tokens)} numbers")
        for key in ("tokenizer.ggml.unknown_token_id", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id"):
            v = opt_id(key)
            if v is not None and v >= len(tokens):
                raise MinirtError(f"{path}: metadata {key} {v} is past the {len(tokens)} tokens")
        from ..spm import vocab_arrays
        vocab = dict(**vocab_arrays(tokens, scores, types), unk_id=meta.get("tokenizer.ggml.unknown_token_id", 0),
                     add_dummy_prefix=bool(meta.get("tokenizer.ggml.add_space_prefix", True)),
                     remove_extra_whitespaces=bool(meta.get("tokenizer.ggml.remove_extra_whitespaces", False)))
        return TokenizerSpec("spm", spm_vocab=vocab,
                             add_bos=meta.get("tokenizer.ggml.add_bos_token", True) is True, **common)
    if model is None:
        return TokenizerSpec("none", **common)
    raise MinirtError(f"{path}: tokenizer type {str(model)[:40]!r} inside GGUF is not supported yet (byte-level BPE "
                      f"is)")
