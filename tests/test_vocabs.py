"""Tokenizers of real vocabularies against two independent references: the token ids llama.cpp's tokenizer
test expects (models/ggml-vocab-*.gguf with their .inp texts and .out ids, from the llama-cpp-python 0.3.36
source package: registry data `llama-vocabs`), and Hugging Face `tokenizers` (its own BPE and regex engine)
built on the same vocabulary and merges.

The live comparison with transformers' GGUF tokenizer loader takes minutes per vocabulary: slow marker."""
from __future__ import annotations

import json

import pytest

from minirt import MinirtError
from minirt.readers.base import TokenizerSpec
from minirt.readers.gguf import read_gguf_tokenizer
from minirt.registry import pull
from minirt.tokenizer import HF_PRE_NAMES, build_tokenizer, pre_regexes

BPE_VOCABS = ["gpt-2", "llama-bpe", "qwen2", "qwen35", "starcoder", "refact", "command-r", "deepseek-llm",
              "deepseek-coder", "falcon", "mpt"]
SPM_VOCABS = ["llama-spm", "phi-3"]
MORE_TEXTS = [
    "Numbers: 1234567, 3.14159, -42 and 2024-11-21; ١٢٣ ⅷ ½",
    "naïve café, 東京タワー, Ünïcödé ẞ, emoji 🤖👍🏽 😶\u200d🌫️, Ελληνικά, русский, 한국어, हिन्दी",
    "Whitespace   runs\r\n\r\n  and\ttabs\t\t\n   \n",
    "it's I'll we're they've 'quoted' DON'T IT'S",
    "def f(x):\n    return x**2  # comment\n\n\n    if a != b: pass\n",
    "e\u0301 (decomposed) é (composed) ﬁ ﬃ ＡＢＣ",
]


@pytest.fixture(scope="module")
def vocabs():
    return pull("llama-vocabs", what="name")


def cases(folder, name) -> list[tuple[str, list[int]]]:
    """llama.cpp's test-tokenizer-0 format: texts separated by '\\n__ggml_vocab_test__\\n', one line of ids each."""
    texts = (folder / f"ggml-vocab-{name}.gguf.inp").read_bytes().decode("utf-8").split("\n__ggml_vocab_test__\n")
    lines = (folder / f"ggml-vocab-{name}.gguf.out").read_text(encoding="utf-8").split("\n")
    assert len(lines) >= len(texts) and not any(lines[len(texts):])
    return [(t, [int(x) for x in line.split()]) for t, line in zip(texts, lines)]


_TOKENIZERS: dict = {}


def tokenizer(folder, name):
    if name not in _TOKENIZERS:
        spec = read_gguf_tokenizer(folder / f"ggml-vocab-{name}.gguf")
        _TOKENIZERS[name] = (spec, build_tokenizer(spec, None))
    return _TOKENIZERS[name]


@pytest.mark.parametrize("name", BPE_VOCABS + SPM_VOCABS)
def test_ids_equal_llama_cpp(vocabs, name):
    spec, tok = tokenizer(vocabs, name)
    assert spec.kind == ("spm" if name in SPM_VOCABS else "bpe")
    for text, want in cases(vocabs, name):
        assert tok.encode(text, add_bos=False) == want, text
        assert tok.decode(want) == text  # (SentencePiece drops the dummy-prefix space it added)


def _hf_tokenizer(spec: TokenizerSpec, name: str):
    """Hugging Face tokenizers over the same tokens and merges: its BPE, its regex engine, its Sequence of Split
    pre-tokenizers (llama.cpp's regexes), and llama.cpp's ignore_merges where llama.cpp sets it (Llama 3)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    vocab: dict[str, int] = {}
    for i, t in enumerate(spec.tokens):
        vocab.setdefault(t, i)
    merges = [tuple(m.split(" ", 1)) for m in spec.merges]
    hf = Tokenizer(models.BPE(vocab, merges, ignore_merges=pre_regexes(spec.pre) == pre_regexes("llama3")))
    hf.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), "isolated") for r in pre_regexes(spec.pre)]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in spec.special])
    assert all(hf.token_to_id(t) == i for t, i in spec.special.items())
    return hf


@pytest.mark.parametrize("name", BPE_VOCABS)
def test_ids_equal_hf_tokenizers(vocabs, botchan_text, name):
    """Beyond llama.cpp's cases: more text (a novel's first 20,000 characters among it), where merging by the
    rank of a pair (Hugging Face) and by the rank of the merged token (tiktoken) would part if they could."""
    spec, tok = tokenizer(vocabs, name)
    hf = _hf_tokenizer(spec, name)
    texts = [t for t, _ in cases(vocabs, name)] + MORE_TEXTS + [botchan_text[:20000]]
    texts.append("".join(list(spec.special)[:3]).join(MORE_TEXTS[:3]))  # special tokens matched first
    for text in texts:
        assert tok.encode(text, add_bos=False) == hf.encode(text, add_special_tokens=False).ids, text[:80]


@pytest.mark.parametrize("name", [n for n in BPE_VOCABS if n != "llama-bpe"])
def test_every_token_is_its_own_merge_result(vocabs, name):
    """tiktoken takes a pre-token that is a whole token as that token (Hugging Face's ignore_merges, which
    llama.cpp sets for Llama 3 only). Elsewhere that is the merges' own result only where merging each token's
    text ends in the token itself: so check that of every token, with Hugging Face's BPE on the merges alone."""
    from tokenizers import models
    spec, _ = tokenizer(vocabs, name)
    bpe = models.BPE({t: i for i, t in reversed(list(enumerate(spec.tokens)))},
                     [tuple(m.split(" ", 1)) for m in spec.merges], ignore_merges=False)
    special = set(spec.special.values())
    parted = [t for i, t in enumerate(spec.tokens) if i not in special and len(t) > 1 and len(bpe.tokenize(t)) != 1
              and spec.tokens.index(t) == i]
    assert parted == []


@pytest.mark.parametrize("name", ["gpt-2", "llama-bpe", "qwen2", "starcoder"])
def test_tokenizer_json_pre_tokenizer_read_by_name(vocabs, tmp_path, name):
    """A Hugging Face tokenizer.json with that family's own pre_tokenizer (the regexes as Hugging Face writes
    them) is read through minirt's folder reader, named as llama.cpp names it, and gives the same ids."""
    from minirt.config import ModelConfig
    from minirt.readers.hf import _tokenizer
    from tokenizers import Regex, pre_tokenizers
    spec, tok = tokenizer(vocabs, name)
    hf = _hf_tokenizer(spec, name)
    hf_pre = {v: k for k, v in HF_PRE_NAMES.items()}
    stages = hf_pre[{"llama-bpe": "llama-bpe", "qwen2": "qwen2", "gpt-2": "gpt-2", "starcoder": "smollm"}[name]]
    gpt2 = stages[-1] if stages[-1].startswith("'s|'t") else None  # ByteLevel's own regex
    parts = [pre_tokenizers.Digits(individual_digits=True) if r == r"\p{N}" else
             pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True) if r == gpt2 else
             pre_tokenizers.Split(Regex(r), "isolated") for r in stages]
    if gpt2 is None:
        parts.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False))
    hf.pre_tokenizer = pre_tokenizers.Sequence(parts)
    hf.save(str(tmp_path / "tokenizer.json"))
    cfg = ModelConfig("llama", len(spec.tokens), 8, 1, 1, 1, 8, 8, 8, 1e-5)
    read = _tokenizer(tmp_path, {}, cfg)
    assert read.pre == {"starcoder": "smollm"}.get(name, name)
    mine = build_tokenizer(read, len(spec.tokens))
    for text in [t for t, _ in cases(vocabs, name)] + MORE_TEXTS:
        assert mine.encode(text) == tok.encode(text, add_bos=False) == hf.encode(text).ids, text[:80]


def test_unknown_pre_tokenizer_is_refused(vocabs, tmp_path):
    spec, _ = tokenizer(vocabs, "gpt-2")
    with pytest.raises(MinirtError, match="pre-tokenizer 'tekken-9' is not supported") as e:
        build_tokenizer(TokenizerSpec("bpe", tokens=spec.tokens, merges=spec.merges, pre="tekken-9"), None)
    assert "\n" not in str(e.value)
    from minirt.config import ModelConfig
    from minirt.readers.hf import _tokenizer
    hf = _hf_tokenizer(spec, "gpt-2")
    from tokenizers import pre_tokenizers
    for pre in (pre_tokenizers.Whitespace(), pre_tokenizers.Metaspace(),
                pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=False),
                                         pre_tokenizers.ByteLevel(add_prefix_space=False)])):
        hf.pre_tokenizer = pre
        hf.save(str(tmp_path / "tokenizer.json"))
        with pytest.raises(MinirtError, match="pre_tokenizer") as e:
            _tokenizer(tmp_path, {}, ModelConfig("gpt2", 50257, 8, 1, 1, 1, 8, 8, 8, 1e-5))
        assert "\n" not in str(e.value)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["gpt-2", "qwen2", "llama-bpe"])
def test_ids_equal_transformers_gguf_loader(vocabs, name):
    """transformers' own GGUF tokenizer conversion (AutoTokenizer.from_pretrained(folder, gguf_file=...)):
    about 20 s (GPT-2) to 90 s (Llama 3) each here. transformers 5.24 converts Llama 3's vocabulary without
    ignore_merges, which Meta's tokenizer.json and llama.cpp set ("Cửa Việt": 34 91163 101798 in llama.cpp's
    .out, five tokens from transformers' conversion); the test sets it as the original tokenizer has it."""
    from transformers import AutoTokenizer
    hf = AutoTokenizer.from_pretrained(str(vocabs), gguf_file=f"ggml-vocab-{name}.gguf")
    if name == "llama-bpe":
        hf.backend_tokenizer.model.ignore_merges = True
    _, tok = tokenizer(vocabs, name)
    for text, _ in cases(vocabs, name):
        assert tok.encode(text, add_bos=False) == hf.encode(text, add_special_tokens=False), text
