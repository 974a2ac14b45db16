"""minirt.spm (SentencePiece BPE on a vocabulary's lists) against the sentencepiece library on the same vocabulary."""
import numpy as np
import pytest
import sentencepiece
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from minirt.readers.gguf import read_gguf_tokenizer
from minirt.readers.spm import model_proto
from minirt.registry import pull
from minirt.spm import BYTE, CONTROL, NORMAL, UNUSED, SpmBpe

ALPHABET = "ab▁cé字"  # one-, two- and three-byte characters; "z", "🎉" and spaces' neighbours stay unknown


def random_vocab(seed: int, byte_fallback: bool):
    """pieces, scores, types: <unk> <s> </s>, the byte pieces or not, the alphabet, and random merges of it (some
    unused, some scores tied)."""
    rng = np.random.default_rng(seed)
    pieces, types = ["<unk>", "<s>", "</s>"], [2, CONTROL, CONTROL]
    if byte_fallback:
        pieces += [f"<0x{b:02X}>" for b in range(256)]
        types += [BYTE] * 256
    pieces += list(ALPHABET)
    types += [NORMAL] * len(ALPHABET)
    seen = set(pieces)
    while len(pieces) < len(types) + 60 and len(seen) < 400:
        p = "".join(rng.choice(list(ALPHABET), size=rng.integers(2, 6)))
        if p not in seen:
            seen.add(p)
            pieces.append(p)
            types.append(UNUSED if rng.random() < 0.15 else NORMAL)
    scores = [0.0] * len(pieces)
    for i in range(len(pieces)):
        scores[i] = float(rng.integers(-8, 0)) if types[i] in (NORMAL, UNUSED) else 0.0  # many ties
    return pieces, scores, types


def pair(seed, byte_fallback, prefix=True, strip=False):
    pieces, scores, types = random_vocab(seed, byte_fallback)
    ours = SpmBpe.from_lists(pieces, scores, types, unk_id=0, add_dummy_prefix=prefix, remove_extra_whitespaces=strip)
    proto = model_proto(pieces, scores, types, unk_id=0, bos_id=1, eos_id=2, add_dummy_prefix=prefix,
                        remove_extra_whitespaces=strip)
    return ours, sentencepiece.SentencePieceProcessor(model_proto=proto)


TEXT = st.text(alphabet=ALPHABET.replace("▁", "") + " z🎉\n", max_size=40)


@settings(max_examples=150, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 5), byte_fallback=st.booleans(), prefix=st.booleans(), strip=st.booleans(), text=TEXT)
def test_ids_and_text_equal_sentencepiece(seed, byte_fallback, prefix, strip, text):
    ours, sp = pair(seed, byte_fallback, prefix, strip)
    ids = ours.encode(text)
    assert ids == sp.encode(text)
    assert ours.decode(ids) == sp.decode(ids)
    want = b"".join(b"" if sp.is_control(i) or sp.is_unknown(i) else bytes([int(sp.id_to_piece(i)[3:5], 16)])
                    if sp.is_byte(i) else sp.id_to_piece(i).replace("▁", " ").encode() for i in ids)
    assert b"".join(ours.token_bytes(i) for i in ids) == want  # what a stream of tokens writes


def test_unused_pieces_are_split_back_and_unknown_runs_are_one_id():
    pieces = ["<unk>", "<s>", "</s>", "a", "b", "ab", "abab"]
    types = [2, CONTROL, CONTROL, NORMAL, NORMAL, NORMAL, UNUSED]
    ours = SpmBpe.from_lists(pieces, [0, 0, 0, -5, -5, -1, -0.5], types)
    got = ours.encode("ab" * 2 + "zz🎉b")
    proto = model_proto(pieces, [0, 0, 0, -5, -5, -1, -0.5], types)
    assert got == sentencepiece.SentencePieceProcessor(model_proto=proto).encode("abab" + "zz🎉b")
    assert 6 not in got and got.count(0) == 2  # "abab" (unused) split back; "▁" and "zz🎉" one unknown id each


@pytest.mark.parametrize("name", ["gemma3-270m"])
def test_real_vocabulary_equals_sentencepiece(name):
    """Gemma 3's 262,144 pieces on botchan and on text with digits, unicode, code and whitespace runs."""
    spec = read_gguf_tokenizer(pull(name))
    v = spec.spm_vocab
    ours = SpmBpe(**v)
    pieces = [ours.piece(i) for i in range(len(v["off"]) - 1)]
    sp = sentencepiece.SentencePieceProcessor(model_proto=model_proto(
        pieces, v["scores"].tolist(), v["types"].tolist(), unk_id=v["unk_id"], add_dummy_prefix=v["add_dummy_prefix"],
        remove_extra_whitespaces=v["remove_extra_whitespaces"]))
    text = pull("botchan", what="name").read_text()[:60_000]
    text += "\n  def f(x):\n\treturn x**2  # 3.14159 — ünïcödé 数字 🎉\n\n\n    end   "
    ids = ours.encode(text)
    assert ids == sp.encode(text)
    assert ours.decode(ids) == sp.decode(ids)
    assert ours.blob.nbytes + ours.off.nbytes + ours.table.nbytes + ours.scores.nbytes < 12 << 20
