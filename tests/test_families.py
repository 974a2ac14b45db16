"""The LLaMA-like families against Hugging Face transformers (float32): Llama with RoPE scaling (llama3, linear),
Qwen2 (q/k/v biases), Qwen3 (q/k norms, explicit head_dim), Mistral (sliding window), Phi-3 (fused qkv and
gate_up) and Gemma 3 (its norms, GeGLU, √dim embeddings, sliding-window layers with their own RoPE base).

For each, transformers builds a small random model of the family and saves it as a safetensors folder; then
  1. minirt reads the folder: logits equal transformers' within ATOL;
  2. `minirt convert` writes a GGUF from the folder; minirt reads it: the same logits;
  3. transformers' own GGUF loader reads that GGUF (where it carries the family's options; see READBACK):
     the same logits, so a converter and a reader that agree with each other but not with llama.cpp's
     names, keys or row order cannot pass;
  4. `minirt convert` writes the GGUF back to a Hugging Face folder, which transformers loads: the same logits;
  5. greedy decoding through minirt's KV cache picks transformers' tokens for GREEDY steps wherever
     transformers' top-2 gap exceeds 1e-3.
Sequences are longer than every sliding window here, so windows are exercised.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("gguf")
pytest.importorskip("accelerate")  # transformers reads GGUF only with it

import minirt  # noqa: E402
from minirt.convert import convert  # noqa: E402
from tests.test_parity import _randomize  # noqa: E402

VOCAB, DIM, HIDDEN, LAYERS, HEADS, KV_HEADS, CTX = 256, 64, 96, 2, 4, 2, 128
SEQ, GREEDY, WINDOW = 24, 32, 8
ATOL = 1e-4


def _model(name: str):
    T = transformers
    common = dict(vocab_size=VOCAB, hidden_size=DIM, intermediate_size=HIDDEN, num_hidden_layers=LAYERS,
                  num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=CTX,
                  rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if name == "llama3":  # llama3 RoPE scaling over a short original context, so it bends these positions
        cfg, cls = T.LlamaConfig(**common, tie_word_embeddings=False, rope_parameters=dict(
            rope_type="llama3", rope_theta=10000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=8.0,
            original_max_position_embeddings=64)), T.LlamaForCausalLM
    elif name == "llama_linear":
        cfg, cls = T.LlamaConfig(**common, tie_word_embeddings=True, rope_parameters=dict(
            rope_type="linear", rope_theta=50000.0, factor=4.0)), T.LlamaForCausalLM
    elif name == "qwen2":
        cfg, cls = T.Qwen2Config(**common, tie_word_embeddings=True, rope_theta=1e6), T.Qwen2ForCausalLM
    elif name == "qwen3":  # head_dim 128 ≠ 64/4 (128: transformers' GGUF loader assumes Qwen3's usual head_dim)
        cfg, cls = T.Qwen3Config(**common, head_dim=128, tie_word_embeddings=False), T.Qwen3ForCausalLM
    elif name == "mistral":
        cfg, cls = T.MistralConfig(**common, sliding_window=WINDOW, tie_word_embeddings=False,
                                   rope_theta=1e6), T.MistralForCausalLM  # sliding layers keep the file's base
    elif name == "phi3":
        cfg, cls = T.Phi3Config(**common, tie_word_embeddings=False), T.Phi3ForCausalLM
    elif name == "gemma3":  # 6 layers: five sliding, the sixth global; head_dim = query_pre_attn_scalar = 256,
        # as llama.cpp (and so transformers' GGUF loader) assume for every Gemma 3 but the 27B
        cfg, cls = T.Gemma3TextConfig(**{**common, "num_hidden_layers": 6}, head_dim=256,
                                      query_pre_attn_scalar=256, sliding_window=WINDOW,
                                      tie_word_embeddings=True), T.Gemma3ForCausalLM
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    model = cls(cfg).eval()
    _randomize(model, 7)
    return model


FAMILIES = ["llama3", "llama_linear", "qwen2", "qwen3", "mistral", "phi3", "gemma3"]
# transformers' GGUF loader drops what its key table lacks: RoPE scaling of llama (rope.scaling.*, rope_freqs)
# and Mistral's sliding window; those GGUFs are checked by minirt and by the HF folder written back from them
READBACK = {"qwen2", "qwen3", "phi3", "gemma3"}


def hf_logits(model, ids) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([list(ids)])).logits[0].float().numpy()


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, tmp_path_factory):
    name = request.param
    root = tmp_path_factory.mktemp(name)
    model = _model(name)
    model.save_pretrained(str(root / "hf"), safe_serialization=True)
    convert(root / "hf", root / f"{name}.gguf", progress=False)
    ids = torch.randint(3, VOCAB, (SEQ,), generator=torch.Generator().manual_seed(5)).tolist()
    return name, model, root, ids, hf_logits(model, ids)


def _close(got, want, what):
    err = float(np.abs(got - want).max())
    assert err < ATOL, f"{what}: max |Δlogit| {err:.2e} (logits up to {np.abs(want).max():.2f})"


def test_logits_from_safetensors(family):
    name, _, root, ids, want = family
    m = minirt.load(str(root / "hf"))
    assert m.cfg.arch == {"llama3": "llama", "llama_linear": "llama", "mistral": "llama"}.get(name, name)
    _close(m.logits(ids), want, f"{name} safetensors")


def test_logits_from_converted_gguf(family):
    name, _, root, ids, want = family
    _close(minirt.load(str(root / f"{name}.gguf")).logits(ids), want, f"{name} GGUF")


def test_transformers_reads_our_gguf(family):
    name, _, root, ids, want = family
    if name not in READBACK:
        pytest.skip(f"transformers' GGUF loader does not carry {name}'s options")
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(root), gguf_file=f"{name}.gguf",
                                                            dtype=torch.float32).eval()
    _close(hf_logits(ref, ids), want, f"{name}: transformers reading minirt's GGUF")


def test_gguf_back_to_hf_folder(family):
    name, _, root, ids, want = family
    convert(root / f"{name}.gguf", root / "back", progress=False)
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(root / "back"), dtype=torch.float32).eval()
    _close(hf_logits(ref, ids), want, f"{name}: transformers reading the folder minirt wrote from its GGUF")


def test_greedy_through_the_cache(family):
    """GREEDY steps, one token at a time through minirt's KV cache, fed transformers' greedy tokens."""
    name, model, root, ids, _ = family
    seq, gaps = list(ids[:4]), []
    with torch.no_grad():
        for _ in range(GREEDY):
            row = model(torch.tensor([seq])).logits[0, -1].numpy()
            top2 = np.sort(row)[-2:]
            gaps.append(top2[1] - top2[0])
            seq.append(int(row.argmax()))
    m = minirt.load(str(root / f"{name}.gguf"))
    cache = m.new_cache()
    row = m.forward(seq[:4], cache)[-1]
    compared = 0
    for k in range(GREEDY):
        if gaps[k] > 1e-3:
            assert int(row.argmax()) == seq[4 + k], f"{name}: step {k} picks {row.argmax()}, transformers {seq[4 + k]}"
            compared += 1
        row = m.forward([seq[4 + k]], cache)[-1]
    assert compared >= GREEDY - 4


@pytest.mark.parametrize("change, words", [
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}}, "'yarn'"),
    ({"rope_scaling": {"rope_type": "longrope", "short_factor": [1.0], "long_factor": [1.0]}}, "'longrope'"),
    ({"model_type": "qwen2", "use_sliding_window": True}, "use_sliding_window"),
    ({"model_type": "gemma3_text", "final_logit_softcapping": 30.0}, "final_logit_softcapping"),
    ({"model_type": "phi3", "partial_rotary_factor": 0.5}, "partial_rotary_factor"),
    ({"model_type": "gemma3"}, "Gemma3ForConditionalGeneration"),
])
def test_unsupported_options_refused_in_one_line(tmp_path, change, words):
    import json
    model = _model("llama3")
    model.save_pretrained(str(tmp_path), safe_serialization=True)
    hc = json.loads((tmp_path / "config.json").read_text())
    hc.pop("rope_parameters", None)
    hc.update(change)
    (tmp_path / "config.json").write_text(json.dumps(hc))
    with pytest.raises(minirt.MinirtError) as e:
        minirt.load(str(tmp_path))
    assert words in str(e.value) and "\n" not in str(e.value)


def test_gguf_rope_scaling_other_than_linear_refused():
    from minirt.readers.gguf import _family_options
    with pytest.raises(minirt.MinirtError, match="'yarn' is not supported"):
        _family_options("llama", {"llama.rope.scaling.type": "yarn"}, "x.gguf", 64, 4, 16, 2, {}, [])
    with pytest.raises(minirt.MinirtError, match="longrope"):
        _family_options("phi3", {}, "x.gguf", 64, 4, 16, 2, {}, ["rope_factors_long.weight"])


LLAMA_SIMPLE = Path.home() / ".cache/minirt-anchors/llama.cpp-0.3.36/build/bin/llama-simple"


@pytest.mark.slow
@pytest.mark.parametrize("name", [f for f in FAMILIES if f != "mistral"])  # llama.cpp's llama ignores windows
def test_llama_cpp_reads_our_gguf(name, tmp_path):
    """llama.cpp itself (the anchor build's llama-simple, greedy) continues a prompt as minirt does from the GGUF
    `minirt convert` writes; a 256-piece byte vocabulary is added so that llama.cpp can load it (bytes = ids).
    Among a few prompts, the one whose 16 greedy steps have the widest top-2 gaps is compared."""
    import subprocess
    from minirt.convert import read_source, write_gguf
    if not LLAMA_SIMPLE.is_file():
        pytest.skip(f"no llama.cpp build at {LLAMA_SIMPLE}")
    _model(name).save_pretrained(str(tmp_path / "hf"), safe_serialization=True)
    src = read_source(tmp_path / "hf")
    bs = [*range(33, 127), *range(161, 173), *range(174, 256)]
    pieces = dict(zip(bs, map(chr, bs))) | {b: chr(256 + n) for n, b in enumerate(b for b in range(256) if b not in bs)}
    src.vocab = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "default",
                 "tokenizer.ggml.tokens": [pieces[i] for i in range(256)], "tokenizer.ggml.token_type": [1] * 256,
                 "tokenizer.ggml.merges": ["Ġ Ġ"], "tokenizer.ggml.add_bos_token": False}
    gg = write_gguf(src, tmp_path / "m.gguf", progress=False)
    m = minirt.load(str(gg))

    def greedy(ids, n=16):
        cache, out, gaps = m.new_cache(64), [], []
        row = m.forward(ids, cache)[-1]
        for _ in range(n):
            top2 = np.sort(row)[-2:]
            out.append(int(row.argmax()))
            gaps.append(top2[1] - top2[0])
            row = m.forward([out[-1]], cache)[-1]
        return out, min(gaps)
    prompt = max([b"Hello, w", b"abcdefgh", b"The cat ", b"xyzzy 12", b"QWERTY!?", b"~~pi=3.1"],
                 key=lambda p: greedy(list(p))[1])
    mine, gap = greedy(list(prompt))
    assert gap > 1e-2
    r = subprocess.run([str(LLAMA_SIMPLE), "-m", str(gg), "-n", "16", "-ngl", "0", prompt.decode()],
                       capture_output=True, timeout=120)
    assert r.returncode == 0, r.stderr.decode(errors="replace")[-400:]
    got = list(r.stdout[len(prompt):-1])  # llama-simple ends with a newline; it stops early at its EOS (11 here)
    assert len(got) >= 8 and got == mine[:len(got)]
