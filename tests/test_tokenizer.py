"""Tokenizers against independent references: known GPT-2 ids, the `tokenizers` library on SmolLM2's
vocabulary, llama.cpp's token count for botchan.txt, and the sentencepiece library."""
from __future__ import annotations

import json

import pytest

from minirt.readers.base import TokenizerSpec
from minirt.tokenizer import Detokenizer, build_tokenizer, byte_decoder

TEXTS = [
    "Hello world",
    "Numbers: 1234567, 3.14159, -42 and 2024-11-21.",
    "x  1  22\n\n 333\t\t4   5",
    "naïve café, 東京タワー, Ünïcödé ẞ, emoji 🤖👍🏽, Ελληνικά, русский",
    "Whitespace   runs\r\n\r\n  and\ttabs\t\t\n   \n",
    "it's I'll we're they've 'quoted' don't",
    "def f(x):\n    return x**2  # comment\n",
    "<|im_start|>user\nhi<|im_end|>\n",
]


@pytest.fixture(scope="module")
def gpt2_tok(gpt2_tiktoken):
    return build_tokenizer(TokenizerSpec("bpe", tiktoken_file=gpt2_tiktoken, special={"<|endoftext|>": 50256}), 50257)


def test_gpt2_known_ids(gpt2_tok):
    assert gpt2_tok.encode("Hello world") == [15496, 995]
    assert gpt2_tok.encode(" Hello world!") == [18435, 995, 0]
    assert gpt2_tok.encode("<|endoftext|>") == [50256]


@pytest.mark.parametrize("text", TEXTS)
def test_gpt2_round_trip(gpt2_tok, text):
    assert gpt2_tok.decode(gpt2_tok.encode(text)) == text


def test_gpt2_vocab_json_equals_tiktoken_file(gpt2_tok, tmp_path):
    """vocab.json + merges.txt (Hugging Face's files, rebuilt from the ranks) give the ids of gpt2.tiktoken,
    through minirt's HF-folder path and through the `tokenizers` library."""
    dec = {b: c for c, b in byte_decoder().items()}
    tokens = ["".join(dec[b] for b in gpt2_tok.token_bytes(i)) for i in range(50256)]
    from tokenizers import Tokenizer
    from tokenizers.models import BPE
    # merges: every token of ≥ 2 bytes, split where the HF BPE trainer would — recover them with tokenizers itself
    vocab = {t: i for i, t in enumerate(tokens)}
    vocab["<|endoftext|>"] = 50256
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    ranks = {gpt2_tok.token_bytes(i): i for i in range(50256)}

    def split(b: bytes, rank: int) -> list[bytes]:  # BPE over b with merges of lower rank only
        parts = [bytes([c]) for c in b]
        while True:
            pairs = [(ranks.get(parts[i] + parts[i + 1], rank), i) for i in range(len(parts) - 1)]
            r, i = min(pairs)
            if r >= rank:
                return parts
            parts[i:i + 2] = [parts[i] + parts[i + 1]]

    merges = []
    for i in range(256, 50256):
        a, b = split(gpt2_tok.token_bytes(i), i)  # the merge that made token i
        merges.append(f"{''.join(dec[x] for x in a)} {''.join(dec[x] for x in b)}")
    (tmp_path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    from minirt.readers.hf import _tokenizer
    from minirt.config import ModelConfig
    cfg = ModelConfig("gpt2", 50257, 8, 1, 1, 1, 8, 8, 8, 1e-5)
    tok = build_tokenizer(_tokenizer(tmp_path, {"eos_token_id": 50256}, cfg), 50257)
    hf = Tokenizer(BPE.from_file(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt")))
    from tokenizers import pre_tokenizers
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    for text in TEXTS[:-1]:
        assert tok.encode(text) == gpt2_tok.encode(text) == hf.encode(text).ids


@pytest.fixture(scope="module")
def smol_tok(smollm2_path):
    from minirt.readers import read_checkpoint
    ck = read_checkpoint(smollm2_path)
    return ck.tokenizer, build_tokenizer(ck.tokenizer, ck.config.vocab_size)


@pytest.fixture(scope="module")
def hf_smol(smol_tok):
    """The `tokenizers` library built from the same vocabulary, with SmolLM2's pre-tokenizer
    (Digits(individual_digits) then ByteLevel, as in its tokenizer.json)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    spec, _ = smol_tok
    vocab = {t: i for i, t in enumerate(spec.tokens)}
    hf = Tokenizer(models.BPE(vocab, [tuple(m.split(" ")) for m in spec.merges]))
    hf.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens([AddedToken(t, special=True) for t in spec.special])
    return hf


@pytest.mark.parametrize("text", TEXTS)
def test_smollm2_ids_equal_hf_tokenizers(smol_tok, hf_smol, text):
    _, tok = smol_tok
    ids = tok.encode(text)
    assert ids == hf_smol.encode(text).ids
    assert tok.decode(ids) == text


def test_smollm2_botchan_token_count(smol_tok, hf_smol, botchan_text):
    """llama.cpp's tokenizer makes 74,414 tokens of botchan.txt (CRLF kept)."""
    _, tok = smol_tok
    ids = tok.encode(botchan_text)
    assert len(ids) == 74414
    assert ids == hf_smol.encode(botchan_text).ids


def test_smollm2_specials_and_chat(smol_tok):
    _, tok = smol_tok
    assert tok.bos_id == 1 and tok.eos_id == 2 and not tok.add_bos
    assert {0, 2} <= tok.eog_ids
    prompt = tok.chat_prompt("Hi!")
    assert prompt.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert prompt.endswith("<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n")
    ids = tok.encode(prompt)
    assert ids[0] == 1 and ids.count(1) == 3 and ids.count(2) == 2


def test_detokenizer_streams_whole_characters(smol_tok):
    _, tok = smol_tok
    text = "東京 🤖 ok"
    d = Detokenizer(tok)
    pieces = [d.push(i) for i in tok.encode(text)] + [d.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


def test_sentencepiece_model(tmp_path):
    import sentencepiece as spm
    from minirt.registry import pull
    model = pull("botchan").parent / "botchan_en_bpe_1000.model"
    tok = build_tokenizer(TokenizerSpec("spm", spm_model=model, add_bos=True), 1000)
    sp = spm.SentencePieceProcessor(model_file=str(model))
    text = "I was a hot-headed youth, and I got into trouble."
    assert tok.encode(text) == [sp.bos_id()] + sp.encode(text)
    assert tok.decode(tok.encode(text, add_bos=False)) == text
    d = Detokenizer(tok)
    assert "".join(d.push(i) for i in sp.encode(text)).strip() == text
