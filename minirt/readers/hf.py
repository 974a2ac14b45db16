"""Hugging Face model folders: config.json + *.safetensors (memory-mapped) or pytorch_model*.bin (read by a
restricted unpickler, see torchbin.py) + tokenizer files."""
from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

from ..config import ModelConfig
from ..errors import MinirtError
from .base import Checkpoint, Tensor, TokenizerSpec

DTYPES = {"F32": (np.float32, "F32"), "F16": (np.float16, "F16"), "BF16": (np.uint16, "BF16"),
          "F64": (np.float64, "F32")}


def read_safetensors(path: Path) -> dict[str, Tensor]:
    """Parse a .safetensors file: 8-byte header length, JSON header, then raw little-endian data.

    Every tensor's offsets are bounds-checked against the file before it is mapped."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise MinirtError(f"{path}: too short to be a safetensors file")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8 or n > 100_000_000:
            raise MinirtError(f"{path}: corrupt safetensors header (length {n} for a file of {size} bytes)")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise MinirtError(f"{path}: corrupt safetensors header (not JSON)") from None
    if not isinstance(header, dict):
        raise MinirtError(f"{path}: corrupt safetensors header (not a JSON object)")
    header.pop("__metadata__", None)
    start = 8 + n
    mm = np.memmap(path, dtype=np.uint8, mode="r") if size > start else np.zeros(0, np.uint8)
    out = {}
    for name, info in header.items():
        try:
            dtype, qtype = DTYPES[info["dtype"]]
            shape = tuple(int(s) for s in info["shape"])
            a, b = (int(x) for x in info["data_offsets"])
        except KeyError as e:
            raise MinirtError(f"{path}: tensor {name}: unsupported dtype or missing field {e} in the header") from None
        except (TypeError, ValueError, AttributeError):
            raise MinirtError(f"{path}: tensor {name}: malformed header entry") from None
        count = int(np.prod(shape)) if shape else 1
        if not (0 <= a <= b and start + b <= size and b - a == count * np.dtype(dtype).itemsize):
            raise MinirtError(f"{path}: tensor {name} lies outside the file or has the wrong size (truncated?)")
        data = mm[start + a:start + b].view(dtype).reshape(shape)
        if dtype == np.float64:
            data = data.astype(np.float32)
        out[name] = Tensor(data, qtype, shape)
    return out


def _load_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise MinirtError(f"{path}: cannot read ({e})") from None


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
    try:
        if mtype == "gpt2":
            cfg, tensors = _gpt2(hc, raw)
        elif mtype in ("llama", "mistral") or "LlamaForCausalLM" in (hc.get("architectures") or []):
            cfg, tensors = _llama(hc, raw)
        else:
            raise MinirtError(f"{folder}: model_type {mtype!r} is not supported (gpt2 and llama are)")
    except KeyError as e:
        raise MinirtError(f"{cfg_path}: required field {e} is missing") from None
    except (TypeError, ValueError, AttributeError) as e:
        raise MinirtError(f"{cfg_path}: malformed config ({e})") from None
    types = {t.qtype for k, t in tensors.items() if len(t.shape) == 2}
    return Checkpoint(cfg, tensors, _tokenizer(folder, hc, cfg), folder, "/".join(sorted(types)))


def _need(raw: dict, key: str) -> Tensor:
    if key not in raw:
        raise MinirtError(f"checkpoint is missing tensor {key}")
    return raw[key]


def _gpt2(hc: dict, raw: dict[str, Tensor]):
    raw = {k.removeprefix("transformer."): v for k, v in raw.items()}
    act = hc.get("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh"):
        raise MinirtError(f"GPT-2 activation {act!r} is not supported (gelu_new is)")
    d = hc["n_embd"]
    cfg = ModelConfig("gpt2", vocab_size=hc["vocab_size"], dim=d, n_layers=hc["n_layer"], n_heads=hc["n_head"],
                      n_kv_heads=hc["n_head"], head_dim=d // hc["n_head"], hidden_dim=hc.get("n_inner") or 4 * d,
                      max_ctx=hc["n_positions"], norm_eps=hc.get("layer_norm_epsilon", 1e-5),
                      tied_head="lm_head.weight" not in raw or hc.get("tie_word_embeddings", True))
    t = {"embed": _need(raw, "wte.weight"), "pos_embed": _need(raw, "wpe.weight"),
         "norm.weight": _need(raw, "ln_f.weight"), "norm.bias": _need(raw, "ln_f.bias")}
    if not cfg.tied_head:
        t["head"] = raw["lm_head.weight"]
    for i in range(cfg.n_layers):
        p, q = f"h.{i}.", f"layers.{i}."
        for src, dst in (("ln_1", "attn_norm"), ("ln_2", "ffn_norm")):
            t[q + dst + ".weight"] = _need(raw, p + src + ".weight")
            t[q + dst + ".bias"] = _need(raw, p + src + ".bias")
        # Conv1D stores (in, out): transpose to (out, in)
        for src, w, b in (("attn.c_attn", "wqkv", "bqkv"), ("attn.c_proj", "wo", "bo"),
                          ("mlp.c_fc", "w_up", "b_up"), ("mlp.c_proj", "w_down", "b_down")):
            t[q + w] = _need(raw, p + src + ".weight").transpose()
            t[q + b] = _need(raw, p + src + ".bias")
    return cfg, t


def _llama(hc: dict, raw: dict[str, Tensor]):
    rope = hc.get("rope_parameters") or hc.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
        raise MinirtError(f"RoPE scaling {rope.get('rope_type', rope.get('type'))!r} is not supported yet")
    theta = hc.get("rope_theta", rope.get("rope_theta", 10000.0))
    if hc.get("hidden_act", "silu") != "silu":
        raise MinirtError(f"llama activation {hc.get('hidden_act')!r} is not supported (silu is)")
    d, nh = hc["hidden_size"], hc["num_attention_heads"]
    tied = "lm_head.weight" not in raw
    cfg = ModelConfig("llama", vocab_size=hc["vocab_size"], dim=d, n_layers=hc["num_hidden_layers"], n_heads=nh,
                      n_kv_heads=hc.get("num_key_value_heads") or nh, head_dim=hc.get("head_dim") or d // nh,
                      hidden_dim=hc["intermediate_size"], max_ctx=hc.get("max_position_embeddings", 2048),
                      norm_eps=hc.get("rms_norm_eps", 1e-6), rope_theta=float(theta), tied_head=tied)
    t = {"embed": _need(raw, "model.embed_tokens.weight"), "norm.weight": _need(raw, "model.norm.weight")}
    if not tied:
        t["head"] = raw["lm_head.weight"]
    names = {"self_attn.q_proj": "wq", "self_attn.k_proj": "wk", "self_attn.v_proj": "wv", "self_attn.o_proj": "wo",
             "mlp.gate_proj": "w_gate", "mlp.up_proj": "w_up", "mlp.down_proj": "w_down",
             "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    for i in range(cfg.n_layers):
        for src, dst in names.items():
            w = _need(raw, f"model.layers.{i}.{src}.weight")
            t[f"layers.{i}.{dst}" + (".weight" if "norm" in dst else "")] = w
        for src, dst in (("self_attn.q_proj", "bq"), ("self_attn.k_proj", "bk"), ("self_attn.v_proj", "bv"),
                         ("self_attn.o_proj", "bo"), ("mlp.gate_proj", "b_gate"), ("mlp.up_proj", "b_up"),
                         ("mlp.down_proj", "b_down")):
            if f"model.layers.{i}.{src}.bias" in raw:
                t[f"layers.{i}.{dst}"] = raw[f"model.layers.{i}.{src}.bias"]
    return cfg, t


def _tokenizer(folder: Path, hc: dict, cfg: ModelConfig) -> TokenizerSpec:
    tc = _load_json(folder / "tokenizer_config.json") if (folder / "tokenizer_config.json").exists() else {}
    common = dict(bos_id=hc.get("bos_token_id"), eos_id=hc.get("eos_token_id"), chat_template=tc.get("chat_template"))
    if isinstance(common["eos_id"], list):
        common["eos_id"] = common["eos_id"][0]
    if (folder / "tokenizer.model").exists():
        return TokenizerSpec("spm", spm_model=folder / "tokenizer.model", add_bos=tc.get("add_bos_token", True), **common)
    special: dict[str, int] = {}
    if (folder / "tokenizer.json").exists():
        tj = _load_json(folder / "tokenizer.json")
        model = tj.get("model", {})
        if model.get("type") != "BPE":
            raise MinirtError(f"{folder}/tokenizer.json: tokenizer type {model.get('type')!r} is not supported")
        vocab, merges = model["vocab"], [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
        special = {a["content"]: a["id"] for a in tj.get("added_tokens", [])}
        pre = "smollm" if '"Digits"' in json.dumps(tj.get("pre_tokenizer")) else "gpt2"
    elif (folder / "vocab.json").exists() and (folder / "merges.txt").exists():
        vocab = _load_json(folder / "vocab.json")
        lines = (folder / "merges.txt").read_text(encoding="utf-8").splitlines()
        merges = [ln for ln in lines if ln and not ln.startswith("#version")]
        pre = "gpt2"
    elif (folder / "gpt2.tiktoken").exists():
        return TokenizerSpec("bpe", tiktoken_file=folder / "gpt2.tiktoken", special={"<|endoftext|>": 50256},
                             bos_id=50256, eos_id=50256)
    else:
        return TokenizerSpec("none", **common)
    tokens = [""] * max(max(vocab.values()) + 1, cfg.vocab_size)
    for tok, i in {**vocab, **special}.items():
        tokens[i] = tok
    if cfg.arch == "gpt2" and "<|endoftext|>" in vocab:
        special.setdefault("<|endoftext|>", vocab["<|endoftext|>"])
    return TokenizerSpec("bpe", tokens=tokens, merges=merges, special=special, pre=pre, **common)
