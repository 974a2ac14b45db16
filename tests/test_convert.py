"""minirt convert: round trips between Hugging Face folders and GGUF give identical logits (minirt and
transformers), the GGUF files are read back by the `gguf` package with llama.cpp's names, types and
metadata, tokenizers survive the trip, pytorch_model.bin is read without running pickled code, llama2.c
checkpoints match a float64 numpy transcription of run.c, and bad inputs fail with one line and no output.

The tiny models come from tests/test_parity.py (random transformers models with logits of std ≈ 1).
"""
from __future__ import annotations

import json
import os
import pickle
import struct
import subprocess
import sys
import zipfile

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

from gguf import GGUFReader  # noqa: E402
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM  # noqa: E402

import minirt  # noqa: E402
from minirt.convert import Source, convert, read_source, write_gguf  # noqa: E402
from minirt.errors import MinirtError  # noqa: E402
from minirt.readers import read_checkpoint  # noqa: E402

from .test_parity import (ATOL, HEADS, KV_HEADS, LAYERS, VOCAB, hf_logits, llama_cpp_permute, make_gpt2,  # noqa: E402
                          make_llama, sd_numpy, write_llama_gguf)

IDS = [(37 * i + 11) % VOCAB for i in range(20)]


@pytest.fixture(scope="module")
def models():
    return {"llama_gqa": make_llama(tied=False), "llama_tied": make_llama(tied=True),
            "llama_bias": make_llama(tied=False, bias=True), "gpt2": make_gpt2()}


@pytest.fixture(scope="module")
def hf_dirs(models, tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    for name, m in models.items():
        m.save_pretrained(str(root / name), safe_serialization=True)
    return {name: root / name for name in models}


def hf_load(folder):
    return AutoModelForCausalLM.from_pretrained(str(folder), attn_implementation="eager").eval()


def no_output_left(dst) -> bool:
    return not dst.exists() and not dst.with_name(dst.name + ".part").exists()


# ---- HF → GGUF → HF -------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["llama_gqa", "llama_tied", "llama_bias", "gpt2"])
def test_hf_gguf_hf_round_trip(name, models, hf_dirs, tmp_path):
    ref = hf_logits(models[name], IDS)
    gg, back = tmp_path / "m.gguf", tmp_path / "back"
    convert(hf_dirs[name], gg, progress=False)
    convert(gg, back, progress=False)
    a = minirt.load(str(hf_dirs[name])).logits(IDS)
    np.testing.assert_allclose(a, ref, rtol=0, atol=ATOL)
    np.testing.assert_array_equal(minirt.load(str(gg)).logits(IDS), a)       # same weights, same arithmetic
    np.testing.assert_array_equal(minirt.load(str(back)).logits(IDS), a)
    hf_back = hf_load(back)
    np.testing.assert_array_equal(hf_logits(hf_back, IDS), ref)                  # transformers: bit-identical
    orig, got = sd_numpy(models[name]), sd_numpy(hf_back)
    for k, v in orig.items():
        if k in got:
            np.testing.assert_array_equal(got[k], v, err_msg=k)
    assert json.loads((back / "config.json").read_text())["tie_word_embeddings"] == (name in ("llama_tied", "gpt2"))


def test_gguf_package_reads_names_types_metadata(models, hf_dirs, tmp_path):
    """llama.cpp's tensor names, Q/K rows in adjacent-pair order (convert_hf_to_gguf.py's permute), keys."""
    gg = tmp_path / "m.gguf"
    convert(hf_dirs["llama_bias"], gg, progress=False)
    r = GGUFReader(str(gg))
    names = {t.name: t for t in r.tensors}
    per_layer = ["attn_norm.weight", "attn_q.weight", "attn_k.weight", "attn_v.weight", "attn_output.weight",
                 "attn_q.bias", "attn_k.bias", "attn_v.bias", "attn_output.bias", "ffn_norm.weight",
                 "ffn_gate.weight", "ffn_up.weight", "ffn_down.weight"]
    assert set(names) == {"token_embd.weight", "output_norm.weight", "output.weight"} | {
        f"blk.{i}.{n}" for i in range(LAYERS) for n in per_layer}
    assert all(t.tensor_type.name == "F32" for t in r.tensors)
    sd = sd_numpy(models["llama_bias"])
    for i in range(LAYERS):
        for proj, heads in (("q", HEADS), ("k", KV_HEADS)):
            w = np.asarray(names[f"blk.{i}.attn_{proj}.weight"].data)
            np.testing.assert_array_equal(w, llama_cpp_permute(sd[f"model.layers.{i}.self_attn.{proj}_proj.weight"], heads))
            b = np.asarray(names[f"blk.{i}.attn_{proj}.bias"].data)
            np.testing.assert_array_equal(b, llama_cpp_permute(sd[f"model.layers.{i}.self_attn.{proj}_proj.bias"], heads))
    c = models["llama_bias"].config
    f = lambda k: r.fields[k].contents()  # noqa: E731
    assert f("general.architecture") == "llama" and f("llama.block_count") == LAYERS
    assert f("llama.attention.head_count") == HEADS and f("llama.attention.head_count_kv") == KV_HEADS
    assert f("llama.embedding_length") == c.hidden_size and f("llama.feed_forward_length") == c.intermediate_size
    assert f("llama.context_length") == c.max_position_embeddings and f("general.file_type") == 0
    assert abs(f("llama.rope.freq_base") - 50000.0) < 1e-3 and abs(f("llama.attention.layer_norm_rms_epsilon") - 1e-5) < 1e-9
    assert f("tokenizer.ggml.bos_token_id") == 1 and f("tokenizer.ggml.eos_token_id") == 2

    q8 = tmp_path / "q8.gguf"
    convert(hf_dirs["gpt2"], q8, "Q8_0", progress=False)
    r = GGUFReader(str(q8))
    for t in r.tensors:
        want = "Q8_0" if len(t.shape) == 2 else "F32"
        assert t.tensor_type.name == want, t.name
    assert {"token_embd.weight", "position_embd.weight", "blk.1.attn_qkv.weight", "blk.1.attn_qkv.bias",
            "output_norm.bias"} <= {t.name for t in r.tensors} and "output.weight" not in {t.name for t in r.tensors}
    assert r.fields["general.file_type"].contents() == 7 and r.fields["gpt2.block_count"].contents() == LAYERS
    m, ref = minirt.load(str(q8)), hf_logits(models["gpt2"], IDS)
    got = m.logits(IDS)
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 0.05


@pytest.mark.parametrize("qtype", ["F16", "BF16"])
def test_half_precision_types(qtype, models, hf_dirs, tmp_path):
    """--type F16/BF16 into both targets: values are the float32 ones rounded (as torch rounds them)."""
    dt = torch.float16 if qtype == "F16" else torch.bfloat16
    gg, hf = tmp_path / "h.gguf", tmp_path / "h"
    convert(hf_dirs["llama_gqa"], gg, qtype, progress=False)
    convert(hf_dirs["llama_gqa"], hf, qtype, progress=False)
    assert json.loads((hf / "config.json").read_text())["torch_dtype"] == str(dt).split(".")[1]
    half = hf_load(hf)
    for k, v in models["llama_gqa"].state_dict().items():  # HF: every tensor in the type, as model.half() saves
        assert torch.equal(half.state_dict()[k].float(), v.to(dt).float()), k
    ck = read_checkpoint(gg)  # GGUF: matrices in the type, norms kept in F32 (llama.cpp's rule)
    assert ck.tensors["layers.0.wq"].qtype == qtype and ck.tensors["norm.weight"].qtype == "F32"
    np.testing.assert_array_equal(ck.tensors["norm.weight"].float32(), models["llama_gqa"].model.norm.weight.detach().numpy())
    a, b = minirt.load(str(gg)).logits(IDS), minirt.load(str(hf)).logits(IDS)
    np.testing.assert_allclose(a, b, rtol=0, atol=0.05 if qtype == "BF16" else 0.01)


# ---- GGUF → HF → GGUF -----------------------------------------------------------------------------------
@pytest.mark.parametrize("qtype", [None, "Q8_0"], ids=["F32", "Q8_0"])
def test_gguf_hf_gguf_round_trip(qtype, models, tmp_path):
    """Start from a GGUF written like llama.cpp's converter; the tensors come back byte for byte."""
    src, hf, back = tmp_path / "src.gguf", tmp_path / "hf", tmp_path / "back.gguf"
    write_llama_gguf(src, models["llama_gqa"], None if qtype is None else gguf.GGMLQuantizationType[qtype])
    convert(src, hf, progress=False)
    convert(hf, back, qtype, progress=False)
    a, b = GGUFReader(str(src)), GGUFReader(str(back))
    ta, tb = {t.name: t for t in a.tensors}, {t.name: t for t in b.tensors}
    assert set(ta) == set(tb)
    for n, t in ta.items():
        assert t.tensor_type == tb[n].tensor_type, n
        np.testing.assert_array_equal(np.asarray(tb[n].data), np.asarray(t.data), err_msg=n)
    m = minirt.load(str(src), exact=True).logits(IDS)
    np.testing.assert_array_equal(minirt.load(str(back), exact=True).logits(IDS), m)
    hf_m = minirt.load(str(hf)).logits(IDS)  # F32 (dequantized): same values, BLAS instead of the Q8_0 kernels
    if qtype is None:
        np.testing.assert_array_equal(hf_m, m)
    np.testing.assert_allclose(hf_m, m, rtol=0, atol=ATOL)
    # transformers on the HF folder computes what minirt computes on the GGUF (dequantized weights)
    np.testing.assert_allclose(hf_logits(hf_load(hf), IDS), m, rtol=0, atol=ATOL)


# ---- tokenizer and chat template ------------------------------------------------------------------------
TEXTS = ["Hello world", "The year 2024 had 366 days.", "  spaces   and\ttabs\n\nnewlines",
         "naïve café — 日本語 🙂", "<|im_start|>user\nHi<|im_end|>\n", "x=1234567;y=-0.5"]


@pytest.fixture(scope="module")
def smol_vocab_gguf(smollm2_path, tmp_path_factory):
    """A tiny random Llama carrying SmolLM2's whole tokenizer (49152 tokens, merges, chat template)."""
    root = tmp_path_factory.mktemp("tok")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64, tie_word_embeddings=True)
    LlamaForCausalLM(cfg).save_pretrained(str(root / "tiny"))
    src = read_source(smollm2_path)
    path = root / "tiny-smol.gguf"
    write_gguf(Source(read_checkpoint(root / "tiny"), src.vocab, "tiny-smol", "hf"), path, progress=False)
    return path


def test_tokenizer_round_trip(smol_vocab_gguf, smollm2_path, tmp_path):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    from minirt.tokenizer import build_tokenizer
    src_ck = read_checkpoint(smollm2_path)
    original = build_tokenizer(src_ck.tokenizer, src_ck.config.vocab_size)
    hf, back = tmp_path / "hf", tmp_path / "back.gguf"
    convert(smol_vocab_gguf, hf, progress=False)
    fast = Tokenizer.from_file(str(hf / "tokenizer.json"))
    auto = AutoTokenizer.from_pretrained(str(hf))
    mine = minirt.load(str(hf)).tokenizer
    for text in TEXTS:
        want = original.encode(text)
        assert fast.encode(text).ids == want, text
        assert auto(text)["input_ids"] == want, text
        assert mine.encode(text) == want, text
        assert auto.decode(want) == text
    src_fields = GGUFReader(str(smollm2_path)).fields
    assert auto.chat_template == src_fields["tokenizer.chat_template"].contents()
    assert auto.eos_token == "<|im_end|>" and auto.bos_token == "<|im_start|>"
    chat = auto.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert chat.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")

    convert(hf, back, progress=False)
    got = GGUFReader(str(back)).fields
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
                "tokenizer.ggml.merges", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
                "tokenizer.chat_template"):
        assert got[key].contents() == src_fields[key].contents(), key


def _tiny_llama_folder(path, vocab):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, max_position_embeddings=64, tie_word_embeddings=True, bos_token_id=1,
                      eos_token_id=2)
    LlamaForCausalLM(cfg).save_pretrained(str(path))
    return path


def test_other_hf_tokenizer_files(smol_vocab_gguf, tmp_path):
    """GPT-2 style vocab.json + merges.txt, and a SentencePiece tokenizer.model, reach llama.cpp's keys."""
    import sentencepiece as spm
    from minirt.registry import pull
    src = GGUFReader(str(smol_vocab_gguf)).fields
    tokens, merges = src["tokenizer.ggml.tokens"].contents(), src["tokenizer.ggml.merges"].contents()
    folder = _tiny_llama_folder(tmp_path / "bpe", len(tokens))
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    convert(folder, tmp_path / "bpe.gguf", progress=False)
    got = GGUFReader(str(tmp_path / "bpe.gguf")).fields
    assert got["tokenizer.ggml.model"].contents() == "gpt2" and got["tokenizer.ggml.tokens"].contents() == tokens
    assert got["tokenizer.ggml.merges"].contents() == merges
    assert (got["tokenizer.ggml.bos_token_id"].contents(), got["tokenizer.ggml.eos_token_id"].contents()) == (1, 2)

    model = pull("botchan").parent / "botchan_en_bpe_1000.model"
    sp = spm.SentencePieceProcessor(model_file=str(model))
    folder = _tiny_llama_folder(tmp_path / "spm", sp.get_piece_size())
    (folder / "tokenizer.model").write_bytes(model.read_bytes())
    convert(folder, tmp_path / "spm.gguf", progress=False)
    got = GGUFReader(str(tmp_path / "spm.gguf")).fields
    assert got["tokenizer.ggml.model"].contents() == "llama"
    assert got["tokenizer.ggml.tokens"].contents() == [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    tok = minirt.load(str(tmp_path / "spm.gguf")).tokenizer
    for text in ("Because of an hereditary recklessness, I have been playing always a losing game.",
                 "The janitor of the school had to carry me home on his back."):
        assert tok.encode(text, add_bos=False) == sp.encode(text)


# ---- pytorch_model.bin ----------------------------------------------------------------------------------
def test_pytorch_bin_folder(models, tmp_path):
    folder = tmp_path / "bin"
    m = models["llama_gqa"]
    m.config.save_pretrained(str(folder))
    torch.save(m.state_dict(), str(folder / "pytorch_model.bin"))
    ref = hf_logits(m, IDS)
    np.testing.assert_allclose(minirt.load(str(folder)).logits(IDS), ref, rtol=0, atol=ATOL)
    convert(folder, tmp_path / "bin.gguf", progress=False)
    np.testing.assert_allclose(minirt.load(str(tmp_path / "bin.gguf")).logits(IDS), ref, rtol=0, atol=ATOL)


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _zip_pickle(path, payload: bytes, storages: dict[str, bytes] | None = None):
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", payload)
        for k, v in (storages or {}).items():
            z.writestr(f"archive/data/{k}", v)


def _bin_folder(root, payload, storages=None):
    root.mkdir()
    (root / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8, "intermediate_size": 8,
                                                  "num_hidden_layers": 1, "num_attention_heads": 2, "vocab_size": 8}))
    _zip_pickle(root / "pytorch_model.bin", payload, storages)
    return root


@pytest.mark.parametrize("form", ["zip", "plain pickle", "nested"])
def test_malicious_pickle_refused(form, tmp_path):
    marker = tmp_path / "pwned"
    evil = _Evil(marker)
    payload = pickle.dumps({"w": evil} if form == "nested" else evil, protocol=2)
    folder = tmp_path / "m"
    if form == "plain pickle":
        folder.mkdir()
        (folder / "config.json").write_text("{}")
        (folder / "pytorch_model.bin").write_bytes(payload)
    else:
        _bin_folder(folder, payload)
    dst = tmp_path / "out.gguf"
    with pytest.raises(MinirtError) as e:
        convert(folder, dst, progress=False)
    msg = str(e.value)
    assert "\n" not in msg and ("refused to load posix.system" in msg or "not a zip-format" in msg), msg
    assert not marker.exists() and no_output_left(dst)
    r = subprocess.run([sys.executable, "-m", "minirt", "convert", str(folder), str(dst)], capture_output=True,
                       text=True, stdin=subprocess.DEVNULL) if form == "zip" else None
    if r is not None:
        assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
        assert not marker.exists() and no_output_left(dst)


def _tensor_pickle(size: int) -> bytes:
    """A state dict {"w": tensor of `size` float32 values in storage 0}, pickled opcode by opcode as torch
    does (protocol 2: GLOBAL torch._utils._rebuild_tensor_v2, BINPERSID ('storage', torch.FloatStorage, ...))."""
    s = lambda t: b"X" + struct.pack("<I", len(t)) + t.encode()  # noqa: E731  BINUNICODE
    i = lambda n: b"J" + struct.pack("<i", n)  # noqa: E731  BININT
    pid = b"(" + s("storage") + b"ctorch\nFloatStorage\n" + s("0") + s("cpu") + i(10) + b"t" + b"Q"
    tensor = (b"ctorch._utils\n_rebuild_tensor_v2\n" + b"(" + pid + i(0) + b"(" + i(size) + b"t" + b"(" + i(1)
              + b"t" + b"\x89" + b"ccollections\nOrderedDict\n)R" + b"t" + b"R")
    return b"\x80\x02" + b"ccollections\nOrderedDict\n)R" + b"(" + s("w") + tensor + b"u" + b"."


def test_tensor_bounds_checked(tmp_path):
    from minirt.readers.torchbin import read_torch_bin
    values = np.arange(10, dtype=np.float32)
    _zip_pickle(tmp_path / "ok.bin", _tensor_pickle(10), {"0": values.tobytes()})
    np.testing.assert_array_equal(read_torch_bin(tmp_path / "ok.bin")["w"].float32(), values)  # the crafted form is valid
    _zip_pickle(tmp_path / "big.bin", _tensor_pickle(1000), {"0": values.tobytes()})
    with pytest.raises(MinirtError, match="lies outside its storage"):
        read_torch_bin(tmp_path / "big.bin")
    _zip_pickle(tmp_path / "short.bin", _tensor_pickle(10), {"0": values.tobytes()[:20]})
    with pytest.raises(MinirtError, match="has 20 bytes, not 10"):
        read_torch_bin(tmp_path / "short.bin")


# ---- truncated inputs and CLI errors --------------------------------------------------------------------
def _truncate(path, keep=0.6):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


@pytest.mark.parametrize("what", ["gguf", "safetensors", "pytorch_model.bin", "llama2c"])
def test_truncated_inputs_fail_cleanly(what, models, hf_dirs, tmp_path):
    if what == "gguf":
        src = tmp_path / "t.gguf"
        convert(hf_dirs["llama_gqa"], src, progress=False)
        _truncate(src)
    elif what == "safetensors":
        src = tmp_path / "t"
        models["gpt2"].save_pretrained(str(src))
        _truncate(src / "model.safetensors")
    elif what == "pytorch_model.bin":
        src = tmp_path / "t"
        models["gpt2"].config.save_pretrained(str(src))
        torch.save(models["gpt2"].state_dict(), str(src / "pytorch_model.bin"))
        _truncate(src / "pytorch_model.bin")
    else:
        src = tmp_path / "t.bin"
        write_llama2c(src, llama2c_weights(shared=True), version=1)
        _truncate(src, 0.9)
    for dst in (tmp_path / "out.gguf", tmp_path / "out"):
        with pytest.raises(MinirtError) as e:
            convert(src, dst, progress=False)
        assert "\n" not in str(e.value) and ("truncated" in str(e.value) or "past the end" in str(e.value)), e.value
        assert no_output_left(dst)


def test_cli_errors_are_one_line(hf_dirs, tmp_path):
    def run(*args):
        return subprocess.run([sys.executable, "-m", "minirt", "convert", *map(str, args)], capture_output=True,
                              text=True, stdin=subprocess.DEVNULL)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    for args, needle in [((tmp_path / "nope", tmp_path / "a.gguf"), "does not exist"),
                         ((hf_dirs["gpt2"], tmp_path / "b", "--type", "Q8_0"), "F32, F16 or BF16"),
                         ((hf_dirs["gpt2"], tmp_path / "c.safetensors"), "give a .gguf file or a folder"),
                         ((hf_dirs["gpt2"], tmp_path / "full"), "not an empty folder"),
                         ((hf_dirs["gpt2"], tmp_path / "d.gguf", "--type", "Q5_K"), "invalid choice")]:
        r = run(*args)
        assert r.returncode != 0 and "Traceback" not in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and needle in r.stderr, r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full"]
    r = run(hf_dirs["gpt2"], tmp_path / "ok.gguf", "--type", "F16")
    assert r.returncode == 0 and r.stdout.strip() == str(tmp_path / "ok.gguf"), r.stderr


# ---- llama2.c -------------------------------------------------------------------------------------------
L2_DIM, L2_HIDDEN, L2_LAYERS, L2_HEADS, L2_KV, L2_VOCAB, L2_SEQ = 64, 96, 2, 4, 2, 256, 32


def llama2c_weights(shared: bool, seed: int = 0, vocab: int = L2_VOCAB) -> dict[str, np.ndarray]:
    """Random weights in llama2.c's layout (matrices (out, in), Q/K rows in adjacent-pair RoPE order)."""
    g = np.random.default_rng(seed)
    d, h, L, kv = L2_DIM, L2_HIDDEN, L2_LAYERS, L2_KV * (L2_DIM // L2_HEADS)
    n = lambda *s, fan: (g.standard_normal(s) * fan ** -0.5).astype(np.float32)  # noqa: E731
    w = {"emb": (g.standard_normal((vocab, d)) * 0.5).astype(np.float32),
         "att_norm": (1 + 0.2 * g.standard_normal((L, d))).astype(np.float32),
         "ffn_norm": (1 + 0.2 * g.standard_normal((L, d))).astype(np.float32),
         "wq": n(L, d, d, fan=d), "wk": n(L, kv, d, fan=d), "wv": n(L, kv, d, fan=d), "wo": n(L, d, d, fan=d),
         "w1": n(L, h, d, fan=d), "w2": n(L, d, h, fan=h), "w3": n(L, h, d, fan=d),
         "norm": (1 + 0.2 * g.standard_normal(d)).astype(np.float32)}
    w["wcls"] = w["emb"] if shared else n(vocab, d, fan=d)
    return w


def quantize_q80(w: np.ndarray, group: int):
    """export.py's quantize_q80: symmetric int8 per group of `group` values, float32 scales."""
    x = w.reshape(-1, group).astype(np.float32)
    scale = np.abs(x).max(axis=1) / np.float32(127.0)
    q = np.round(x / scale[:, None]).astype(np.int8)
    return q, scale.astype(np.float32)


def write_llama2c(path, w: dict, version: int, group: int = 64) -> dict:
    """Write a checkpoint as llama2.c's export.py does; returns the weights as a reader should see them
    (for v2: dequantized)."""
    shared, vocab = w["wcls"] is w["emb"], w["emb"].shape[0]
    params = struct.pack("<7i", L2_DIM, L2_HIDDEN, L2_LAYERS, L2_HEADS, L2_KV,
                         vocab if (shared or version > 0) else -vocab, L2_SEQ)
    mats = ["emb", "wq", "wk", "wv", "wo", "w1", "w2", "w3"] + ([] if shared else ["wcls"])
    out = dict(w)
    with open(path, "wb") as f:
        if version == 0:
            f.write(params)
            hs = L2_DIM // L2_HEADS
            freqs = 1.0 / 10000.0 ** (np.arange(0, hs, 2)[: hs // 2] / hs)
            ang = np.outer(np.arange(L2_SEQ), freqs)
            for k in ["emb", "att_norm", "wq", "wk", "wv", "wo", "ffn_norm", "w1", "w2", "w3", "norm"]:
                f.write(w[k].astype("<f4").tobytes())
            f.write(np.cos(ang).astype("<f4").tobytes() + np.sin(ang).astype("<f4").tobytes())
            if not shared:
                f.write(w["wcls"].astype("<f4").tobytes())
            return out
        head = struct.pack("<Ii", 0x616B3432, version) + params + struct.pack("<B", shared)
        if version == 2:
            head += struct.pack("<i", group)
        f.write(head + b"\0" * (256 - len(head)))
        if version == 1:
            for k in ["att_norm", "ffn_norm", "norm"] + mats:
                f.write(w[k].astype("<f4").tobytes())
            return out
        for k in ["att_norm", "ffn_norm", "norm"]:
            f.write(w[k].astype("<f4").tobytes())
        scales = []
        for k in mats:
            layers = w[k] if w[k].ndim == 3 else w[k][None]
            qs = [quantize_q80(x, group) for x in layers]  # export.py quantizes each layer's matrix on its own
            f.write(b"".join(q.tobytes() for q, _ in qs))
            scales.append(b"".join(s.astype("<f4").tobytes() for _, s in qs))
            deq = np.stack([(q.astype(np.float32) * s[:, None]).reshape(x.shape) for (q, s), x in zip(qs, layers)])
            out[k] = deq if w[k].ndim == 3 else deq[0]
        f.write(b"".join(scales))
    if shared:
        out["wcls"] = out["emb"]
    return out


def llama2c_forward(w: dict, tokens) -> np.ndarray:
    """run.c's forward pass in float64 numpy: RMSNorm (ε 1e-5), RoPE on adjacent pairs (θ 10000, per head),
    GQA attention, SwiGLU FFN, classifier. Returns the logits of every position."""
    w = {k: v.astype(np.float64) for k, v in w.items()}
    hs = L2_DIM // L2_HEADS
    T = len(tokens)
    x = w["emb"][tokens]

    def rms(v, g):
        return v / np.sqrt((v * v).mean(-1, keepdims=True) + 1e-5) * g

    def rope(v):  # v: (T, heads, hs); pairs (2i, 2i+1) rotated by pos * 10000^(-2i/hs)
        freq = 1.0 / 10000.0 ** (np.arange(0, hs, 2) / hs)
        ang = np.arange(T)[:, None] * freq[None]
        c, s = np.cos(ang)[:, None], np.sin(ang)[:, None]
        a, b = v[..., 0::2], v[..., 1::2]
        out = np.empty_like(v)
        out[..., 0::2], out[..., 1::2] = a * c - b * s, a * s + b * c
        return out

    for li in range(L2_LAYERS):
        h = rms(x, w["att_norm"][li])
        q = rope((h @ w["wq"][li].T).reshape(T, L2_HEADS, hs))
        k = rope((h @ w["wk"][li].T).reshape(T, L2_KV, hs))
        v = (h @ w["wv"][li].T).reshape(T, L2_KV, hs)
        att = np.empty((T, L2_HEADS, hs))
        for hh in range(L2_HEADS):
            kv = hh // (L2_HEADS // L2_KV)
            sc = q[:, hh] @ k[:, kv].T / np.sqrt(hs)
            sc = np.where(np.tril(np.ones((T, T), bool)), sc, -np.inf)
            p = np.exp(sc - sc.max(-1, keepdims=True))
            att[:, hh] = (p / p.sum(-1, keepdims=True)) @ v[:, kv]
        x = x + att.reshape(T, -1) @ w["wo"][li].T
        h = rms(x, w["ffn_norm"][li])
        a = h @ w["w1"][li].T
        x = x + ((a / (1 + np.exp(-a))) * (h @ w["w3"][li].T)) @ w["w2"][li].T
    return rms(x, w["norm"]) @ w["wcls"].T


def write_tokenizer_bin(path, pieces: list[str], scores: list[float]) -> None:
    """llama2.c's tokenizer.py export: ▁ → space, BOS/EOS as \\n<s>\\n and \\n</s>\\n."""
    data = []
    for i, (p, s) in enumerate(zip(pieces, scores)):
        t = "\n<s>\n" if i == 1 else "\n</s>\n" if i == 2 else p
        data.append((t.replace("\u2581", " ").encode(), s))
    with open(path, "wb") as f:
        f.write(struct.pack("<I", max(len(b) for b, _ in data)))
        for b, s in data:
            f.write(struct.pack("<fI", s, len(b)) + b)


L2_IDS = [(13 * i + 5) % L2_VOCAB for i in range(16)]


@pytest.mark.parametrize("version,shared", [(0, True), (0, False), (1, False), (2, True), (2, False)],
                         ids=["legacy-shared", "legacy", "v1", "v2-shared", "v2"])
def test_llama2c_to_gguf_and_hf(version, shared, tmp_path):
    ckpt = tmp_path / "model.bin"
    w = write_llama2c(ckpt, llama2c_weights(shared, seed=version), version)
    ref = llama2c_forward(w, L2_IDS)
    gg, hf = tmp_path / "m.gguf", tmp_path / "hf"
    convert(ckpt, gg, progress=False)
    convert(ckpt, hf, progress=False)
    for path in (gg, hf):
        got = minirt.load(str(path)).logits(L2_IDS)
        np.testing.assert_allclose(got, ref, rtol=0, atol=1e-4 * np.abs(ref).max())
    np.testing.assert_allclose(hf_logits(hf_load(hf), L2_IDS), ref, rtol=0, atol=1e-4 * np.abs(ref).max())
    r = GGUFReader(str(gg))
    names = {t.name: t for t in r.tensors}
    assert ("output.weight" in names) == (not shared)
    # llama2.c's Q rows are already in llama.cpp's adjacent-pair order: written as they are
    np.testing.assert_array_equal(np.asarray(names["blk.1.attn_q.weight"].data), w["wq"][1])
    np.testing.assert_array_equal(np.asarray(names["blk.0.attn_k.weight"].data), w["wk"][0])
    assert r.fields["llama.context_length"].contents() == L2_SEQ
    assert r.fields["llama.attention.head_count_kv"].contents() == L2_KV


@pytest.mark.parametrize("version", [0, 1, 2])
def test_llama2c_one_layer(version, tmp_path, monkeypatch):
    """With one layer the per-layer arrays still carry their layer axis (a single-layer file converts)."""
    monkeypatch.setattr(sys.modules[__name__], "L2_LAYERS", 1)
    ckpt = tmp_path / "model.bin"
    w = write_llama2c(ckpt, llama2c_weights(True, seed=7), version)
    assert w["wq"].shape[0] == 1
    ref = llama2c_forward(w, L2_IDS)
    for out in (tmp_path / "m.gguf", tmp_path / "hf"):
        convert(ckpt, out, progress=False)
        got = minirt.load(str(out)).logits(L2_IDS)
        np.testing.assert_allclose(got, ref, rtol=0, atol=1e-4 * np.abs(ref).max())


def test_llama2c_tokenizer_bin(tmp_path):
    """A tokenizer.bin exported from a real SentencePiece model (botchan's) lands in llama.cpp's keys."""
    import sentencepiece as spm
    from minirt.registry import pull
    sp = spm.SentencePieceProcessor(model_file=str(pull("botchan").parent / "botchan_en_bpe_1000.model"))
    n = sp.get_piece_size()
    pieces, scores = [sp.id_to_piece(i) for i in range(n)], [sp.get_score(i) for i in range(n)]
    ckpt = tmp_path / "model.bin"
    write_llama2c(ckpt, llama2c_weights(True, vocab=n), 1)
    write_tokenizer_bin(tmp_path / "tokenizer.bin", pieces, scores)
    gg = tmp_path / "m.gguf"
    convert(ckpt, gg, progress=False)
    f = GGUFReader(str(gg)).fields
    tokens = f["tokenizer.ggml.tokens"].contents()
    assert f["tokenizer.ggml.model"].contents() == "llama" and len(tokens) == n
    assert tokens[:3] == ["<unk>", "<s>", "</s>"] and tokens[3:] == pieces[3:]
    np.testing.assert_allclose(f["tokenizer.ggml.scores"].contents(), scores, rtol=1e-6)
    types = f["tokenizer.ggml.token_type"].contents()
    assert types[:3] == [2, 3, 3]
    assert all(t == (6 if sp.is_byte(i) else 1) for i, t in enumerate(types) if i >= 3)
    assert (f["tokenizer.ggml.bos_token_id"].contents(), f["tokenizer.ggml.eos_token_id"].contents()) == (1, 2)
    # minirt runs the GGUF's SentencePiece vocabulary (a tokenizer.model built from pieces, scores, types), and
    # the HF folder gets that tokenizer.model: both encode botchan's lines as the original model does
    hf, back = tmp_path / "hf", tmp_path / "back.gguf"
    convert(gg, hf, progress=False)
    convert(hf, back, progress=False)
    lines = [" ".join(ln.split()) for ln in pull("botchan").read_text(encoding="utf-8-sig").splitlines()[:400]]
    lines = [ln for ln in lines if ln]
    tok_gguf, tok_hf = minirt.load(str(gg)).tokenizer, minirt.load(str(hf)).tokenizer
    from_file = spm.SentencePieceProcessor(model_file=str(hf / "tokenizer.model"))
    assert tok_gguf.bos_id == 1 and tok_gguf.eos_id == 2 and tok_gguf.add_bos
    for ln in lines:
        want = sp.encode(ln)
        assert tok_gguf.encode(ln, add_bos=False) == want and tok_hf.encode(ln, add_bos=False) == want, ln
        assert from_file.encode(ln) == want and tok_gguf.decode(want) == sp.decode(want)
    b = GGUFReader(str(back)).fields
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type",
                "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id"):
        assert b[key].contents() == f[key].contents(), key

    _truncate(tmp_path / "tokenizer.bin", 0.5)
    with pytest.raises(MinirtError, match="truncated"):
        convert(ckpt, tmp_path / "t.gguf", progress=False)
    assert no_output_left(tmp_path / "t.gguf")


# ---- low-rank exports -----------------------------------------------------------------------------------
def test_lowrank_export_to_gguf(models, tmp_path):
    """minirt svd's folder (model.gguf + lowrank.json) → one GGUF that minirt loads with the same factors."""
    from minirt.modes.lowrank import export, with_lowrank
    src = tmp_path / "src.gguf"
    write_llama_gguf(src, models["llama_gqa"])
    m = with_lowrank(minirt.load(str(src)), rank=8, progress=False)
    folder = export(m, tmp_path / "lr", progress=False)
    out = tmp_path / "lr.gguf"
    convert(folder, out, progress=False)
    got = minirt.load(str(out))
    assert [f.rank for f in got.lowrank] == [f.rank for f in m.lowrank] and any(f.rank == 8 for f in got.lowrank)
    np.testing.assert_array_equal(got.logits(IDS), minirt.load(str(folder)).logits(IDS))
    np.testing.assert_allclose(got.logits(IDS), m.logits(IDS), rtol=0, atol=1e-5)
    r = GGUFReader(str(out))
    assert "blk.0.qkv.lr_u" in {t.name for t in r.tensors} and "minirt.lowrank.manifest" in r.fields

    for bad, needle in [("manifest", "describe different factors"), ("truncate", "truncated")]:
        broken = tmp_path / f"broken-{bad}"
        broken.mkdir()
        (broken / "model.gguf").write_bytes((folder / "model.gguf").read_bytes())
        info = json.loads((folder / "lowrank.json").read_text())
        if bad == "manifest":
            info["matrices"][0]["rank"] += 1
        else:
            _truncate(broken / "model.gguf", 0.8)
        (broken / "lowrank.json").write_text(json.dumps(info))
        dst = tmp_path / f"{bad}.gguf"
        with pytest.raises(MinirtError, match=needle):
            convert(broken, dst, progress=False)
        assert no_output_left(dst)
    with pytest.raises(MinirtError, match="only to GGUF"):
        convert(folder, tmp_path / "hf-out", progress=False)


# ---- a real model (slow: writes 540 MB) -----------------------------------------------------------------
@pytest.mark.slow
def test_smollm2_to_hf_runs_in_transformers(smollm2_path, smollm2, tmp_path):
    """SmolLM2 (Q4_1 GGUF) → HF folder (F32, dequantized) → transformers: same tokens, logits within 1e-3
    of minirt on the GGUF (measured 7e-5 at logits up to 31), same greedy continuation; → GGUF F32 again:
    minirt's logits identical to the HF folder's."""
    from transformers import AutoTokenizer
    hf, back = tmp_path / "hf", tmp_path / "f32.gguf"
    convert(smollm2_path, hf, progress=False)
    convert(hf, back, progress=False)
    text = "The capital of France is Paris, and the capital of Japan is"
    tok = AutoTokenizer.from_pretrained(str(hf))
    ids = tok(text)["input_ids"]
    assert ids == smollm2.tokenizer.encode(text)
    model = hf_load(hf)
    ref = hf_logits(model, ids)
    np.testing.assert_allclose(smollm2.logits(ids), ref, rtol=0, atol=1e-3)
    np.testing.assert_array_equal(minirt.load(str(back)).logits(ids), minirt.load(str(hf)).logits(ids))
    out = model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)[0][len(ids):]
    assert tok.decode(out) == "".join(smollm2.generate(text, max_tokens=8, temperature=0))


def test_partial_byte_pieces_stay_loadable():
    """A SentencePiece vocabulary with some but not all 256 <0xNN> pieces (llama2.c tokenizers can have that)
    still builds a model sentencepiece loads: byte fallback needs all 256, so a partial set stays plain."""
    import sentencepiece as spm

    from minirt.readers.spm import model_proto
    toks = ["<unk>", "<s>", "</s>", "<0x41>", "▁a", "▁b", "a", "b"]
    sp = spm.SentencePieceProcessor(model_proto=model_proto(toks, [0.0] * 8, [2, 3, 3, 6, 1, 1, 1, 1]))
    assert sp.encode("a b") == [4, 5]
