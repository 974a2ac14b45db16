"""Gemma 3 270M (Q4_K_M, google's weights; the registry's gemma3-270m): the architecture's entry in the traits
(q/k norms, post norms, GeGLU, √dim embeddings, sliding-window layers with their own RoPE base), its 262k-piece
SentencePiece vocabulary and its chat template, against Hugging Face transformers.

References: transformers 5.24 loading this GGUF greedy-decodes "Once upon a time" to the text below (the
issue's measurement); tests/fixtures/gemma3_hf_token_ids.json holds transformers' token ids for the same
file on texts with digits, unicode, code, whitespace runs and chat markers (made with
AutoTokenizer.from_pretrained(folder, gguf_file=...).encode(text, add_special_tokens=False))."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

import minirt
from minirt.registry import pull

HF_GREEDY = (", there was a little girl named Lily. She was a very smart girl, and she loved to play with her "
             "friends")


@pytest.fixture(scope="module")
def gemma():
    # exact: float32 activations in the quantized kernels (the issue's `--exact`). The default int8 activations
    # (llama.cpp's arithmetic) move logits by up to ~3% of the largest here, and after "Once upon a time, there
    # was a" the top three tokens lie within 0.07 of each other, so greedy text is compared on the exact path;
    # tests/test_kquants.py bounds the int8 path against it.
    return minirt.load(pull("gemma3-270m"), exact=True)


def test_greedy_text_equals_transformers(gemma):
    out = gemma.generate("Once upon a time", max_tokens=24, temperature=0).text()
    assert out == HF_GREEDY


def test_tokenizer_ids_equal_transformers(gemma):
    want = json.loads((Path(__file__).parent / "fixtures" / "gemma3_hf_token_ids.json").read_text())
    for text, ids in want.items():
        assert gemma.tokenizer.encode(text, add_bos=False) == ids, text
    assert gemma.tokenizer.encode("Hi")[0] == gemma.tokenizer.bos_id == 2


def test_config_from_the_file(gemma):
    c = gemma.cfg
    assert (c.arch, c.n_layers, c.head_dim, c.sliding_window) == ("gemma3", 18, 256, 512)
    windows = [c.layer_window(i) for i in range(c.n_layers)]
    assert windows == [0 if (i + 1) % 6 == 0 else 512 for i in range(18)]  # every sixth layer global
    assert {c.layer_theta(i) for i in range(18)} == {10000.0, 1e6}


def test_chat_uses_gemmas_template(gemma):
    text = gemma.tokenizer.chat_prompt("Hello!", "Be brief.")
    assert text == "<bos><start_of_turn>user\nBe brief.\n\nHello!<end_of_turn>\n<start_of_turn>model\n"
    from minirt.chat import encode_rendered
    ids = encode_rendered(gemma.tokenizer, text)
    assert ids.count(2) == 1 and 105 in ids and 106 in ids  # one BOS; the turn markers as single tokens
    reply = minirt.Chat(gemma, temperature=0, max_tokens=12)
    assert "".join(reply.send("What is the capital of France?")).strip()


@pytest.mark.slow
def test_perplexity_equals_llama_cpp(gemma, botchan_text):
    """llama-perplexity -m gemma-3-270m-q4_k_m.gguf -f botchan.txt -c 512 --chunks 20 → 21.9579 ± 0.92497
    (the issue's measurement; llama.cpp adds BOS to each window for this model, and so does minirt)."""
    from minirt.perplexity import perplexity
    r = perplexity(gemma, botchan_text, ctx=512, chunks=20, progress=False)
    assert abs(r.ppl / 21.9579 - 1) < 0.005, r.ppl
