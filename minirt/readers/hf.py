"""Hugging Face model folders: config.json + *.safetensors (memory-mapped) or pytorch_model*.bin (read by a
restricted unpickler, see torchbin.py) + tokenizer files."""
from __future__ import annotations

import json
import math
import re
import struct
from pathlib import Path

import numpy as np

from ..config import ModelConfig, llama3_freq_factors
from ..errors import MinirtError
from .base import Checkpoint, Tensor, TokenizerSpec
from .validate import LIMITS, need_float, need_int, validate

DTYPES = {"F32": (np.float32, "F32"), "F16": (np.float16, "F16"), "BF16": (np.uint16, "BF16"),
          "F64": (np.float64, "F32")}


SIZES = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8}
MAX_HEADER = 100_000_000   # the safetensors library's limit on the JSON header


def read_safetensors(path: Path) -> dict[str, Tensor]:
    """Parse a .safetensors file: 8-byte header length, JSON header, then raw little-endian data.

    Checked as the safetensors library checks (its `validate`): header at most 100 MB of UTF-8 JSON (an
    object), shapes of non-negative integers, each tensor's byte range exactly dtype × shape, the ranges
    contiguous from 0 and covering the data section exactly (no gaps, overlaps or trailing bytes)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise MinirtError(f"{path}: too short to be a safetensors file")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8 or n > MAX_HEADER:
            raise MinirtError(f"{path}: corrupt safetensors header (length {n} for a file of {size} bytes)")
        header = parse_json(f.read(n), path, "corrupt safetensors header (not JSON)")
    if not isinstance(header, dict):
        raise MinirtError(f"{path}: corrupt safetensors header (not a JSON object)")
    header.pop("__metadata__", None)
    start = 8 + n
    entries = []
    for name, info in header.items():
        try:
            dt = info["dtype"]
            dtype, qtype = DTYPES[dt]
            shape = tuple(info["shape"])
            a, b = info["data_offsets"]
        except KeyError as e:
            raise MinirtError(f"{path}: tensor {name}: unsupported dtype or missing field {e} in the header") from None
        except (TypeError, ValueError, AttributeError):
            raise MinirtError(f"{path}: tensor {name}: malformed header entry") from None
        if not all(type(x) is int and x >= 0 for x in shape + (a, b)):
            raise MinirtError(f"{path}: tensor {name}: shape {list(shape)[:8]} and offsets must be non-negative "
                              f"integers (corrupt header)")
        if b - a != math.prod(shape) * SIZES[dt]:
            raise MinirtError(f"{path}: tensor {name} has the wrong size: {b - a} bytes for shape {list(shape)} "
                              f"of {dt} (truncated?)")
        entries.append((a, b, name, dtype, qtype, shape))
    entries.sort(key=lambda e: (e[0], e[1]))
    end = 0
    for a, b, name, *_ in entries:
        if a != end:
            raise MinirtError(f"{path}: tensor {name} at byte {a}, expected {end}: the data of the tensors is not "
                              f"contiguous (overlapping or gapped offsets, corrupt header)")
        end = b
    if start + end != size:
        raise MinirtError(f"{path}: tensor data of {end} bytes lies outside the file's {size - start} data bytes "
                          f"(truncated, or wrong size)")
    mm = np.memmap(path, dtype=np.uint8, mode="r") if size > start else np.zeros(0, np.uint8)
    out = {}
    for a, b, name, dtype, qtype, shape in entries:
        data = mm[start + a:start + b].view(dtype).reshape(shape)
        if dtype == np.float64:
            data = data.astype(np.float32)
        out[name] = Tensor(data, qtype, shape)
    return out


def parse_json(data: bytes, path, what: str = "not valid JSON"):
    """JSON from bytes as the safetensors library and tokenizers read it: strict UTF-8, no NaN/Infinity, and
    nesting bounded (Python's parser stops at its recursion limit); any failure is one line."""
    def no_constants(c):
        raise ValueError(f"{c} is not JSON")
    try:
        return json.loads(data.decode("utf-8"), parse_constant=no_constants)
    except UnicodeDecodeError as e:
        raise MinirtError(f"{path}: {what}: invalid UTF-8 at byte {e.start}") from None
    except RecursionError:
        raise MinirtError(f"{path}: {what}: nested too deeply") from None
    except ValueError as e:  # json.JSONDecodeError is a ValueError
        raise MinirtError(f"{path}: {what}: {str(e)[:80]}") from None


def _load_json(path: Path):
    try:
        data = path.read_bytes()
    except OSError as e:
        raise MinirtError(f"{path}: cannot read ({e.strerror})") from None
    return parse_json(data, path, "cannot read (not valid JSON)")


def _ignored(names) -> list[str]:
    """Tensors a reader left unmapped, less the buffers Hugging Face checkpoints carry (masks, RoPE tables)."""
    return [n for n in names if not n.endswith((".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq"))]


def read_hf_folder(folder: Path) -> Checkpoint:
    cfg_path = folder / "config.json"
    if not cfg_path.exists():
        raise MinirtError(f"{folder}: no config.json (expected a Hugging Face model folder)")
    hc = _load_json(cfg_path)
    if not isinstance(hc, dict):
        raise MinirtError(f"{cfg_path}: not a JSON object")
    files = sorted(folder.glob("*.safetensors"))
    bins = sorted(folder.glob("pytorch_model*.bin"))
    if not files and not bins:
        raise MinirtError(f"{folder}: no .safetensors or pytorch_model.bin files")
    raw: dict[str, Tensor] = {}
    for f in files:
        raw.update(read_safetensors(f))
    if not files:  # torch.save'd state dicts, read without torch and without running pickled code
        from .torchbin import read_torch_bin
        for f in bins:
            raw.update(read_torch_bin(f))
    mtype = hc.get("model_type")
    c = _Fields(hc, cfg_path)
    if mtype == "gpt2":
        cfg, tensors, used = _gpt2(c, raw)
    elif mtype == "gemma3":
        raise MinirtError(f"{folder}: a Gemma 3 image-text model (Gemma3ForConditionalGeneration) is not supported; "
                          f"give its text-only form (model_type gemma3_text)")
    elif mtype in FAMILIES or (isinstance(hc.get("architectures"), list) and "LlamaForCausalLM" in hc["architectures"]):
        cfg, tensors, used = _decoder(c, raw, FAMILIES.get(mtype, "llama"))
    else:
        raise MinirtError(f"{folder}: model_type {str(mtype)[:40]!r} is not supported "
                          f"(gpt2, {', '.join(FAMILIES)} are)")
    layer = re.compile(r"(?:transformer\.)?(?:model\.layers|h)\.(\d+)\.")
    past = [n for n in set(raw) - used if (m := layer.match(n)) and int(m.group(1)) >= cfg.n_layers]
    if past:
        raise MinirtError(f"{folder}: the file has tensors for more layers ({past[0]}) than config.json's "
                          f"{cfg.n_layers} (corrupt config?)")
    types = {t.qtype for k, t in tensors.items() if len(t.shape) == 2}
    ck = Checkpoint(cfg, tensors, _tokenizer(folder, hc, cfg), folder, "/".join(sorted(types)),
                    ignored=_ignored(sorted(set(raw) - used)))
    return validate(ck, explicit_head_dim=bool(hc.get("head_dim")))


class _Fields:
    """config.json values, each checked as it is taken: one line naming the field when missing or out of range."""

    def __init__(self, hc: dict, path: Path):
        self.hc, self.path = hc, path

    def int(self, key: str, default=None, hi_key: str | None = None) -> int:
        v = self.hc.get(key)
        if v is None:
            if default is None:
                raise MinirtError(f"{self.path}: required field {key!r} is missing")
            v = default
        return need_int(v, key, self.path, 1, LIMITS[hi_key] if hi_key else None)

    def float(self, key: str, default: float, hi: float = math.inf) -> float:
        v = self.hc.get(key)
        return need_float(default if v is None else v, key, self.path, hi)


def _need(raw: dict, key: str) -> Tensor:
    if key not in raw:
        raise MinirtError(f"checkpoint is missing tensor {key}")
    return raw[key]


def _gpt2(c: _Fields, raw: dict[str, Tensor]):
    hc = c.hc
    prefixed = {k.removeprefix("transformer."): k for k in raw}
    raw = {k.removeprefix("transformer."): v for k, v in raw.items()}
    act = hc.get("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh"):
        raise MinirtError(f"GPT-2 activation {str(act)[:40]!r} is not supported (gelu_new is)")
    d, nh = c.int("n_embd", hi_key="dim"), c.int("n_head", hi_key="n_heads")
    cfg = ModelConfig("gpt2", vocab_size=c.int("vocab_size", hi_key="vocab_size"), dim=d,
                      n_layers=c.int("n_layer", hi_key="n_layers"), n_heads=nh, n_kv_heads=nh,
                      head_dim=max(d // nh, 1), hidden_dim=c.int("n_inner", 4 * d, "hidden_dim"),
                      max_ctx=c.int("n_positions", hi_key="max_ctx"), norm_eps=c.float("layer_norm_epsilon", 1e-5, 1.0),
                      tied_head="lm_head.weight" not in raw or bool(hc.get("tie_word_embeddings", True)))
    t = {"embed": _need(raw, "wte.weight"), "pos_embed": _need(raw, "wpe.weight"),
         "norm.weight": _need(raw, "ln_f.weight"), "norm.bias": _need(raw, "ln_f.bias")}
    used = {"wte.weight", "wpe.weight", "ln_f.weight", "ln_f.bias"}
    if not cfg.tied_head:
        t["head"] = raw["lm_head.weight"]
        used.add("lm_head.weight")
    for i in range(cfg.n_layers):
        p, q = f"h.{i}.", f"layers.{i}."
        for src, dst in (("ln_1", "attn_norm"), ("ln_2", "ffn_norm")):
            t[q + dst + ".weight"] = _need(raw, p + src + ".weight")
            t[q + dst + ".bias"] = _need(raw, p + src + ".bias")
            used |= {p + src + ".weight", p + src + ".bias"}
        # Conv1D stores (in, out): transpose to (out, in)
        for src, w, b in (("attn.c_attn", "wqkv", "bqkv"), ("attn.c_proj", "wo", "bo"),
                          ("mlp.c_fc", "w_up", "b_up"), ("mlp.c_proj", "w_down", "b_down")):
            wt = _need(raw, p + src + ".weight")
            if len(wt.shape) != 2 or wt.qtype not in DTYPES_READ:
                raise MinirtError(f"tensor {p + src}.weight has shape {list(wt.shape)} of {wt.qtype}, not a float "
                                  f"matrix")
            t[q + w] = wt.transpose()
            t[q + b] = _need(raw, p + src + ".bias")
            used |= {p + src + ".weight", p + src + ".bias"}
    return cfg, t, {prefixed[k] for k in used}


DTYPES_READ = ("F32", "F16", "BF16")


# Hugging Face model_type → minirt architecture (Mistral is LLaMA with a sliding window, as llama.cpp has it)
FAMILIES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "phi3": "phi3",
            "gemma3_text": "gemma3"}
ACTIVATION = {"gemma3": ("hidden_activation", "gelu_pytorch_tanh")}   # others: hidden_act silu

# canonical name (after "layers.N.") ↔ Hugging Face name (after "model.layers.N."), per family
HF_LAYER = {"attn_norm.weight": "input_layernorm.weight", "ffn_norm.weight": "post_attention_layernorm.weight",
            "wq": "self_attn.q_proj.weight", "wk": "self_attn.k_proj.weight", "wv": "self_attn.v_proj.weight",
            "wo": "self_attn.o_proj.weight", "bq": "self_attn.q_proj.bias", "bk": "self_attn.k_proj.bias",
            "bv": "self_attn.v_proj.bias", "bo": "self_attn.o_proj.bias", "w_gate": "mlp.gate_proj.weight",
            "w_up": "mlp.up_proj.weight", "w_down": "mlp.down_proj.weight", "b_gate": "mlp.gate_proj.bias",
            "b_up": "mlp.up_proj.bias", "b_down": "mlp.down_proj.bias"}
QK_NORMS = {"q_norm": "self_attn.q_norm.weight", "k_norm": "self_attn.k_norm.weight"}


def hf_layer_names(arch: str) -> dict[str, str]:
    """Canonical layer tensor names → the family's Hugging Face names (readers and convert share this)."""
    names = dict(HF_LAYER)
    if arch == "qwen3":
        names.update(QK_NORMS)
    elif arch == "gemma3":  # four norms a layer: post_attention_layernorm is the post-attention norm here
        names.update(QK_NORMS, **{"ffn_norm.weight": "pre_feedforward_layernorm.weight",
                                  "post_attn_norm.weight": "post_attention_layernorm.weight",
                                  "post_ffn_norm.weight": "post_feedforward_layernorm.weight"})
    elif arch == "phi3":  # fused q|k|v and gate|up
        for k in ("wq", "wk", "wv", "bq", "bk", "bv", "w_gate", "b_gate"):
            del names[k]
        names.update(wqkv="self_attn.qkv_proj.weight", bqkv="self_attn.qkv_proj.bias",
                     w_up="mlp.gate_up_proj.weight", b_up="mlp.gate_up_proj.bias")
    return names


def norm_offset(arch: str, name: str) -> float:
    """What a family's Hugging Face RMSNorm adds to its stored weight: Gemma computes x·(1 + w), so readers
    fold the 1 in (as llama.cpp's converter does) and writers take it out again."""
    return 1.0 if arch == "gemma3" and (name.endswith("norm.weight") or name.endswith(("q_norm", "k_norm"))) else 0.0


def _rope_options(hc: dict, path, arch: str, head_dim: int) -> dict:
    """RoPE base(s) and scaling from config.json: transformers 5's rope_parameters (per layer type for
    Gemma 3) or the older rope_theta / rope_scaling / rope_local_base_freq. Scaling other than linear and
    llama3 is refused."""
    rp = hc.get("rope_parameters") or {}
    if not isinstance(rp, dict):
        raise MinirtError(f"{path}: rope_parameters is not a JSON object")
    glob, local = (rp.get("full_attention") or {}, rp.get("sliding_attention") or {}) if "full_attention" in rp \
        else (rp, {})
    scaling = glob
    if glob.get("rope_type", glob.get("type")) in (None, "default"):
        scaling = hc.get("rope_scaling") or {}
    if not isinstance(scaling, dict) or not isinstance(local, dict):
        raise MinirtError(f"{path}: rope_scaling is not a JSON object")
    default_theta = 1_000_000.0 if arch == "gemma3" else 10000.0
    out = dict(rope_theta=need_float(glob.get("rope_theta", hc.get("rope_theta", default_theta)), "rope_theta", path))
    if arch == "gemma3":  # its sliding-window layers have their own base; other families' slide with rope_theta
        out["rope_local_theta"] = need_float(local.get("rope_theta", hc.get("rope_local_base_freq", 10000.0)),
                                             "sliding_attention rope_theta", path)
    if local.get("rope_type", "default") != "default":
        raise MinirtError(f"{path}: RoPE scaling {str(local.get('rope_type'))[:40]!r} of the sliding-window layers "
                          f"is not supported")
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind in (None, "default"):
        return out
    if kind not in ("linear", "llama3"):
        raise MinirtError(f"{path}: RoPE scaling {str(kind)[:40]!r} is not supported (linear and llama3 are)")
    factor = need_float(scaling.get("factor", 8.0 if kind == "llama3" else None), "rope scaling factor", path)
    out.update(rope_scaling=kind, rope_factor=factor)
    if kind == "llama3":
        low = need_float(scaling.get("low_freq_factor", 1.0), "low_freq_factor", path)
        high = need_float(scaling.get("high_freq_factor", 4.0), "high_freq_factor", path)
        orig = need_int(scaling.get("original_max_position_embeddings", 8192), "original_max_position_embeddings",
                        path, 1, LIMITS["max_ctx"])
        if high <= low:
            raise MinirtError(f"{path}: llama3 RoPE scaling needs high_freq_factor > low_freq_factor")
        out.update(rope_llama3=(low, high, orig),
                   rope_freq_factors=llama3_freq_factors(out["rope_theta"], head_dim, factor, low, high, orig))
    return out


def _window_options(hc: dict, path, arch: str, n_layers: int) -> dict:
    """Sliding-window attention: its width and which layers use it (layer_types where config.json lists them)."""
    types = hc.get("layer_types")
    if arch in ("qwen2", "qwen3"):
        if hc.get("use_sliding_window") or (isinstance(types, list) and "sliding_attention" in types):
            raise MinirtError(f"{path}: Qwen's use_sliding_window is not supported (llama.cpp does not run it either)")
        return {}
    window = hc.get("sliding_window")
    if arch == "llama" and hc.get("model_type") != "mistral" or window is None:
        return {}
    out = dict(sliding_window=need_int(window, "sliding_window", path, 1, LIMITS["max_ctx"]))
    if isinstance(types, list):
        if len(types) != n_layers or not set(types) <= {"sliding_attention", "full_attention"}:
            raise MinirtError(f"{path}: layer_types is not a list of {n_layers} sliding_attention/full_attention")
        out["swa_layers"] = tuple(t == "sliding_attention" for t in types)
    elif arch == "gemma3":
        p = hc.get("sliding_window_pattern", hc.get("_sliding_window_pattern", 6))
        p = need_int(p, "sliding_window_pattern", path, 1, LIMITS["n_layers"])
        if p != 6:
            out["swa_layers"] = tuple((i + 1) % p != 0 for i in range(n_layers))
    own = tuple((i + 1) % 6 != 0 for i in range(n_layers)) if arch == "gemma3" else (True,) * n_layers
    if out.get("swa_layers") == own:
        del out["swa_layers"]  # the family's own pattern: nothing to record
    return out


def _decoder(c: _Fields, raw: dict[str, Tensor], arch: str):
    """LLaMA-like decoders (llama, mistral, qwen2, qwen3, phi3, gemma3): names and options by family."""
    hc = c.hc
    key, want = ACTIVATION.get(arch, ("hidden_act", "silu"))
    if hc.get(key, want) != want:
        raise MinirtError(f"{c.path}: {arch} activation {str(hc.get(key))[:40]!r} is not supported ({want} is)")
    for opt in ("final_logit_softcapping", "attn_logit_softcapping"):
        if hc.get(opt) is not None:
            raise MinirtError(f"{c.path}: {opt} is not supported")
    if hc.get("use_bidirectional_attention"):
        raise MinirtError(f"{c.path}: use_bidirectional_attention is not supported (a causal decoder is)")
    if hc.get("partial_rotary_factor", 1.0) != 1.0:
        raise MinirtError(f"{c.path}: partial_rotary_factor {str(hc['partial_rotary_factor'])[:20]} is not supported "
                          f"(RoPE over the whole head is)")
    d, nh = c.int("hidden_size", hi_key="dim"), c.int("num_attention_heads", hi_key="n_heads")
    tied = "lm_head.weight" not in raw
    n_layers = c.int("num_hidden_layers", hi_key="n_layers")
    head_dim = c.int("head_dim", max(d // nh, 1), "head_dim")
    extra = {}
    if arch == "gemma3":
        extra["attn_scale"] = c.float("query_pre_attn_scalar", head_dim) ** -0.5
    cfg = ModelConfig(arch, vocab_size=c.int("vocab_size", hi_key="vocab_size"), dim=d,
                      n_layers=n_layers, n_heads=nh,
                      n_kv_heads=c.int("num_key_value_heads", nh, "n_kv_heads"), head_dim=head_dim,
                      hidden_dim=c.int("intermediate_size", hi_key="hidden_dim"),
                      max_ctx=c.int("max_position_embeddings", 2048, "max_ctx"),
                      norm_eps=c.float("rms_norm_eps", 1e-6, 1.0), tied_head=tied,
                      **_rope_options(hc, c.path, arch, head_dim), **_window_options(hc, c.path, arch, n_layers),
                      **extra)
    t, used = {}, set()

    def take(src: str, dst: str, required: bool = True):
        if src not in raw:
            if required:
                raise MinirtError(f"checkpoint is missing tensor {src}")
            return
        w = raw[src]
        if norm_offset(arch, dst):
            w = Tensor(w.float32() + np.float32(1.0), "F32", w.shape)
        t[dst] = w
        used.add(src)

    take("model.embed_tokens.weight", "embed")
    take("model.norm.weight", "norm.weight")
    if not tied:
        take("lm_head.weight", "head")
    for i in range(n_layers):
        for dst, src in hf_layer_names(arch).items():
            take(f"model.layers.{i}.{src}", f"layers.{i}.{dst}", required=not dst.startswith("b"))
    return cfg, t, used


def _tokenizer(folder: Path, hc: dict, cfg: ModelConfig) -> TokenizerSpec:
    tc = _load_json(folder / "tokenizer_config.json") if (folder / "tokenizer_config.json").exists() else {}
    if not isinstance(tc, dict):
        raise MinirtError(f"{folder}/tokenizer_config.json: not a JSON object")
    template = tc.get("chat_template")
    common = dict(bos_id=hc.get("bos_token_id"), eos_id=hc.get("eos_token_id"),
                  chat_template=template if isinstance(template, str) else None)
    if isinstance(common["eos_id"], list):
        common["eos_id"] = common["eos_id"][0] if common["eos_id"] else None
    if (folder / "tokenizer.model").exists():
        return TokenizerSpec("spm", spm_model=folder / "tokenizer.model", add_bos=tc.get("add_bos_token", True) is True,
                             **common)
    special: dict[str, int] = {}
    if (folder / "tokenizer.json").exists():
        where = folder / "tokenizer.json"
        tj = _load_json(where)
        model = tj.get("model") if isinstance(tj, dict) else None
        if not isinstance(model, dict) or model.get("type") != "BPE":
            kind = model.get("type") if isinstance(model, dict) else None
            raise MinirtError(f"{where}: tokenizer type {str(kind)[:40]!r} is not supported (BPE is)")
        vocab, merges = model.get("vocab"), model.get("merges", [])
        if not isinstance(merges, list):
            raise MinirtError(f"{where}: merges is not a list")
        merges = [m if isinstance(m, str) else " ".join(m) if isinstance(m, list) and all(isinstance(x, str) for x in m)
                  else _bad(where, "a merge that is not a string or a pair of strings") for m in merges]
        added = tj.get("added_tokens", [])
        if not isinstance(added, list) or not all(isinstance(a, dict) for a in added):
            raise MinirtError(f"{where}: added_tokens is not a list of objects")
        for a in added:
            content, i = a.get("content"), a.get("id")
            if not isinstance(content, str) or type(i) is not int:
                raise MinirtError(f"{where}: an added token without a string content and an integer id")
            if content in special and special[content] != i:
                raise MinirtError(f"{where}: added token {content[:40]!r} appears twice with different ids")
            special[content] = i
        from ..tokenizer import pre_name_from_hf  # tokenizer.json's pre_tokenizer → llama.cpp's name for it
        pre = pre_name_from_hf(tj.get("pre_tokenizer"), where)
        norm = tj.get("normalizer")
        if norm is not None and norm != {"type": "NFC"}:
            raise MinirtError(f"{where}: normalizer {json.dumps(norm)[:60]} is not supported (none or NFC is)")
        common["normalizer"] = "NFC" if norm else None
    elif (folder / "vocab.json").exists() and (folder / "merges.txt").exists():
        where = folder / "vocab.json"
        vocab = _load_json(where)
        try:
            lines = (folder / "merges.txt").read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as e:
            raise MinirtError(f"{folder / 'merges.txt'}: invalid UTF-8 at byte {e.start}") from None
        merges = [ln for ln in lines if ln and not ln.startswith("#version")]
        pre = "gpt-2"
    elif (folder / "gpt2.tiktoken").exists():
        return TokenizerSpec("bpe", tiktoken_file=folder / "gpt2.tiktoken", special={"<|endoftext|>": 50256},
                             bos_id=50256, eos_id=50256)
    else:
        return TokenizerSpec("none", **common)
    if not isinstance(vocab, dict) or not all(type(i) is int for i in vocab.values()):
        raise MinirtError(f"{where}: the vocabulary is not an object of token → integer id")
    ids = list(vocab.values()) + list(special.values())
    if ids and (min(ids) < 0 or max(ids) >= cfg.vocab_size):
        raise MinirtError(f"{where}: token id {min(ids) if min(ids) < 0 else max(ids)} is outside the model's "
                          f"vocabulary 0..{cfg.vocab_size - 1}")
    if len(set(vocab.values())) != len(vocab):
        raise MinirtError(f"{where}: two tokens share one id (corrupt vocabulary)")
    tokens = [""] * cfg.vocab_size
    for tok, i in {**vocab, **special}.items():
        tokens[i] = tok
    if cfg.arch == "gpt2" and "<|endoftext|>" in vocab:
        special.setdefault("<|endoftext|>", vocab["<|endoftext|>"])
    return TokenizerSpec("bpe", tokens=tokens, merges=merges, special=special, pre=pre, **common)


def _bad(where, what: str):
    raise MinirtError(f"{where}: {what}")
