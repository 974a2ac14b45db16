"""The one check between reading a file and building a Model: nothing past validate() trusts the file.

1. The config: every number finite, positive and within LIMITS (generous bounds over today's models;
   Gemma 3's 262,144-token vocabulary is the largest in use), heads consistent with the width.
2. The tensors: every tensor the architecture needs is present with exactly the shape the config implies
   and a type minirt reads, its data of exactly that many bytes. Tensors of layers past the config's count
   are an error (never run fewer layers than the file has); other tensors the architecture does not use
   are reported in one warning line on stderr and dropped (llama.cpp's Llama 3 files carry rope_freqs).
Buffers, RoPE tables and kernels are sized from the config only after both checks pass.
"""
from __future__ import annotations

import math
import numbers
import re
import sys

from ..arch import TRAITS
from ..config import ROPE_SCALINGS, ModelConfig
from ..errors import MinirtError

# The bounds minirt accepts (README: "What a bad file can do"). Change them here only.
LIMITS = {
    "n_layers": 1024,
    "vocab_size": 1 << 20,
    "max_ctx": 1 << 20,
    "dim": 1 << 16, "hidden_dim": 1 << 18, "n_heads": 1 << 12, "n_kv_heads": 1 << 12, "head_dim": 1 << 12,
    "q_dim": 1 << 16, "rank": 1 << 16,
}
FLOAT_TYPES = {"F32": 4, "F16": 2, "BF16": 2}
BLOCK_TYPES = {"Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"}
READABLE = set(FLOAT_TYPES) | BLOCK_TYPES


def need_int(value, what: str, where, lo: int = 1, hi: int | None = None) -> int:
    """value as an int in lo..hi, or a one-line error naming the field (what) and the file (where)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        else:
            raise MinirtError(f"{where}: {what} is {_short(value)}, not an integer")
    value = int(value)
    if value < lo or (hi is not None and value > hi):
        bound = f"{lo}..{hi}" if hi is not None else f"at least {lo}"
        raise MinirtError(f"{where}: {what} is {value}, outside {bound} (corrupt file, or a model minirt cannot run)")
    return value


def need_float(value, what: str, where, hi: float = math.inf) -> float:
    """value as a finite float > 0 (and ≤ hi)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise MinirtError(f"{where}: {what} is {_short(value)}, not a number")
    value = float(value)
    if not (math.isfinite(value) and 0 < value <= hi):
        raise MinirtError(f"{where}: {what} is {value}, expected a finite number in (0, {hi:g}] (corrupt file?)")
    return value


def _short(v) -> str:
    s = repr(v)
    return s if len(s) <= 40 else s[:37] + "..."


def check_config(cfg: ModelConfig, where, explicit_head_dim: bool = False) -> None:
    """The config alone: bounded positive integers, finite positive epsilon and RoPE base, consistent heads."""
    if cfg.arch not in TRAITS:
        raise MinirtError(f"{where}: architecture {cfg.arch!r} is not supported ({', '.join(TRAITS)} are)")
    for f in ("n_layers", "vocab_size", "max_ctx", "dim", "hidden_dim", "n_heads", "n_kv_heads", "head_dim"):
        need_int(getattr(cfg, f), f, where, 1, LIMITS[f])
    need_float(cfg.norm_eps, "norm epsilon", where, hi=1.0)
    need_float(cfg.rope_theta, "RoPE base (rope_theta)", where)
    if cfg.n_kv_heads > cfg.n_heads or cfg.n_heads % cfg.n_kv_heads:
        raise MinirtError(f"{where}: {cfg.n_heads} attention heads cannot be shared by {cfg.n_kv_heads} KV heads "
                          f"(need a divisor)")
    need_int(cfg.q_dim, "heads × head_dim", where, 1, LIMITS["q_dim"])
    if not explicit_head_dim and cfg.q_dim != cfg.dim:
        raise MinirtError(f"{where}: width {cfg.dim} is not {cfg.n_heads} heads × {cfg.head_dim} (corrupt config?)")
    if cfg.traits.rope and cfg.head_dim % 2:
        raise MinirtError(f"{where}: head_dim {cfg.head_dim} is odd (RoPE rotates pairs)")
    if cfg.rope_local_theta is not None:
        need_float(cfg.rope_local_theta, "local RoPE base", where)
    need_float(cfg.scale, "attention scale", where)
    need_int(cfg.sliding_window, "sliding window", where, 0, LIMITS["max_ctx"])
    if cfg.swa_layers and len(cfg.swa_layers) != cfg.n_layers:
        raise MinirtError(f"{where}: the sliding-window layer list has {len(cfg.swa_layers)} entries for "
                          f"{cfg.n_layers} layers (corrupt config?)")
    if cfg.rope_scaling:
        if cfg.rope_scaling not in ROPE_SCALINGS:
            raise MinirtError(f"{where}: RoPE scaling {_short(cfg.rope_scaling)} is not supported "
                              f"({', '.join(ROPE_SCALINGS)} are)")
        need_float(cfg.rope_factor, "RoPE scaling factor", where)
        if cfg.rope_local_theta == cfg.rope_theta and any(cfg.layer_window(i) for i in range(cfg.n_layers)):
            # RoPE tables are kept per base: scaled global and unscaled local layers need two bases
            raise MinirtError(f"{where}: RoPE scaling with sliding-window layers of the same RoPE base is not "
                              f"supported")
        if cfg.rope_scaling == "llama3" and (len(cfg.rope_freq_factors) != cfg.head_dim // 2 or not all(
                math.isfinite(f) and f > 0 for f in cfg.rope_freq_factors)):
            raise MinirtError(f"{where}: RoPE frequency factors: {len(cfg.rope_freq_factors)} values, expected "
                              f"{cfg.head_dim // 2} finite positive ones (corrupt rope_freqs?)")


def expected_shapes(cfg: ModelConfig, names) -> tuple[dict[str, tuple], dict[str, tuple]]:
    """(required, optional) canonical tensor names → shapes, for this config; names (the tensors present)
    decide which matrices are stored as low-rank factors (NAME.lr_u / .lr_v / .lr_b)."""
    d, v, h, q, kv = cfg.dim, cfg.vocab_size, cfg.hidden_dim, cfg.q_dim, cfg.kv_dim
    req: dict[str, tuple] = {"embed": (v, d), "norm.weight": (d,)}
    opt: dict[str, tuple] = {}
    tr = cfg.traits
    layer_norm = tr.norm == "layer"

    def site(name: str, out: int, inp: int, parts: list[tuple[str, str, int]]):
        """A matrix site: its factors if the file has them, else its parts (weight, bias, rows)."""
        if name + ".lr_u" in names or name + ".lr_v" in names:
            r = names[name + ".lr_u"][1] if name + ".lr_u" in names and len(names[name + ".lr_u"]) == 2 else 0
            if r == 0 and name + ".lr_v" in names and len(names[name + ".lr_v"]) == 2:
                r = names[name + ".lr_v"][0]
            need_int(r, f"rank of {name}", "low-rank factors", 1, LIMITS["rank"])
            req[name + ".lr_u"], req[name + ".lr_v"] = (out, r), (r, inp)
            opt[name + ".lr_b"] = (out,)
            return
        for w, b, rows in parts:
            req[w] = (rows, inp)
            if b:
                opt[b] = (rows,)

    if layer_norm:
        req["norm.bias"] = (d,)
    if not tr.rope:
        req["pos_embed"] = (cfg.max_ctx, d)
    if not cfg.tied_head or "head.lr_u" in names:
        site("head", v, d, [("head", "", v)])
    for i in range(cfg.n_layers):
        p = f"layers.{i}."
        for n in ("attn_norm", "ffn_norm") + (("post_attn_norm", "post_ffn_norm") if tr.post_norms else ()):
            req[p + n + ".weight"] = (d,)
            if layer_norm:
                req[p + n + ".bias"] = (d,)
        if tr.qk_norm:
            req[p + "q_norm"] = req[p + "k_norm"] = (cfg.head_dim,)
        if tr.fused_qkv:
            site(p + "qkv", q + 2 * kv, d, [(p + "wqkv", p + "bqkv", q + 2 * kv)])
        else:
            site(p + "qkv", q + 2 * kv, d, [(p + "wq", p + "bq", q), (p + "wk", p + "bk", kv), (p + "wv", p + "bv", kv)])
        if tr.ffn == "gelu":
            site(p + "up", h, d, [(p + "w_up", p + "b_up", h)])
        elif tr.fused_up:
            site(p + "up", 2 * h, d, [(p + "w_up", p + "b_up", 2 * h)])
        else:
            site(p + "up", 2 * h, d, [(p + "w_gate", p + "b_gate", h), (p + "w_up", p + "b_up", h)])
        site(p + "wo", d, q, [(p + "wo", p + "bo", d)])
        site(p + "down", d, h, [(p + "w_down", p + "b_down", d)])
    return req, opt


def tensor_nbytes(qtype: str, shape: tuple) -> int:
    n = math.prod(shape)
    if qtype in FLOAT_TYPES:
        return n * FLOAT_TYPES[qtype]
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    block, size = GGML_QUANT_SIZES[GGMLQuantizationType[qtype]]
    if not shape or shape[-1] % block:
        return -1
    return n // block * size


# byte offsets of the float16 scales inside one block (llama.cpp's block_q* structs)
SCALES = {"Q8_0": (0,), "Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), "Q2_K": (80, 82),
          "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}


def _finite(t) -> bool:
    """No NaN or infinity among a tensor's values (floats) or block scales (quantized): one pass over the
    bytes, done once at load (llama.cpp's --check-tensors does the same)."""
    import numpy as np
    from .base import release_pages
    raw = np.asarray(t.data)
    if t.qtype == "F32" or t.qtype == "F16":
        return bool(np.isfinite(raw).all())
    if t.qtype == "BF16":
        return not bool(((raw.view(np.uint16) & 0x7F80) == 0x7F80).any())
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    size = GGML_QUANT_SIZES[GGMLQuantizationType[t.qtype]][1]
    blocks = raw.reshape(-1).view(np.uint8).reshape(-1, size)
    ok = all(bool(np.isfinite(blocks[:, o:o + 2].copy().view(np.float16)).all()) for o in SCALES[t.qtype])
    release_pages(raw)  # the pass touched every page of the mapping: not resident until the model copies them
    return ok


def check_tensors(cfg: ModelConfig, tensors: dict, where, ignored: list[str] = (), names: dict | None = None) -> dict:
    """The tensors the architecture uses, checked (present, shape, type, byte count); returns them without
    the unused ones, which are named in one warning line."""
    shapes = {k: tuple(t.shape) for k, t in tensors.items()}
    req, opt = expected_shapes(cfg, shapes)
    names = names or {}

    def label(name: str) -> str:  # the file's name first: what a user can look up with minirt show / gguf-dump
        return f"{names[name]} ({name})" if name in names else name

    for name, want in req.items():
        if name not in tensors:
            raise MinirtError(f"{where}: checkpoint is missing tensor {name} (expected shape {list(want)})")
    layer = re.compile(r"layers\.(\d+)\.")
    extra_layers = sorted({int(m.group(1)) for k in tensors if (m := layer.match(k)) and int(m.group(1)) >= cfg.n_layers})
    if extra_layers:
        raise MinirtError(f"{where}: the file has tensors for layer {extra_layers[-1]} but its config says "
                          f"{cfg.n_layers} layers (corrupt config?)")
    for name, t in tensors.items():
        want = req.get(name, opt.get(name))
        if want is None:
            continue
        if shapes[name] != want:
            raise MinirtError(f"{where}: tensor {label(name)} has shape {list(shapes[name])}, the config implies "
                              f"{list(want)}")
        if t.qtype not in READABLE:
            raise MinirtError(f"{where}: tensor {label(name)} has type {t.qtype}, which minirt does not read")
        if getattr(t.data, "nbytes", -2) != tensor_nbytes(t.qtype, want):
            raise MinirtError(f"{where}: tensor {label(name)} holds {getattr(t.data, 'nbytes', '?')} bytes, not the "
                              f"{tensor_nbytes(t.qtype, want)} its shape and type {t.qtype} need (corrupt file?)")
        if not _finite(t):
            raise MinirtError(f"{where}: tensor {label(name)} holds NaN or infinite values (corrupt file?)")
    used = {k: t for k, t in tensors.items() if k in req or k in opt}
    unused = sorted(set(tensors) - set(used)) + list(ignored)
    if unused:
        more = f" (and {len(unused) - 4} more)" if len(unused) > 4 else ""
        print(f"minirt: warning: {where}: {len(unused)} tensor(s) not used by the {cfg.arch} architecture: "
              f"{', '.join(_short(n) for n in unused[:4])}{more}", file=sys.stderr)
    return used


def check_tokenizer(spec, vocab_size: int, where) -> None:
    """The tokenizer description against the model: lists of the right types, special tokens non-empty and
    unique (an empty one would make tiktoken's encoder loop forever), every id inside the embedding. A
    vocabulary shorter than the embedding is accepted (padded embeddings are common: the extra ids decode
    to nothing); a longer one is an error (its ids could not be embedded)."""
    def bad(what: str):
        raise MinirtError(f"{where}: tokenizer: {what}")

    def in_range(i, what: str):
        if i is not None and (type(i) is not int or not 0 <= i < vocab_size):
            bad(f"{what} {_short(i)} is not an id in 0..{vocab_size - 1}")

    in_range(spec.bos_id, "BOS token")
    in_range(spec.eos_id, "EOS token")
    if spec.chat_template is not None and not isinstance(spec.chat_template, str):
        bad("the chat template is not a string")
    if not isinstance(spec.pre, str):
        bad("the pre-tokenizer name is not a string")
    if spec.kind != "bpe":
        return
    if not isinstance(spec.tokens, list) or not all(isinstance(t, str) for t in spec.tokens):
        bad("the token list is not a list of strings")
    if len(spec.tokens) > vocab_size:
        bad(f"{len(spec.tokens)} tokens for an embedding of {vocab_size} rows")
    if not isinstance(spec.merges, list) or not all(isinstance(m, str) for m in spec.merges):
        bad("the merges are not a list of strings")
    if not isinstance(spec.special, dict):
        bad("the special tokens are not a table")
    for name, i in spec.special.items():
        if not isinstance(name, str) or not name:
            bad(f"special token {_short(name)} is empty or not a string")
        in_range(i, f"special token {_short(name)}")


def validate(ck, explicit_head_dim: bool = False):
    """Check a Checkpoint's config and tensors (in place: unused tensors dropped); returns it."""
    if getattr(ck, "validated", False):
        return ck
    where = ck.source if ck.source is not None else "checkpoint"
    check_config(ck.config, where, explicit_head_dim)
    ck.tensors = check_tensors(ck.config, ck.tensors, where, ck.ignored, ck.names)
    check_tokenizer(ck.tokenizer, ck.config.vocab_size, where)
    ck.validated = True
    return ck
