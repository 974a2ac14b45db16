"""Weight conversion: Hugging Face folders, GGUF files, llama2.c checkpoints and low-rank exports → GGUF
or a Hugging Face folder. See docs/CONVERSION.md for what each direction keeps and loses.

Every source is read into a Checkpoint (readers/: canonical names, (out, in) matrices, Q/K rows in
Hugging Face's rotate-half order, tensors still in their stored type) plus its tokenizer as GGUF
metadata (the `tokenizer.*` keys llama.cpp's converter writes); the writers render those into the target:
- GGUF (gguf.GGUFWriter): llama.cpp's tensor names (token_embd, blk.N.attn_q, ...), Q/K rows permuted
  back to adjacent pairs as convert_hf_to_gguf.py does, llama.cpp's metadata keys.
- Hugging Face folder: config.json, model.safetensors (written here: numpy has no bfloat16, and the
  safetensors package is test-only), tokenizer.json + tokenizer_config.json for byte-level BPE vocabularies.
Stored types are kept unless a type is asked for; quantized tensors are dequantized where the target cannot
hold them. Outputs are written under a temporary name and renamed only when complete.
"""
from __future__ import annotations

import json
import os
import shutil
import struct
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import MinirtError
from .progress import Progress
from .readers.base import Checkpoint, Tensor
from .readers.hf import norm_offset

TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1")
HF_TYPES = ("F32", "F16", "BF16")
FILE_TYPES = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "BF16": 32}
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6


@dataclass
class Source:
    """A model to convert: weights, tokenizer as GGUF `tokenizer.*` metadata, a name, what it was read from."""
    ck: Checkpoint
    vocab: dict = field(default_factory=dict)
    name: str = ""
    kind: str = ""                     # "hf" | "gguf" | "llama2c"


# ---- names ---------------------------------------------------------------------------------------------
def gguf_name(name: str) -> str:
    """Canonical tensor name → llama.cpp's GGUF name."""
    from .readers.gguf import NAMES
    inverse = {v: k for k, v in NAMES.items()}
    parts = name.split(".")
    if parts[0] == "layers":
        return inverse[".".join(["layers", "{i}"] + parts[2:])].replace("{i}", parts[1])
    return inverse[name]


HF_TOP = {"embed": "model.embed_tokens.weight", "norm.weight": "model.norm.weight", "head": "lm_head.weight"}
HF_GPT2 = {"embed": "transformer.wte.weight", "pos_embed": "transformer.wpe.weight", "head": "lm_head.weight",
           "norm.weight": "transformer.ln_f.weight", "norm.bias": "transformer.ln_f.bias"}
HF_GPT2_LAYER = {"attn_norm.weight": "ln_1.weight", "attn_norm.bias": "ln_1.bias", "ffn_norm.weight": "ln_2.weight",
                 "ffn_norm.bias": "ln_2.bias", "wqkv": "attn.c_attn.weight", "bqkv": "attn.c_attn.bias",
                 "wo": "attn.c_proj.weight", "bo": "attn.c_proj.bias", "w_up": "mlp.c_fc.weight",
                 "b_up": "mlp.c_fc.bias", "w_down": "mlp.c_proj.weight", "b_down": "mlp.c_proj.bias"}


def hf_name(arch: str, name: str) -> str:
    from .readers.hf import hf_layer_names
    top, layer, prefix = (HF_GPT2, HF_GPT2_LAYER, "transformer.h") if arch == "gpt2" else \
        (HF_TOP, hf_layer_names(arch), "model.layers")
    parts = name.split(".", 2)
    if parts[0] == "layers":
        return f"{prefix}.{parts[1]}.{layer[parts[2]]}"
    return top[name]


def _order(name: str) -> tuple:
    """llama.cpp's tensor order: embeddings, the layers in turn, the final norm, the head."""
    parts = name.split(".")
    if parts[0] == "layers":
        return (1, int(parts[1]), name)
    return ({"embed": 0, "pos_embed": 0, "rope_freqs": 0}.get(name, 2), 0, name)


def rope_permutation(n_heads: int, rows: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute as a row order: HF rotate-half → adjacent pairs
    (the inverse of readers.gguf.unpermute_rope_rows)."""
    return np.arange(rows).reshape(n_heads, 2, rows // n_heads // 2).transpose(0, 2, 1).reshape(-1)


# ---- reading sources ------------------------------------------------------------------------------------
def source_kind(path: Path) -> str:
    from .readers import _has_gguf_magic
    from .readers.llama2c import is_llama2c
    if path.is_dir():
        if (path / "lowrank.json").is_file():
            return "lowrank"
        if (path / "config.json").is_file():
            return "hf"
        raise MinirtError(f"{path}: a folder without config.json (Hugging Face) or lowrank.json (minirt svd export)")
    if not path.exists():
        raise MinirtError(f"{path} does not exist")
    if _has_gguf_magic(path):
        return "gguf"
    if is_llama2c(path):
        return "llama2c"
    if path.suffix in (".safetensors", ".bin", ".pt", ".pth"):
        raise MinirtError(f"{path}: give the Hugging Face folder holding this file and its config.json")
    raise MinirtError(f"{path}: not a GGUF file, a llama2.c checkpoint, a Hugging Face folder or a low-rank export")


def read_source(src: str | os.PathLike, tokenizer: str | os.PathLike | None = None) -> Source:
    """Read any supported source. tokenizer: a llama2.c tokenizer.bin (default: the one beside the checkpoint)."""
    src = Path(src)
    kind = source_kind(src)
    if kind == "hf":
        from .readers.hf import read_hf_folder
        ck = read_hf_folder(src)
        return Source(ck, _hf_vocab(src, ck), src.resolve().name, kind)
    if kind == "gguf":
        from .readers.gguf import _parse, read_gguf
        ck = read_gguf(src)
        meta = _parse(src)[0]
        vocab = {k: v for k, v in meta.items() if k.startswith("tokenizer.")}
        return Source(ck, vocab, str(meta.get("general.name", src.stem)), kind)
    if kind == "llama2c":
        from .readers.llama2c import read_llama2c, read_llama2c_tokenizer
        ck = read_llama2c(src)
        tok = Path(tokenizer) if tokenizer is not None else src.with_name("tokenizer.bin")
        if tokenizer is not None and not tok.is_file():
            raise MinirtError(f"{tok}: no such tokenizer file")
        vocab = read_llama2c_tokenizer(tok, ck.config.vocab_size) if tok.is_file() else {}
        return Source(ck, vocab, src.stem, kind)
    raise MinirtError(f"{src}: a low-rank export converts only to GGUF (its model.gguf)")


def _token_content(v) -> str | None:
    return v.get("content") if isinstance(v, dict) else v if isinstance(v, str) else None


def _hf_vocab(folder: Path, ck: Checkpoint) -> dict:
    """The tokenizer of a Hugging Face folder as llama.cpp's converter writes it into GGUF metadata."""
    spec, n = ck.tokenizer, ck.config.vocab_size
    tc = json.loads((folder / "tokenizer_config.json").read_text()) if (folder / "tokenizer_config.json").is_file() else {}
    if not isinstance(tc, dict):
        raise MinirtError(f"{folder}/tokenizer_config.json: not a JSON object")
    v: dict = {}
    if spec.kind == "spm":
        import sentencepiece as spm
        sp = spm.SentencePieceProcessor(model_file=str(spec.spm_model))
        tokens, scores, types = [], [], []
        for i in range(sp.get_piece_size()):
            tokens.append(sp.id_to_piece(i))
            scores.append(float(sp.get_score(i)))
            types.append(TOKEN_UNKNOWN if sp.is_unknown(i) else TOKEN_CONTROL if sp.is_control(i) else
                         TOKEN_UNUSED if sp.is_unused(i) else TOKEN_BYTE if sp.is_byte(i) else TOKEN_NORMAL)
        for i in range(len(tokens), n):  # padded vocabulary
            tokens.append(f"[PAD{i}]"), scores.append(-1000.0), types.append(TOKEN_UNUSED)
        v = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.pre": "default", "tokenizer.ggml.tokens": tokens,
             "tokenizer.ggml.scores": scores, "tokenizer.ggml.token_type": types}
    elif spec.kind == "bpe" and spec.tokens:
        added = {}
        if (folder / "tokenizer.json").is_file():
            tj = json.loads((folder / "tokenizer.json").read_text())
            added = {a["id"]: bool(a.get("special", True)) for a in tj.get("added_tokens", [])}
        tokens, types = [], []
        for i in range(max(n, len(spec.tokens))):
            tok = spec.tokens[i] if i < len(spec.tokens) else ""
            if not tok:
                tokens.append(f"[PAD{i}]"), types.append(TOKEN_UNUSED)
                continue
            tokens.append(tok)
            special = added.get(i, True) if (i in added or tok in spec.special) else None
            types.append(TOKEN_NORMAL if special is None else TOKEN_CONTROL if special else TOKEN_USER)
        v = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": spec.pre, "tokenizer.ggml.tokens": tokens,
             "tokenizer.ggml.token_type": types, "tokenizer.ggml.merges": list(spec.merges)}
    elif spec.kind == "bpe":
        print(f"convert: {folder}: a tiktoken ranks file is not carried over (no tokenizer in the output)",
              file=sys.stderr)
    hc = json.loads((folder / "config.json").read_text())
    ids = {t: i for i, t in enumerate(v.get("tokenizer.ggml.tokens", []))}
    for role in ("bos", "eos", "unk", "pad"):
        tid = ids.get(_token_content(tc.get(f"{role}_token")))
        if tid is None:
            tid = hc.get(f"{role}_token_id")
            tid = tid[0] if isinstance(tid, list) and tid else tid
        if isinstance(tid, int) and tid >= 0:
            v[f"tokenizer.ggml.{ {'unk': 'unknown', 'pad': 'padding'}.get(role, role)}_token_id"] = tid
    for flag in ("add_bos_token", "add_eos_token"):
        if isinstance(tc.get(flag), bool):
            v[f"tokenizer.ggml.{flag}"] = tc[flag]
    template = tc.get("chat_template")
    if template is None and (folder / "chat_template.jinja").is_file():
        template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    if isinstance(template, str):
        v["tokenizer.chat_template"] = template
    return v


# ---- tensor encoding ------------------------------------------------------------------------------------
def out_type(t: Tensor, target: str | None, gguf_out: bool) -> str:
    """The type a tensor is written in: target, or as stored (None) where the output can hold it. GGUF keeps
    1-D tensors in F32 (llama.cpp's rule); block types need rows of whole 32-value blocks."""
    if len(t.shape) == 1:
        return "F32" if gguf_out else (target or (t.qtype if t.qtype in HF_TYPES else "F32"))
    if target is None:
        return t.qtype if (gguf_out or t.qtype in HF_TYPES) else "F32"
    return target if (target in HF_TYPES or t.shape[-1] % 32 == 0) else "F32"


def out_nbytes(shape: tuple[int, ...], qtype: str) -> int:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q
    block, size = GGML_QUANT_SIZES[Q[qtype]]
    rows = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
    return rows * (shape[-1] // block) * size


def encode(t: Tensor, want: str) -> np.ndarray:
    """The tensor's data in type `want`: float32/float16 values, bf16 bits as uint16, or uint8 block rows."""
    from gguf import GGMLQuantizationType as Q, quants
    if want == t.qtype:
        return t.data
    w = t.float32()
    if want == "F32":
        return np.ascontiguousarray(w, dtype=np.float32)
    if want == "F16":
        return w.astype(np.float16)
    data = quants.quantize(w, Q[want])
    return data.view(np.uint16) if want == "BF16" else data


def _hf_rope(c) -> dict:
    """RoPE base and scaling as config.json keys (the rope_theta / rope_scaling form every transformers reads)."""
    out = {"rope_theta": c.rope_theta}
    if c.rope_scaling == "linear":
        out["rope_scaling"] = {"rope_type": "linear", "factor": c.rope_factor}
    elif c.rope_scaling == "llama3":
        low, high, orig = c.rope_llama3 or _fit_llama3(c)
        out["rope_scaling"] = {"rope_type": "llama3", "factor": max(c.rope_freq_factors), "low_freq_factor": low,
                               "high_freq_factor": high, "original_max_position_embeddings": orig}
    return out


def _fit_llama3(c) -> tuple[float, float, int]:
    """Llama 3 scaling parameters that give a GGUF's rope_freqs factors (llama.cpp's converter keeps only the
    factors). Between the kept and the divided frequencies the factors follow s = orig/(high−low)·(1/λ) −
    low/(high−low) (λ: wavelength), so two interpolated ones fix both ratios; the original context is taken
    as Llama 3's 8192 (any other with the same ratios gives the same factors). Checked by recomputing them."""
    from .config import llama3_freq_factors
    f = np.array(c.rope_freq_factors, np.float64)
    factor = float(f.max())
    lam = 2 * np.pi * c.rope_theta ** (np.arange(0, c.head_dim, 2) / c.head_dim)
    mid = (f > 1 + 1e-6) & (f < factor - 1e-6)
    fit = None
    if mid.sum() >= 2 and factor > 1:
        s = (1 / f[mid] - 1 / factor) / (1 - 1 / factor)
        a, b = np.polyfit(1 / lam[mid], s, 1)
        orig = 8192
        if a > 0:
            fit = (float(-b * orig / a), float(-b * orig / a + orig / a), orig)
    if fit is None or fit[0] <= 0 or not np.allclose(
            llama3_freq_factors(c.rope_theta, c.head_dim, factor, *fit), f, rtol=1e-4):
        raise MinirtError("this model's RoPE frequency factors (rope_freqs) are not llama3 scaling parameters "
                          "minirt can recover: write a .gguf file instead")
    return fit


def _hf_config(src: Source, dtype: str) -> dict:
    c, v = src.ck.config, src.vocab
    names = src.ck.tensors
    ids = {k: v.get(f"tokenizer.ggml.{k}_token_id") for k in ("bos", "eos", "padding")}
    torch_dtype = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}[dtype]
    if c.arch == "gpt2":
        hc = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": c.vocab_size,
              "n_positions": c.max_ctx, "n_ctx": c.max_ctx, "n_embd": c.dim, "n_layer": c.n_layers,
              "n_head": c.n_heads, "n_inner": c.hidden_dim, "layer_norm_epsilon": c.norm_eps,
              "activation_function": "gelu_new", "tie_word_embeddings": c.tied_head}
    else:
        mistral = c.arch == "llama" and c.sliding_window
        cls, mtype = {"llama": ("MistralForCausalLM", "mistral") if mistral else ("LlamaForCausalLM", "llama"),
                      "qwen2": ("Qwen2ForCausalLM", "qwen2"), "qwen3": ("Qwen3ForCausalLM", "qwen3"),
                      "phi3": ("Phi3ForCausalLM", "phi3"), "gemma3": ("Gemma3ForCausalLM", "gemma3_text")}[c.arch]
        hc = {"architectures": [cls], "model_type": mtype, "vocab_size": c.vocab_size,
              "hidden_size": c.dim, "intermediate_size": c.hidden_dim, "num_hidden_layers": c.n_layers,
              "num_attention_heads": c.n_heads, "num_key_value_heads": c.n_kv_heads, "head_dim": c.head_dim,
              "max_position_embeddings": c.max_ctx, "rms_norm_eps": c.norm_eps, "hidden_act": "silu",
              "tie_word_embeddings": c.tied_head, **_hf_rope(c)}
        if c.arch in ("llama", "qwen3"):
            hc["attention_bias"] = any(k.endswith((".bq", ".bk", ".bv", ".bo")) for k in names)
        if c.arch == "llama" and not mistral:
            hc["mlp_bias"] = any(k.endswith((".b_gate", ".b_up", ".b_down")) for k in names)
        if c.arch in ("qwen2", "qwen3"):
            hc["use_sliding_window"] = False
        if c.sliding_window and c.arch in ("llama", "phi3", "gemma3"):
            hc["sliding_window"] = c.sliding_window
            hc["layer_types"] = ["sliding_attention" if c.layer_window(i) else "full_attention"
                                 for i in range(c.n_layers)]
        if c.arch == "gemma3":
            del hc["hidden_act"]
            q = c.scale ** -2
            hc.update(hidden_activation="gelu_pytorch_tanh", query_pre_attn_scalar=round(q) if abs(q - round(q)) < 1e-6 else q,
                      rope_local_base_freq=c.rope_local_theta)
    hc.update({"bos_token_id": ids["bos"], "eos_token_id": ids["eos"], "torch_dtype": torch_dtype})
    if ids["padding"] is not None:
        hc["pad_token_id"] = ids["padding"]
    return hc


def _complete_biases(ck: Checkpoint) -> dict[str, Tensor]:
    """Hugging Face's Llama has all of q/k/v/o biases (attention_bias) or none, likewise gate/up/down
    (mlp_bias): missing ones are written as zeros, which is what a model without them computes."""
    t = dict(ck.tensors)
    c = ck.config
    sizes = {"bq": c.q_dim, "bk": c.kv_dim, "bv": c.kv_dim, "bo": c.dim, "b_gate": c.hidden_dim,
             "b_up": c.hidden_dim, "b_down": c.dim}
    # which biases the family's Hugging Face model has, all or none of each group (Qwen2: q/k/v always)
    groups = {"llama": (("bq", "bk", "bv", "bo"), ("b_gate", "b_up", "b_down")), "qwen3": (("bq", "bk", "bv", "bo"),),
              "qwen2": (("bq", "bk", "bv"),)}.get(c.arch)
    if groups is None:
        return t
    if c.arch == "llama" and c.sliding_window:
        groups = ()  # Mistral has none
    have = {k.split(".")[-1] for k in t if k.startswith("layers.") and k.split(".")[-1].startswith("b")}
    if have - {b for g in groups for b in g}:
        raise MinirtError(f"this {c.arch} model has biases ({', '.join(sorted(have))}) its Hugging Face form cannot "
                          f"hold: write a .gguf file instead")
    for group in groups:
        if c.arch == "qwen2" or any(f"layers.{i}.{b}" in t for i in range(c.n_layers) for b in group):
            for i in range(c.n_layers):
                for b in group:
                    t.setdefault(f"layers.{i}.{b}", Tensor(np.zeros(sizes[b], np.float32), "F32", (sizes[b],)))
    return t


# ---- writers --------------------------------------------------------------------------------------------
def write_safetensors(path: Path, tensors: dict, metadata: dict | None = None) -> None:
    """safetensors: u64 header length, JSON header (8-byte aligned), raw little-endian data in order.
    tensors: name → (dtype "F32"/"F16"/"BF16", shape, a function giving the array): each array is made
    only when its turn comes, so a large model is never held in memory whole."""
    header, offset = {}, 0
    for name, (dtype, shape, _) in tensors.items():
        n = int(np.prod(shape)) * (4 if dtype == "F32" else 2)
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    header["__metadata__"] = {"format": "pt", **(metadata or {})}
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(head)))
        f.write(head)
        for name, (_, shape, make) in tensors.items():
            a = np.ascontiguousarray(make())
            a0, a1 = header[name]["data_offsets"]
            if a.shape != tuple(shape) or a.nbytes != a1 - a0:  # never write a file its header misdescribes
                raise MinirtError(f"tensor {name}: {a.shape} does not match the header's {tuple(shape)}")
            a.tofile(f)


def write_hf(src: Source, dst: Path, qtype: str | None = None, progress: bool = True) -> Path:
    ck, c = src.ck, src.ck.config
    if qtype is not None and qtype not in HF_TYPES:
        raise MinirtError(f"a Hugging Face folder holds F32, F16 or BF16 tensors, not {qtype}: write a .gguf file "
                          f"for block types")
    if any(".lr_" in k or k.startswith("head.lr_") for k in ck.tensors):
        raise MinirtError(f"{ck.source}: a low-rank export has no Hugging Face form; convert it to .gguf")
    tensors, types = {}, set()
    full = _complete_biases(ck)
    for name in sorted(full, key=_order):
        t = full[name]
        ty = out_type(t, qtype, gguf_out=False)
        if name == "rope_freqs":
            continue
        off = norm_offset(c.arch, name)
        if off:  # Gemma's Hugging Face norms store w for (1 + w)
            t = Tensor(t.float32() - np.float32(off), "F32", t.shape)
        if c.arch == "gpt2" and name.split(".")[-1] in ("wqkv", "wo", "w_up", "w_down"):  # Conv1D: (in, out)
            tensors[hf_name(c.arch, name)] = (ty, t.shape[::-1], lambda t=t, ty=ty: encode(t, ty).T)
        else:
            tensors[hf_name(c.arch, name)] = (ty, t.shape, lambda t=t, ty=ty: encode(t, ty))
        if len(t.shape) == 2:
            types.add(ty)
    dtype = qtype or (types.pop() if len(types) == 1 else "F32")
    files = {"config.json": (json.dumps(_hf_config(src, dtype), indent=2) + "\n").encode()}
    files.update(_hf_tokenizer_files(src))
    tmp = _fresh_dir(dst)
    try:
        write_safetensors(tmp / "model.safetensors", tensors)
        for fname, data in files.items():
            (tmp / fname).write_bytes(data)
        if dst.is_dir():
            dst.rmdir()  # empty (checked by _fresh_dir)
        os.replace(tmp, dst)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            raise MinirtError(f"writing {dst} failed: {e}") from None
        raise
    if progress:
        print(f"convert: wrote {dst} ({len(tensors)} tensors, {dtype}{', tokenizer' if len(files) > 1 else ''})",
              file=sys.stderr)
    return dst


def _fresh_dir(dst: Path) -> Path:
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise MinirtError(f"{dst} exists and is not an empty folder; give a new folder name for the output")
    tmp = dst.with_name(dst.name + ".part")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def _tokenizer_config(src: Source, tokens: list[str], cls: str) -> dict:
    v = src.vocab
    tc = {"tokenizer_class": cls, "model_max_length": src.ck.config.max_ctx, "clean_up_tokenization_spaces": False}
    for role, key in (("bos", "bos"), ("eos", "eos"), ("unk", "unknown"), ("pad", "padding")):
        tid = v.get(f"tokenizer.ggml.{key}_token_id")
        if tid is not None and 0 <= tid < len(tokens):
            tc[f"{role}_token"] = tokens[tid]
    for flag in ("add_bos_token", "add_eos_token"):
        if f"tokenizer.ggml.{flag}" in v:
            tc[flag] = bool(v[f"tokenizer.ggml.{flag}"])
    if isinstance(v.get("tokenizer.chat_template"), str):
        tc["chat_template"] = v["tokenizer.chat_template"]
    return tc


def _hf_tokenizer_files(src: Source) -> dict[str, bytes]:
    v = src.vocab
    model = v.get("tokenizer.ggml.model")
    if model not in ("gpt2", "llama") or "tokenizer.ggml.tokens" not in v:
        if model:
            print(f"convert: the {model!r} vocabulary is not written to the Hugging Face folder (byte-level BPE "
                  f"and SentencePiece are)", file=sys.stderr)
        return {}
    tokens = v["tokenizer.ggml.tokens"]
    if model == "llama":  # SentencePiece: a tokenizer.model built from pieces, scores and types
        from .readers.spm import proto_from_gguf
        proto = proto_from_gguf(v)
        tc = _tokenizer_config(src, tokens, "LlamaTokenizer")
        return {"tokenizer.model": proto,
                "tokenizer_config.json": (json.dumps(tc, indent=2, ensure_ascii=False) + "\n").encode()}
    types = v.get("tokenizer.ggml.token_type") or [TOKEN_NORMAL] * len(tokens)
    merges = [m.split(" ", 1) for m in v.get("tokenizer.ggml.merges", [])]
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    pre = byte_level if v.get("tokenizer.ggml.pre", "gpt2") != "smollm" else \
        {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, byte_level]}
    added = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
              "special": ty == TOKEN_CONTROL} for i, (t, ty) in enumerate(zip(tokens, types))
             if ty in (TOKEN_CONTROL, TOKEN_USER)]
    tj = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
          "pre_tokenizer": pre, "post_processor": {**byte_level, "trim_offsets": False},
          "decoder": byte_level,
          "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                    "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                    "vocab": {t: i for i, (t, ty) in enumerate(zip(tokens, types)) if ty != TOKEN_UNUSED},
                    "merges": merges}}
    tc = _tokenizer_config(src, tokens, "PreTrainedTokenizerFast")
    return {"tokenizer.json": (json.dumps(tj, ensure_ascii=False) + "\n").encode(),
            "tokenizer_config.json": (json.dumps(tc, indent=2, ensure_ascii=False) + "\n").encode()}


def _add_vocab(writer, vocab: dict) -> None:
    from gguf import GGUFValueType as V
    arrays = {"tokenizer.ggml.tokens": V.STRING, "tokenizer.ggml.merges": V.STRING,
              "tokenizer.ggml.token_type": V.INT32, "tokenizer.ggml.scores": V.FLOAT32}
    for key, val in vocab.items():
        if key in arrays:
            writer.add_key_value(key, list(val), V.ARRAY, sub_type=arrays[key])
        elif isinstance(val, bool):
            writer.add_key_value(key, val, V.BOOL)
        elif isinstance(val, int):
            writer.add_key_value(key, val, V.UINT32 if val >= 0 else V.INT32)
        elif isinstance(val, float):
            writer.add_key_value(key, val, V.FLOAT32)
        elif isinstance(val, str):
            writer.add_key_value(key, val, V.STRING)
        elif isinstance(val, list) and val:
            sub = V.STRING if isinstance(val[0], str) else V.FLOAT32 if isinstance(val[0], float) else V.INT32
            writer.add_key_value(key, val, V.ARRAY, sub_type=sub)


def _add_family_keys(writer, c) -> None:
    """llama.cpp's metadata keys of the LLaMA-like families (what its converter writes for each)."""
    import gguf
    if c.arch == "gemma3" and abs(c.scale - (c.dim // c.n_heads if c.dim == 5376 else c.head_dim) ** -0.5) > 1e-7:
        raise MinirtError(f"Gemma 3 with query_pre_attn_scalar {c.scale ** -2:g} ≠ head_dim {c.head_dim}: GGUF has no "
                          f"key for it (llama.cpp uses 1/√head_dim); write a Hugging Face folder instead")
    writer.add_head_count_kv(c.n_kv_heads)
    writer.add_rope_freq_base(c.rope_theta)
    writer.add_layer_norm_rms_eps(c.norm_eps)
    writer.add_rope_dimension_count(c.head_dim)
    if c.head_dim != c.dim // c.n_heads or c.arch == "gemma3":  # llama.cpp's Gemma 3 converter always writes them
        writer.add_key_length(c.head_dim)
        writer.add_value_length(c.head_dim)
    writer.add_vocab_size(c.vocab_size)
    if c.rope_scaling == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(c.rope_factor)
    if c.sliding_window:
        writer.add_sliding_window(c.sliding_window)
        own = [c.layer_window(i) > 0 for i in range(c.n_layers)]
        if c.swa_layers or c.arch != "gemma3":  # llama.cpp: one flag per layer (its default pattern is gemma3's)
            writer.add_sliding_window_pattern(own)
    if c.arch == "gemma3":
        writer.add_rope_freq_base_swa(c.rope_local_theta)


def write_gguf(src: Source, dst: Path, qtype: str | None = None, progress: bool = True) -> Path:
    import gguf
    ck, c = src.ck, src.ck.config
    if qtype is not None and qtype not in TYPES:
        raise MinirtError(f"unknown type {qtype!r}: choose one of {', '.join(TYPES)}")
    if any(".lr_" in k or k.startswith("head.lr_") for k in ck.tensors):
        raise MinirtError(f"{ck.source}: a low-rank GGUF is converted by giving its export folder (model.gguf + "
                          f"lowrank.json) as the source")
    if dst.is_dir():
        raise MinirtError(f"{dst} is a folder; give an output file name ending in .gguf")
    tmp = dst.with_name(dst.name + ".part")
    writer = gguf.GGUFWriter(str(tmp), c.arch)
    try:
        if src.name:
            writer.add_name(src.name)
        writer.add_context_length(c.max_ctx)
        writer.add_embedding_length(c.dim)
        writer.add_block_count(c.n_layers)
        writer.add_feed_forward_length(c.hidden_dim)
        writer.add_head_count(c.n_heads)
        if c.arch != "gpt2":
            _add_family_keys(writer, c)
        else:
            writer.add_layer_norm_eps(c.norm_eps)
        counts: dict[str, int] = {}
        tensors = dict(ck.tensors)
        if c.rope_scaling == "llama3":  # as llama.cpp's converter stores it
            f = np.array(c.rope_freq_factors, np.float32)
            tensors["rope_freqs"] = Tensor(f, "F32", f.shape)
        plan = []  # tensor infos first (the header), then each tensor's data made and written in turn
        for name in sorted(tensors, key=_order):
            t = tensors[name]
            ty = out_type(t, qtype, gguf_out=True)
            nbytes = out_nbytes(t.shape, ty)
            if ty in ("F32", "F16"):
                writer.add_tensor_info(gguf_name(name), t.shape, np.dtype(np.float32 if ty == "F32" else np.float16),
                                       nbytes)
            elif ty == "BF16":
                writer.add_tensor_info(gguf_name(name), t.shape, np.dtype(np.uint16), nbytes,
                                       raw_dtype=gguf.GGMLQuantizationType.BF16)
            else:  # block types: given as uint8 rows, as GGUFWriter.add_tensor takes them
                rows = int(np.prod(t.shape[:-1]))
                writer.add_tensor_info(gguf_name(name), (rows, nbytes // rows), np.dtype(np.uint8), nbytes,
                                       raw_dtype=gguf.GGMLQuantizationType[ty])
            plan.append((name, t, ty))
            if len(t.shape) == 2:
                counts[ty] = counts.get(ty, 0) + int(np.prod(t.shape))
        main = max(counts, key=counts.get) if counts else "F32"
        if main in FILE_TYPES:
            writer.add_file_type(FILE_TYPES[main])
        _add_vocab(writer, src.vocab)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        bar = Progress("convert: writing", len(plan), "tensors", delay=2.0) if progress else None
        for name, t, ty in plan:
            if c.traits.gguf_pairs and name.split(".")[-1] in ("wq", "bq", "wk", "bk"):  # HF order → adjacent pairs
                heads = c.n_heads if name.endswith("q") else c.n_kv_heads
                t = t.take_rows(rope_permutation(heads, t.shape[0]))
            writer.write_tensor_data(np.ascontiguousarray(encode(t, ty)))
            if bar:
                bar.update(1, note=name)
        if bar:
            bar.close()
        writer.close()
        os.replace(tmp, dst)
    except BaseException as e:
        try:
            writer.close()
        except Exception:
            pass
        tmp.unlink(missing_ok=True)
        if isinstance(e, (OSError, ValueError)):
            raise MinirtError(f"writing {dst} failed: {e}") from None
        raise
    if progress:
        print(f"convert: wrote {dst} ({len(tensors)} tensors, mostly {main}"
              f"{', tokenizer' if src.vocab else ', no tokenizer'})", file=sys.stderr)
    return dst


def copy_lowrank(src: Path, dst: Path, progress: bool = True) -> Path:
    """A low-rank export folder (minirt svd) → its model.gguf, a GGUF minirt loads on its own (factor tensors
    blk.N.SITE.lr_u/lr_v, ranks in the minirt.lowrank.manifest key), after checking it: readable, with
    the factors the manifest names at the ranks it gives, and the same manifest as lowrank.json."""
    from .readers.gguf import _parse, read_gguf
    gg, manifest = src / "model.gguf", src / "lowrank.json"
    if not gg.is_file():
        raise MinirtError(f"{src}: no model.gguf in the low-rank export")
    try:
        listed = json.loads(manifest.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MinirtError(f"{manifest}: unreadable manifest ({e})") from None
    ck = read_gguf(gg)
    try:
        inside = json.loads(_parse(gg)[0]["minirt.lowrank.manifest"])
    except (KeyError, TypeError, json.JSONDecodeError):
        raise MinirtError(f"{gg}: no minirt.lowrank.manifest metadata: not a low-rank export") from None
    if not isinstance(listed, dict) or listed.get("matrices") != inside.get("matrices"):
        raise MinirtError(f"{src}: lowrank.json and model.gguf describe different factors (mixed-up export?)")
    for m in inside.get("matrices", []):
        if not m.get("rank"):
            continue
        u, v = ck.tensors.get(f"{m['name']}.lr_u"), ck.tensors.get(f"{m['name']}.lr_v")
        if u is None or v is None or u.shape != (m["shape"][0], m["rank"]) or v.shape != (m["rank"], m["shape"][1]):
            raise MinirtError(f"{gg}: factors of {m['name']} missing or not of rank {m['rank']} (corrupt export)")
    if dst.is_dir():
        raise MinirtError(f"{dst} is a folder; give an output file name ending in .gguf")
    tmp = dst.with_name(dst.name + ".part")
    try:
        shutil.copyfile(gg, tmp)
        os.replace(tmp, dst)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise MinirtError(f"writing {dst} failed: {e}") from None
    if progress:
        n = sum(1 for m in inside.get("matrices", []) if m.get("rank"))
        print(f"convert: wrote {dst} (low-rank export, {n} factored matrices)", file=sys.stderr)
    return dst


def convert(src: str | os.PathLike, dst: str | os.PathLike, qtype: str | None = None,
            tokenizer: str | os.PathLike | None = None, progress: bool = True) -> Path:
    """Convert src (Hugging Face folder, GGUF, llama2.c .bin, low-rank export folder) to dst: a .gguf file,
    or else a Hugging Face folder; src may also be a registry name (`minirt list`). qtype: the matrices' type
    (default: as stored)."""
    from .registry import resolve
    src, dst = resolve(src), Path(dst)
    if qtype is not None and qtype not in TYPES:
        raise MinirtError(f"unknown type {qtype!r}: choose one of {', '.join(TYPES)}")
    to_gguf = dst.suffix == ".gguf"
    if not to_gguf and dst.suffix in (".bin", ".safetensors", ".json", ".pt", ".pth"):
        raise MinirtError(f"{dst}: give a .gguf file or a folder name (a Hugging Face folder is written there)")
    if src.resolve() == dst.resolve():
        raise MinirtError("source and destination are the same path")
    kind = source_kind(src)
    if kind == "lowrank":
        if not to_gguf:
            raise MinirtError(f"{src}: a low-rank export converts only to GGUF: give an output ending in .gguf")
        if qtype is not None:
            raise MinirtError("a low-rank export is copied as it is: --type does not apply")
        return copy_lowrank(src, dst, progress)
    if not to_gguf and qtype is not None and qtype not in HF_TYPES:
        raise MinirtError(f"a Hugging Face folder holds F32, F16 or BF16 tensors, not {qtype}: give an output "
                          f"ending in .gguf for block types")
    s = read_source(src, tokenizer)
    return write_gguf(s, dst, qtype, progress) if to_gguf else write_hf(s, dst, qtype, progress)
