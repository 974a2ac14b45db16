"""Tokenizers: byte-level BPE through tiktoken (GPT-2, SmolLM2, …) and SentencePiece models.

Both expose encode(text) → ids, token_bytes(id) → bytes and decode(ids) → str; Detokenizer turns a
stream of ids into a stream of complete UTF-8 text.
"""
from __future__ import annotations

import codecs
import re
from functools import lru_cache

import numpy as np

from .errors import MinirtError
from .readers.base import TokenizerSpec

# GPT-2's pre-tokenizer. SmolLM2 (llama.cpp "smollm", HF Digits(individual_digits) + ByteLevel) splits every
# digit on its own first; in one regex that means single digits, and whitespace before a digit kept whole.
PATTERNS = {
    "gpt2": r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""",
    "smollm": r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+|\s+(?=\p{N})|\s+(?!\S)|\s+""",
}
EOG_NAMES = ("<|endoftext|>", "<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "</s>")


@lru_cache(maxsize=1)
def byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's bytes_to_unicode: the printable character that stands for each byte."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


class Tokenizer:
    """Common interface. Subclasses set vocab_size, bos_id, eos_id, eog_ids, add_bos, chat_template."""
    vocab_size: int
    bos_id: int | None = None
    eos_id: int | None = None
    add_bos: bool = False
    eog_ids: frozenset = frozenset()
    chat_template: str | None = None

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        ids = self._encode(text)
        if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None:
            ids = [self.bos_id] + ids
        return ids

    def _encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def token_bytes(self, token_id: int) -> bytes:
        raise NotImplementedError

    def decode(self, ids) -> str:
        return b"".join(self.token_bytes(int(i)) for i in ids).decode("utf-8", errors="replace")

    def chat_prompt(self, user: str, system: str | None = None) -> str:
        """One user turn rendered with the model's chat template, ready for the assistant's reply."""
        from .chat import render
        return render(self, ([{"role": "system", "content": system}] if system else [])
                      + [{"role": "user", "content": user}])


class BPETokenizer(Tokenizer):
    """Byte-level BPE with tiktoken doing the merging.

    tiktoken merges the adjacent pair whose concatenation has the lowest rank. Ranks are given in merge
    order (single bytes first, then each merge's result), which is the priority Hugging Face's BPE uses;
    `rank_to_id` maps tiktoken's ranks back to the model's token ids."""

    def __init__(self, spec: TokenizerSpec, vocab_size: int | None = None):
        import tiktoken
        if spec.tiktoken_file is not None:
            from tiktoken.load import load_tiktoken_bpe
            try:
                ranks = load_tiktoken_bpe(str(spec.tiktoken_file))
            except (ValueError, UnicodeDecodeError, OSError) as e:  # binascii.Error is a ValueError
                raise MinirtError(f"{spec.tiktoken_file}: not a readable .tiktoken file ({str(e)[:60]})") from None
            if not ranks or b"" in ranks or min(ranks.values()) < 0 or (
                    vocab_size is not None and max(ranks.values()) >= vocab_size):
                raise MinirtError(f"{spec.tiktoken_file}: empty tokens or ranks outside the model's vocabulary")
            id_bytes = {i: b for b, i in ranks.items()}
            rank_to_id = np.arange(max(ranks.values()) + 1 + len(spec.special), dtype=np.int64)
            special_ranks = dict(spec.special)
            n_vocab = max(max(ranks.values()), *spec.special.values()) + 1
        else:
            dec = byte_decoder()
            special_ids = set(spec.special.values())

            def to_bytes(tok: str) -> bytes:
                return bytes(dec[c] for c in tok) if all(c in dec for c in tok) else tok.encode()

            id_bytes = {i: (tok.encode() if i in special_ids else to_bytes(tok)) for i, tok in enumerate(spec.tokens)}
            by_bytes = {}
            for i, tok in enumerate(spec.tokens):
                if i not in special_ids:
                    by_bytes.setdefault(id_bytes[i], i)
            unk = spec.special.get("<unk>", spec.special.get("<|endoftext|>", 0))
            ranks, order = {}, []
            for b in range(256):
                ranks[bytes([b])] = len(order)
                order.append(by_bytes.get(bytes([b]), unk))
            for mline in spec.merges:
                a, _, c = mline.partition(" ")
                merged = to_bytes(a) + to_bytes(c)
                if merged and merged not in ranks and merged in by_bytes:  # an empty token would never end
                    ranks[merged] = len(order)
                    order.append(by_bytes[merged])
            special_ranks = {}
            for name, i in spec.special.items():
                special_ranks[name] = len(order)
                order.append(i)
            rank_to_id = np.array(order, dtype=np.int64)
            n_vocab = len(spec.tokens)
        if any(not name for name in special_ranks):  # tiktoken's encoder would loop forever on it
            raise MinirtError("tokenizer: an empty special token (corrupt vocabulary)")
        n_vocab = max(n_vocab, vocab_size or 0)  # a padded embedding: ids past the vocabulary decode to nothing
        pat = PATTERNS.get(spec.pre, PATTERNS["gpt2"])
        self.enc = tiktoken.Encoding(f"minirt-{spec.pre}", pat_str=pat, mergeable_ranks=ranks,
                                     special_tokens=special_ranks)
        self.rank_to_id = rank_to_id
        self.id_bytes = [id_bytes.get(i, b"") for i in range(n_vocab)]
        self.vocab_size = n_vocab
        self.special = dict(spec.special)
        self.bos_id, self.eos_id, self.add_bos = spec.bos_id, spec.eos_id, spec.add_bos
        self.chat_template = spec.chat_template
        eog = {spec.special[n] for n in EOG_NAMES if n in spec.special}
        self.eog_ids = frozenset(eog | ({spec.eos_id} if spec.eos_id is not None else set()))

    def _encode(self, text: str) -> list[int]:
        ranks = self.enc.encode(text, allowed_special="all")
        return self.rank_to_id[np.asarray(ranks, dtype=np.int64)].tolist()

    def token_bytes(self, token_id: int) -> bytes:
        return self.id_bytes[token_id]


def _trie_pattern(words: list[str]) -> str:
    """A regular expression matching any of the words, longest first, as a trie (one branch per distinct
    next character), so that thousands of words cost a few comparisons per position, not thousands."""
    trie: dict = {}
    for w in words:
        node = trie
        for ch in w:
            node = node.setdefault(ch, {})
        node[""] = True

    def pat(node: dict) -> str:
        alts = [re.escape(ch) + pat(sub) for ch, sub in sorted(node.items()) if ch]
        if not alts:
            return ""
        body = alts[0] if len(alts) == 1 else "(?:" + "|".join(alts) + ")"
        return f"(?:{body})?" if "" in node else body
    return pat(trie)


class SPMTokenizer(Tokenizer):
    """A SentencePiece model file (tokenizer.model)."""

    def __init__(self, spec: TokenizerSpec, vocab_size: int | None = None):
        import sentencepiece as spm
        try:
            self.sp = (spm.SentencePieceProcessor(model_proto=spec.spm_proto) if spec.spm_proto is not None
                       else spm.SentencePieceProcessor(model_file=str(spec.spm_model)))
        except (OSError, RuntimeError) as e:
            where = spec.spm_model if spec.spm_proto is None else "the SentencePiece vocabulary in the GGUF"
            raise MinirtError(f"{where}: not a readable SentencePiece model ({e})") from None
        self.vocab_size = self.n_pieces = self.sp.get_piece_size()
        if vocab_size is not None:
            if self.n_pieces > vocab_size:
                raise MinirtError(f"tokenizer: {self.n_pieces} SentencePiece pieces for an embedding of "
                                  f"{vocab_size} rows (a tokenizer for another model?)")
            self.vocab_size = vocab_size  # a padded embedding: ids past the pieces decode to nothing
        bos, eos = self.sp.bos_id(), self.sp.eos_id()
        self.bos_id = spec.bos_id if spec.bos_id is not None else (bos if bos >= 0 else None)
        self.eos_id = spec.eos_id if spec.eos_id is not None else (eos if eos >= 0 else None)
        self.add_bos = spec.add_bos
        self.chat_template = spec.chat_template
        self.eog_ids = frozenset({self.eos_id} - {None})
        from sentencepiece import sentencepiece_model_pb2 as pb
        proto = pb.ModelProto()
        proto.ParseFromString(spec.spm_proto if spec.spm_proto is not None else open(spec.spm_model, "rb").read())
        CONTROL, USER, BYTE = (pb.ModelProto.SentencePiece.Type.Value(n) for n in ("CONTROL", "USER_DEFINED", "BYTE"))
        self._bytes, special = [b""] * self.vocab_size, {}
        for i, p in enumerate(proto.pieces):
            if p.type == BYTE:
                hexbyte = re.fullmatch(r"<0x([0-9A-Fa-f]{2})>", p.piece)
                self._bytes[i] = bytes([int(hexbyte.group(1), 16)]) if hexbyte else b""
            elif not (p.type == CONTROL or self.sp.is_unknown(i)):
                self._bytes[i] = p.piece.replace("\u2581", " ").encode()
            if p.type in (CONTROL, USER) and p.piece:
                special.setdefault(p.piece, i)
        # control and user-defined pieces are matched in the text as they are, before SentencePiece sees the
        # rest (as llama.cpp and Hugging Face do): chat markers such as <start_of_turn>, Gemma's whitespace runs
        self.special = special
        self._special_re = re.compile(_trie_pattern(list(special))) if special else None

    def _encode(self, text: str) -> list[int]:
        if self._special_re is None:
            return self.sp.encode(text)
        out, pos = [], 0
        for m in self._special_re.finditer(text):
            if m.start() > pos:
                out += self.sp.encode(text[pos:m.start()])
            out.append(self.special[m.group()])
            pos = m.end()
        if pos < len(text):
            out += self.sp.encode(text[pos:])
        return out

    def token_bytes(self, token_id: int) -> bytes:
        return self._bytes[token_id]

    def decode(self, ids) -> str:
        return self.sp.decode([int(i) for i in ids if int(i) < self.n_pieces])


class NoTokenizer(Tokenizer):
    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def _encode(self, text: str) -> list[int]:
        raise MinirtError("this model has no tokenizer files; pass token ids instead of text")

    def token_bytes(self, token_id: int) -> bytes:
        return b""  # generation from token ids still works; the ids are in Generation.stats.tokens


def build_tokenizer(spec: TokenizerSpec, vocab_size: int) -> Tokenizer:
    if spec.kind == "bpe":
        return BPETokenizer(spec, vocab_size)
    if spec.kind == "spm":
        return SPMTokenizer(spec, vocab_size)
    return NoTokenizer(vocab_size)


class Detokenizer:
    """Turns generated ids into text pieces, holding back bytes of an incomplete UTF-8 character."""

    def __init__(self, tokenizer: Tokenizer):
        self.tok = tokenizer
        self.dec = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        return self.dec.decode(self.tok.token_bytes(token_id))

    def flush(self) -> str:
        return self.dec.decode(b"", final=True)
