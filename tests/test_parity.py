"""Numerical parity of minirt with an independent reference: Hugging Face transformers on PyTorch (float32).

Tiny, randomly initialised GPT-2 and Llama models are built with transformers, saved as safetensors
folders and as GGUF files (written with the `gguf` package the way llama.cpp's convert_hf_to_gguf.py
writes them, Q/K rows permuted), and loaded with minirt. minirt's logits, full-sequence and through its
KV cache, are compared with PyTorch's forward pass. Quantized GGUF tensors are checked against a numpy
dequantizer written here from the GGML block layouts (not gguf.quants.dequantize, which minirt uses).
Only token ids are used: the saved folders have no tokenizer.
"""
from __future__ import annotations

import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

from gguf import GGMLQuantizationType as QT  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM  # noqa: E402
from transformers.pytorch_utils import Conv1D  # noqa: E402

import minirt  # noqa: E402
from minirt.readers import read_checkpoint  # noqa: E402

VOCAB, DIM, HIDDEN, LAYERS, HEADS, KV_HEADS, CTX = 300, 64, 128, 2, 4, 2, 64
ROPE_THETA = 50000.0
SEQ_LEN = 20
# float32 on both sides; logits here have std ≈ 1 and |max| ≈ 4, so 1e-4 leaves room for summation-order
# differences (BLAS vs PyTorch) while any mapping, RoPE or attention mistake shows up as O(0.1..1).
ATOL = 1e-4


# ---- reference models ---------------------------------------------------------------------------------
def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Re-draw every weight at a scale that gives logits of std ≈ 1: HF's default init (std 0.02) gives
    near-zero logits, against which a 1e-4 tolerance would prove little."""
    gen = torch.Generator().manual_seed(seed)

    def normal(p, std, mean=0.0):
        p.copy_(mean + std * torch.randn(p.shape, generator=gen))

    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, torch.nn.Embedding):
                normal(mod.weight, 0.5)
            elif isinstance(mod, Conv1D):  # GPT-2: weight is (in, out)
                normal(mod.weight, mod.weight.shape[0] ** -0.5)
                normal(mod.bias, 0.1)
            elif isinstance(mod, torch.nn.Linear):
                normal(mod.weight, mod.weight.shape[1] ** -0.5)
                if mod.bias is not None:
                    normal(mod.bias, 0.1)
            elif isinstance(mod, torch.nn.LayerNorm) or type(mod).__name__.endswith("RMSNorm"):
                normal(mod.weight, 0.2, mean=1.0)
                if getattr(mod, "bias", None) is not None:
                    normal(mod.bias, 0.1)


def make_gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=VOCAB, n_positions=CTX, n_embd=DIM, n_layer=LAYERS, n_head=HEADS,
                     bos_token_id=0, eos_token_id=0, attn_implementation="eager")
    model = GPT2LMHeadModel(cfg).eval()
    _randomize(model, 1)
    return model


def make_llama(tied: bool, bias: bool = False) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=DIM, intermediate_size=HIDDEN, num_hidden_layers=LAYERS,
                      num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=CTX,
                      rope_theta=ROPE_THETA, rms_norm_eps=1e-5, tie_word_embeddings=tied,
                      attention_bias=bias, bos_token_id=1, eos_token_id=2, attn_implementation="eager")
    model = LlamaForCausalLM(cfg).eval()
    _randomize(model, 2 if tied else 3 + bias)
    if bias:  # Q/K/V biases only (Qwen2-style): minirt's HF reader does not read o_proj.bias (see below)
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.o_proj.bias.zero_()
    return model


def hf_logits(model, ids) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([list(ids)])).logits[0].float().numpy()


def sd_numpy(model) -> dict[str, np.ndarray]:
    return {k: v.detach().float().numpy() for k, v in model.state_dict().items()}


# ---- GGUF writers (after llama.cpp's convert_hf_to_gguf.py) -----------------------------------------
def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """LlamaModel.permute in convert_hf_to_gguf.py: HF rotate-half rows → llama.cpp adjacent pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _write_gguf(path, arch: str, keys, tensors: dict[str, np.ndarray], qtype: QT | None) -> dict[str, np.ndarray]:
    """Write tensors (2-D ones as qtype, if given; 1-D as F32). Returns the stored bytes/arrays by GGUF name."""
    w = gguf.GGUFWriter(str(path), arch)
    keys(w)
    stored = {}
    for name, arr in tensors.items():
        arr = np.ascontiguousarray(arr, dtype=np.float32)
        if qtype is not None and arr.ndim == 2:
            data = gguf.quants.quantize(arr, qtype)
            w.add_tensor(name, data, raw_dtype=qtype)
        else:
            data = arr
            w.add_tensor(name, data)
        stored[name] = data
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return stored


def write_llama_gguf(path, model: LlamaForCausalLM, qtype: QT | None = None) -> dict[str, np.ndarray]:
    c, sd = model.config, sd_numpy(model)

    def keys(w):
        w.add_block_count(c.num_hidden_layers)
        w.add_context_length(c.max_position_embeddings)
        w.add_embedding_length(c.hidden_size)
        w.add_feed_forward_length(c.intermediate_size)
        w.add_head_count(c.num_attention_heads)
        w.add_head_count_kv(c.num_key_value_heads)
        w.add_rope_freq_base(ROPE_THETA)
        w.add_layer_norm_rms_eps(c.rms_norm_eps)
        w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)

    t = {"token_embd.weight": sd["model.embed_tokens.weight"]}
    for i in range(c.num_hidden_layers):
        p, b = f"model.layers.{i}.", f"blk.{i}."
        t[b + "attn_norm.weight"] = sd[p + "input_layernorm.weight"]
        t[b + "attn_q.weight"] = llama_cpp_permute(sd[p + "self_attn.q_proj.weight"], c.num_attention_heads)
        t[b + "attn_k.weight"] = llama_cpp_permute(sd[p + "self_attn.k_proj.weight"], c.num_key_value_heads)
        t[b + "attn_v.weight"] = sd[p + "self_attn.v_proj.weight"]
        if p + "self_attn.q_proj.bias" in sd:  # llama.cpp permutes the Q/K biases like the weights
            t[b + "attn_q.bias"] = llama_cpp_permute(sd[p + "self_attn.q_proj.bias"], c.num_attention_heads)
            t[b + "attn_k.bias"] = llama_cpp_permute(sd[p + "self_attn.k_proj.bias"], c.num_key_value_heads)
            t[b + "attn_v.bias"] = sd[p + "self_attn.v_proj.bias"]
            t[b + "attn_output.bias"] = sd[p + "self_attn.o_proj.bias"]
        t[b + "attn_output.weight"] = sd[p + "self_attn.o_proj.weight"]
        t[b + "ffn_norm.weight"] = sd[p + "post_attention_layernorm.weight"]
        t[b + "ffn_gate.weight"] = sd[p + "mlp.gate_proj.weight"]
        t[b + "ffn_up.weight"] = sd[p + "mlp.up_proj.weight"]
        t[b + "ffn_down.weight"] = sd[p + "mlp.down_proj.weight"]
    t["output_norm.weight"] = sd["model.norm.weight"]
    if not c.tie_word_embeddings:
        t["output.weight"] = sd["lm_head.weight"]
    return _write_gguf(path, "llama", keys, t, qtype)


def write_gpt2_gguf(path, model: GPT2LMHeadModel, with_output: bool = False) -> None:
    """with_output: also store output.weight as a copy of token_embd, as convert_hf_to_gguf.py does for GPT-2."""
    c, sd = model.config, sd_numpy(model)

    def keys(w):
        w.add_block_count(c.n_layer)
        w.add_context_length(c.n_positions)
        w.add_embedding_length(c.n_embd)
        w.add_feed_forward_length(c.n_inner or 4 * c.n_embd)
        w.add_head_count(c.n_head)
        w.add_layer_norm_eps(c.layer_norm_epsilon)

    t = {"token_embd.weight": sd["transformer.wte.weight"], "position_embd.weight": sd["transformer.wpe.weight"]}
    for i in range(c.n_layer):
        p, b = f"transformer.h.{i}.", f"blk.{i}."
        for src, dst in (("ln_1", "attn_norm"), ("ln_2", "ffn_norm")):
            t[b + dst + ".weight"], t[b + dst + ".bias"] = sd[p + src + ".weight"], sd[p + src + ".bias"]
        for src, dst in (("attn.c_attn", "attn_qkv"), ("attn.c_proj", "attn_output"),
                         ("mlp.c_fc", "ffn_up"), ("mlp.c_proj", "ffn_down")):
            t[b + dst + ".weight"] = sd[p + src + ".weight"].T  # Conv1D (in, out) → (out, in)
            t[b + dst + ".bias"] = sd[p + src + ".bias"]
    t["output_norm.weight"], t["output_norm.bias"] = sd["transformer.ln_f.weight"], sd["transformer.ln_f.bias"]
    if with_output:
        t["output.weight"] = sd["transformer.wte.weight"]
    _write_gguf(path, "gpt2", keys, t, None)


# ---- independent dequantization ------------------------------------------------------------------------
def dequantize_ref(stored: np.ndarray, qtype: QT, shape) -> np.ndarray:
    """Dequantize the bytes handed to GGUFWriter, from the GGML block layouts (little-endian)."""
    b = np.ascontiguousarray(stored).view(np.uint8).reshape(-1)
    f16 = lambda col: col.copy().view("<f2").astype(np.float32)  # noqa: E731  (n, 2) uint8 → (n, 1)
    if qtype == QT.F16:
        x = b.view("<f2").astype(np.float32)
    elif qtype == QT.BF16:  # bf16 = upper 16 bits of an f32
        x = (b.view("<u2").astype(np.uint32) << 16).view(np.float32)
    elif qtype == QT.Q8_0:  # 34 bytes: f16 d, 32 × int8 q;  x = d·q
        blk = b.reshape(-1, 34)
        x = f16(blk[:, 0:2]) * blk[:, 2:].view(np.int8).astype(np.float32)
    elif qtype in (QT.Q4_0, QT.Q4_1):  # f16 d (, f16 m), 16 bytes: low nibbles = elements 0..15, high = 16..31
        head = 2 if qtype == QT.Q4_0 else 4
        blk = b.reshape(-1, head + 16)
        qs = blk[:, head:]
        q = np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.float32)
        d = f16(blk[:, 0:2])
        x = d * (q - 8) if qtype == QT.Q4_0 else d * q + f16(blk[:, 2:4])
    else:
        raise NotImplementedError(qtype)
    return x.reshape(shape)


# ---- fixtures -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ids() -> list[int]:
    g = torch.Generator().manual_seed(1234)
    return torch.randint(0, VOCAB, (SEQ_LEN,), generator=g).tolist()


@pytest.fixture(scope="module")
def hf_models():
    return {"gpt2": make_gpt2(), "llama_gqa": make_llama(tied=False), "llama_tied": make_llama(tied=True),
            "llama_bias": make_llama(tied=False, bias=True)}


@pytest.fixture(scope="module")
def sources(hf_models, tmp_path_factory):
    """(arch-variant, format) → path minirt loads."""
    root = tmp_path_factory.mktemp("parity")
    out = {}
    for name, model in hf_models.items():
        folder = root / name
        model.save_pretrained(str(folder), safe_serialization=True)
        out[name, "hf"] = folder
        out[name, "gguf"] = root / f"{name}.gguf"
        if name == "gpt2":
            write_gpt2_gguf(out[name, "gguf"], model)
            out[name, "gguf+output"] = root / f"{name}-output.gguf"
            write_gpt2_gguf(out[name, "gguf+output"], model, with_output=True)
        else:
            write_llama_gguf(out[name, "gguf"], model)
    return out


@pytest.fixture(scope="module")
def loaded(sources):
    cache = {}

    def get(key):
        if key not in cache:
            cache[key] = minirt.load(str(sources[key]))
        return cache[key]
    return get


SOURCES = [("gpt2", "hf"), ("gpt2", "gguf"), ("gpt2", "gguf+output"),
           ("llama_gqa", "hf"), ("llama_gqa", "gguf"), ("llama_tied", "hf"), ("llama_tied", "gguf")]
SOURCE_IDS = [f"{a}-{f}" for a, f in SOURCES]


# ---- 1, 2, 4: logits parity, full sequence and incremental -----------------------------------------------
@pytest.mark.parametrize("key", SOURCES, ids=SOURCE_IDS)
def test_logits_match_hf(key, hf_models, loaded, ids):
    m, ref = loaded(key), hf_logits(hf_models[key[0]], ids)
    assert ref.std() > 1.0, "reference logits too flat for the comparison to mean anything"
    got = m.logits(ids)
    assert got.shape == (SEQ_LEN, VOCAB) and got.dtype == np.float32
    np.testing.assert_allclose(got, ref, rtol=0, atol=ATOL)


@pytest.mark.parametrize("key", SOURCES, ids=SOURCE_IDS)
@pytest.mark.parametrize("k", [1, 7])
def test_incremental_decode_matches_hf(key, k, hf_models, loaded, ids):
    """Prefill k tokens (BLAS path when k ≥ 4), then one token per step (Numba matvec path)."""
    m, ref = loaded(key), hf_logits(hf_models[key[0]], ids)
    cache = m.new_cache(SEQ_LEN + 4)
    rows = [m.forward(ids[:k], cache, logits="all")]
    for t in ids[k:]:
        rows.append(m.forward([t], cache))
    got = np.concatenate(rows)
    assert cache.pos == SEQ_LEN
    np.testing.assert_allclose(got, ref, rtol=0, atol=ATOL)


def test_config_read_from_each_source(loaded):
    for fmt in ("hf", "gguf"):
        c = loaded(("llama_gqa", fmt)).cfg
        assert (c.arch, c.n_heads, c.n_kv_heads, c.head_dim, c.hidden_dim) == ("llama", HEADS, KV_HEADS, 16, HIDDEN)
        assert c.rope_theta == ROPE_THETA and c.max_ctx == CTX and not c.tied_head
        assert loaded(("llama_tied", fmt)).cfg.tied_head
        g = loaded(("gpt2", fmt)).cfg
        assert (g.arch, g.n_heads, g.n_kv_heads, g.hidden_dim, g.tied_head) == ("gpt2", HEADS, HEADS, 4 * DIM, True)
    assert not loaded(("gpt2", "gguf+output")).cfg.tied_head


def test_rope_theta_matters(sources, hf_models, ids):
    """Non-vacuity of the Llama parity: with the default θ=10000 instead of 50000, logits differ clearly."""
    import dataclasses
    ck = read_checkpoint(sources["llama_gqa", "hf"])
    ck.config = dataclasses.replace(ck.config, rope_theta=10000.0)
    wrong = minirt.Model.from_checkpoint(ck).logits(ids)
    assert np.abs(wrong - hf_logits(hf_models["llama_gqa"], ids)).max() > 1e-2


def test_gguf_qk_unpermuted_to_hf_rows(sources, hf_models):
    """The GGUF reader's undoing of llama.cpp's Q/K permutation gives back HF's rows exactly."""
    ck = read_checkpoint(sources["llama_gqa", "gguf"])
    sd = sd_numpy(hf_models["llama_gqa"])
    for i in range(LAYERS):
        for proj, name in (("q_proj", "wq"), ("k_proj", "wk"), ("v_proj", "wv"), ("o_proj", "wo")):
            np.testing.assert_array_equal(ck.tensors[f"layers.{i}.{name}"].float32(),
                                          sd[f"model.layers.{i}.self_attn.{proj}.weight"])
    np.testing.assert_array_equal(ck.tensors["head"].float32(), sd["lm_head.weight"])


# ---- 3: KV cache truncation ---------------------------------------------------------------------------
@pytest.mark.parametrize("key", [("gpt2", "hf"), ("llama_gqa", "gguf")], ids=["gpt2", "llama_gqa"])
def test_cache_truncate_then_continue(key, hf_models, loaded, ids):
    m, keep = loaded(key), 8
    cont = [(7 * i + 3) % VOCAB for i in range(16)]        # longer than the discarded tail: overwrites it
    full = ids[:keep] + cont

    def run_continuation(cache):
        rows = [m.forward(cont[:5], cache, logits="all")]  # one batched chunk, then single tokens
        rows += [m.forward([t], cache) for t in cont[5:]]
        return np.concatenate(rows)

    cache = m.new_cache(len(full))
    m.forward(ids, cache, logits="all")
    m.forward([5, 6, 7], cache)                             # some extra positions, also to be discarded
    cache.truncate(keep)
    assert cache.pos == keep
    got = run_continuation(cache)

    fresh = m.new_cache(len(full))
    m.forward(ids[:keep], fresh, logits="all")
    np.testing.assert_allclose(got, run_continuation(fresh), rtol=0, atol=1e-5)
    np.testing.assert_allclose(got, m.logits(full)[keep:], rtol=0, atol=1e-5)
    np.testing.assert_allclose(got, hf_logits(hf_models[key[0]], full)[keep:], rtol=0, atol=ATOL)

    with pytest.raises(ValueError):
        cache.truncate(cache.pos + 1)


def test_cache_full_raises(loaded, ids):
    m = loaded(("llama_gqa", "hf"))
    cache = m.new_cache(5)
    m.forward(ids[:5], cache)
    with pytest.raises(minirt.MinirtError):
        m.forward([1], cache)


# ---- 5: quantized GGUF tensor types -------------------------------------------------------------------
# Loose checks against the unquantized HF model, per type (measured on these seeds: F16 7e-4, BF16 6e-3,
# Q8_0 0.02, Q4_1 0.24, Q4_0 0.28 relative RMS logit error; Q4 agreement 65-70%). Random models have flat
# logits with near-ties at the top, so 4-bit noise flips some argmaxes; HF's argmax must stay in the top 5.
#   type: (max relative Frobenius error of a weight matrix, max relative RMS logit error, min argmax agreement)
QUANT = {
    QT.F16: (1e-3, 5e-3, 1.0),
    QT.BF16: (5e-3, 0.02, 0.95),
    QT.Q8_0: (0.01, 0.05, 0.9),
    QT.Q4_1: (0.1, 0.4, 0.6),
    QT.Q4_0: (0.1, 0.4, 0.6),
}
GGUF_MATRICES = {"token_embd.weight": "embed", "output.weight": "head"}
for _i in range(LAYERS):
    GGUF_MATRICES.update({f"blk.{_i}.{g}.weight": f"layers.{_i}.{c}" for g, c in (
        ("attn_q", "wq"), ("attn_k", "wk"), ("attn_v", "wv"), ("attn_output", "wo"),
        ("ffn_gate", "w_gate"), ("ffn_up", "w_up"), ("ffn_down", "w_down"))})
HF_MATRICES = {"embed": "model.embed_tokens.weight", "head": "lm_head.weight"}
for _i in range(LAYERS):
    HF_MATRICES.update({f"layers.{_i}.{c}": f"model.layers.{_i}.{h}.weight" for c, h in (
        ("wq", "self_attn.q_proj"), ("wk", "self_attn.k_proj"), ("wv", "self_attn.v_proj"),
        ("wo", "self_attn.o_proj"), ("w_gate", "mlp.gate_proj"), ("w_up", "mlp.up_proj"),
        ("w_down", "mlp.down_proj"))})


def hf_logits_same(model, dequant, ids):
    """HF's logits with the matrices replaced by minirt's dequantized ones."""
    same = copy.deepcopy(model)
    with torch.no_grad():
        params = dict(same.named_parameters())
        for cname, hname in HF_MATRICES.items():
            params[hname].copy_(torch.from_numpy(dequant[cname]))
    return hf_logits(same, ids)


@pytest.mark.parametrize("qtype", list(QUANT), ids=[q.name for q in QUANT])
def test_quantized_gguf(qtype, hf_models, tmp_path, ids):
    max_werr, max_lerr, min_agree = QUANT[qtype]
    model = hf_models["llama_gqa"]
    path = tmp_path / f"llama-{qtype.name}.gguf"
    stored = write_llama_gguf(path, model, qtype)
    ck = read_checkpoint(path)
    assert ck.file_type == qtype.name

    # minirt's dequantized weights == the reference dequantizer on the bytes written (Q/K: un-permuted)
    dequant = {}
    for gname, cname in GGUF_MATRICES.items():
        t = ck.tensors[cname]
        assert t.qtype == qtype.name
        ref = dequantize_ref(stored[gname], qtype, t.shape)
        if cname.endswith((".wq", ".wk")):  # undo the writer's permutation with its own inverse
            heads = HEADS if cname.endswith(".wq") else KV_HEADS
            ref = ref[np.argsort(llama_cpp_permute(np.arange(t.shape[0]), heads))]
        np.testing.assert_array_equal(t.float32(), ref, err_msg=f"{cname} ({qtype.name})")
        dequant[cname] = ref
    sd = sd_numpy(model)  # ... and close to the originals (also a sanity check of the reference dequantizer)
    for cname, hname in HF_MATRICES.items():
        err = np.linalg.norm(dequant[cname] - sd[hname]) / np.linalg.norm(sd[hname])
        assert err < max_werr, f"{cname}: relative error {err:.4f} for {qtype.name}"

    # exact parity with HF running the same dequantized weights (float32 activations)
    np.testing.assert_allclose(minirt.Model.from_checkpoint(ck, exact=True).logits(ids), hf_logits_same(
        model, dequant, ids), rtol=0, atol=ATOL)
    got = minirt.Model.from_checkpoint(ck).logits(ids)  # int8 activations, as llama.cpp: the loose checks below

    # loose agreement with the unquantized model
    ref = hf_logits(model, ids)
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < max_lerr
    assert (got.argmax(-1) == ref.argmax(-1)).mean() >= min_agree
    top5 = np.argsort(-got, axis=-1)[:, :5]
    assert all(r in row for r, row in zip(ref.argmax(-1), top5))


# ---- 6: safetensors folders in half precision ----------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize("name", ["llama_gqa", "gpt2"])
def test_half_precision_safetensors(name, dtype, hf_models, tmp_path, ids):
    half = copy.deepcopy(hf_models[name]).to(dtype)
    half.save_pretrained(str(tmp_path), safe_serialization=True)
    # The reference: the float32 model with its weights replaced by the half ones upcast. (Not
    # half.float(): .to(dtype) also rounds Llama's RoPE inv_freq buffer, which is no weight.)
    upcast = copy.deepcopy(hf_models[name])
    upcast.load_state_dict({k: v.float() for k, v in half.state_dict().items()})
    ck = read_checkpoint(tmp_path)
    expected = "BF16" if dtype == torch.bfloat16 else "F16"
    assert ck.file_type == expected
    sd = sd_numpy(upcast)
    if name == "llama_gqa":
        pairs = {"embed": "model.embed_tokens.weight", "head": "lm_head.weight", "norm.weight": "model.norm.weight",
                 "layers.1.wk": "model.layers.1.self_attn.k_proj.weight",
                 "layers.1.w_down": "model.layers.1.mlp.down_proj.weight",
                 "layers.0.attn_norm.weight": "model.layers.0.input_layernorm.weight"}
    else:
        pairs = {"embed": "transformer.wte.weight", "pos_embed": "transformer.wpe.weight",
                 "layers.1.b_up": "transformer.h.1.mlp.c_fc.bias", "norm.bias": "transformer.ln_f.bias"}
        np.testing.assert_array_equal(ck.tensors["layers.1.wqkv"].float32(), sd["transformer.h.1.attn.c_attn.weight"].T)
    for cname, hname in pairs.items():
        assert ck.tensors[cname].qtype == expected
        np.testing.assert_array_equal(ck.tensors[cname].float32(), sd[hname], err_msg=cname)
    m = minirt.Model.from_checkpoint(ck)
    np.testing.assert_allclose(m.logits(ids), hf_logits(upcast, ids), rtol=0, atol=ATOL)


# ---- biases and row selection (each once a bug) -------------------------------------------------------
@pytest.mark.parametrize("fmt", ["hf", "gguf"])
def test_llama_attention_bias(fmt, hf_models, loaded, ids):
    """Llama-architecture models with Q/K/V biases (attention_bias=True)."""
    m = loaded(("llama_bias", fmt))
    np.testing.assert_allclose(m.logits(ids), hf_logits(hf_models["llama_bias"], ids), rtol=0, atol=ATOL)


@pytest.mark.parametrize("flag", ["attention_bias", "mlp_bias"])
def test_llama_output_and_mlp_biases(flag, tmp_path, ids):
    """attention_bias=True also gives o_proj a bias; mlp_bias=True gives gate/up/down biases."""
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=DIM, intermediate_size=HIDDEN, num_hidden_layers=1,
                      num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=CTX,
                      bos_token_id=1, eos_token_id=2, attn_implementation="eager", **{flag: True})
    model = LlamaForCausalLM(cfg).eval()
    _randomize(model, 5)
    model.save_pretrained(str(tmp_path), safe_serialization=True)
    np.testing.assert_allclose(minirt.load(str(tmp_path)).logits(ids), hf_logits(model, ids), rtol=0, atol=ATOL)


def test_forward_with_index_array_rows(loaded, ids):
    """forward()'s docstring allows `logits` to be an index array; a numpy one of ≥2 elements fails."""
    m = loaded(("llama_gqa", "hf"))
    rows = np.array([2, 5, 9])
    got = m.forward(ids, m.new_cache(SEQ_LEN), logits=rows)
    np.testing.assert_allclose(got, m.logits(ids)[rows], rtol=0, atol=1e-5)  # GEMM vs matvec rounding
