"""Tokenizers: byte-level BPE through tiktoken (GPT-2, SmolLM2, …) and SentencePiece models.

Both expose encode(text) → ids, token_bytes(id) → bytes and decode(ids) → str; Detokenizer turns a
stream of ids into a stream of complete UTF-8 text.
"""
from __future__ import annotations

import codecs
import json
import re
import unicodedata
from functools import lru_cache

import numpy as np

from .errors import MinirtError
from . import spm
from .readers.base import TokenizerSpec

# llama.cpp's pre-tokenizers (src/llama-vocab.cpp, llama_vocab::impl regex_exprs), by tokenizer.ggml.pre. Each
# regex in turn splits every piece the previous one left into its matches and the text between them.
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
PRE_REGEXES: dict[str, tuple[str, ...]] = {
    "llama3": (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",),
    "qwen2": (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",),
    "qwen35": (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",),
    "gpt-2": (_GPT2,),
    "starcoder": (r'\p{N}', _GPT2,),
    "falcon": (r'[\p{P}\$\+<=>\^~\|`]+', _GPT2, '[0-9][0-9][0-9]',),
    "deepseek-llm": ('[\r\n]', r'\s?[A-Za-zµÀ-ÖØ-öø-ƺƼ-ƿǄ-ʓʕ-ʯͰ-ͳͶͷͻ-ͽͿΆΈ-ΊΌΎ-ΡΣ-ϵϷ-ҁҊ-ԯԱ-ՖႠ-ჅᎠ-Ᏽᏸ-ᏽᲐ-ᲺᲽ-Ჿᴀ-ᴫᵫ-ᵷᵹ-ᶚḀ-ἕἘ-Ἕἠ-ὅὈ-Ὅὐ-ὗὙὛὝὟ-ώᾀ-ᾴᾶ-ᾼιῂ-ῄῆ-ῌῐ-ΐῖ-Ίῠ-Ῥῲ-ῴῶ-ῼℂℇℊ-ℓℕℙ-ℝℤΩℨK-ℭℯ-ℴℹℼ-ℿⅅ-ⅉⅎↃↄⰀ-ⱻⱾ-ⳤⳫ-ⳮⳲⳳꙀ-ꙭꚀ-ꚛꜢ-ꝯꝱ-ꞇꞋ-ꞎꭰ-ꮿﬀ-ﬆﬓ-ﬗＡ-Ｚａ-ｚ𐐀-𐑏𐒰-𐓓𐓘-𐓻𐲀-𐲲𐳀-𐳲𑢠-𑣟𞤀-𞥃]+', r'\s?[!-/:-~！-／：-～‘-‟　-。]+', r'\s+$', '[一-龥ࠀ-一가-\ud7ff]+', r'\p{N}+',),
    "deepseek-coder": ('[\r\n]', r'\s?\p{L}+', r'\s?\p{P}+', '[一-龥ࠀ-一가-\ud7ff]+', r'\p{N}',),
    "default": (r'[\p{P}\$\+<=>\^~\|]+', _GPT2, r'\p{N}+', '[0-9][0-9][0-9]',),
}
# other names llama.cpp gives the same regexes (minirt wrote "gpt2" before it used llama.cpp's names)
PRE_ALIASES = {
    **dict.fromkeys(("llama-bpe", "llama-v3", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2", "dbrx", "smaug-bpe"),
                    "llama3"),
    **dict.fromkeys(("deepseek-r1-qwen", "megrez", "stablelm2"), "qwen2"),
    **dict.fromkeys(("gpt2", "phi-2", "mpt", "olmo", "jais", "exaone4"), "gpt-2"),
    **dict.fromkeys(("refact", "command-r", "smollm", "codeshell", "exaone", "minerva-7b"), "starcoder"),
}
# Hugging Face tokenizer.json pre_tokenizers, as the regexes they apply in turn (pre_regexes_from_hf), → llama.cpp's name
_HF_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_HF_LLAMA3_QWEN2 = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}%s| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
HF_PRE_NAMES = {
    (_HF_LLAMA3_QWEN2 % "{1,3}",): "llama-bpe",
    (_HF_LLAMA3_QWEN2 % "",): "qwen2",
    (_HF_GPT2,): "gpt-2",
    (r"\p{N}", _HF_GPT2): "smollm",
}


def pre_regexes(name: str) -> tuple[str, ...]:
    """The regexes of a pre-tokenizer named as GGUF's tokenizer.ggml.pre names it; an unknown name is refused."""
    key = PRE_ALIASES.get(name, name)
    if key not in PRE_REGEXES:
        known = ", ".join(sorted(set(PRE_REGEXES) | set(PRE_ALIASES)))
        raise MinirtError(f"pre-tokenizer {name[:40]!r} is not supported (known: {known}); "
                          "a tokenizer with the wrong one would give wrong tokens")
    return PRE_REGEXES[key]


def pre_name_from_hf(pre: object, where: str) -> str:
    """llama.cpp's name of a tokenizer.json pre_tokenizer (Split regexes, Digits, ByteLevel in a Sequence)."""
    def stages(p) -> list[str]:
        kind = p.get("type") if isinstance(p, dict) else None
        if kind == "Sequence" and isinstance(p.get("pretokenizers"), list):
            return [r for q in p["pretokenizers"] for r in stages(q)]
        if kind == "ByteLevel" and not p.get("add_prefix_space", False):
            return [_HF_GPT2] if p.get("use_regex", True) else []
        if kind == "Digits":
            return [r"\p{N}" if p.get("individual_digits", False) else r"\p{N}+"]
        pat = p.get("pattern") if kind == "Split" else None
        if (isinstance(pat, dict) and isinstance(pat.get("Regex"), str) and p.get("behavior") == "Isolated"
                and not p.get("invert", False)):
            return [pat["Regex"]]
        raise MinirtError(f"{where}: pre_tokenizer {json.dumps(p)[:80]} is not supported (byte-level BPE with "
                          "the regexes of Llama 3, Qwen2, GPT-2 or SmolLM is)")
    name = HF_PRE_NAMES.get(tuple(stages(pre)))
    if name is None:
        raise MinirtError(f"{where}: pre_tokenizer {json.dumps(pre)[:80]} is not one minirt knows (those of "
                          "Llama 3, Qwen2, GPT-2 and SmolLM are); refusing rather than tokenizing differently")
    return name


def _split(pattern, pieces: list[str]) -> list[str]:
    """Each piece split into the pattern's matches and the text between them (llama.cpp's unicode_regex_split)."""
    out = []
    for piece in pieces:
        pos = 0
        for m in pattern.finditer(piece):
            if m.start() > pos:
                out.append(piece[pos:m.start()])
            if m.end() > m.start():
                out.append(m.group())
            pos = m.end()
        if pos < len(piece):
            out.append(piece[pos:])
    return out


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


_BYTE_CHAR = {b: c for c, b in byte_decoder().items()}  # str.translate table: byte value → its printable char


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
            n_vocab = max(max(ranks.values()), *spec.special.values()) + 1
        else:
            dec = byte_decoder()
            table = {ord(c): b for c, b in dec.items()}
            not_byte_level = re.compile("[^" + re.escape("".join(dec)) + "]").search
            special_ids = set(spec.special.values())
            # a token's bytes; None where its text is not byte-level (no merge can reach it: it decodes as UTF-8)
            level = [None if (i in special_ids or not_byte_level(t)) else t.translate(table).encode("latin-1")
                     for i, t in enumerate(spec.tokens)]
            id_bytes = {i: t.encode() if b is None else b for i, (t, b) in enumerate(zip(spec.tokens, level))}
            str_id = {t: i for i, t in reversed(list(enumerate(spec.tokens))) if level[i] is not None}
            unk = spec.special.get("<unk>", spec.special.get("<|endoftext|>", 0))
            # ranks: single bytes, then each merge's result in merge order
            ranks, order = {}, []
            for b in range(256):
                ranks[bytes([b])] = len(order)
                order.append(str_id.get(bytes([b]).decode("latin-1").translate(_BYTE_CHAR), unk))
            for mline in spec.merges:
                i = str_id.get(mline.replace(" ", "", 1))
                if i is not None and level[i] and level[i] not in ranks:  # an empty token would never end
                    ranks[level[i]] = len(order)
                    order.append(i)
            rank_to_id = np.array(order, dtype=np.int64)
            n_vocab = len(spec.tokens)
        if any(not name for name in spec.special):  # it would match everywhere
            raise MinirtError("tokenizer: an empty special token (corrupt vocabulary)")
        n_vocab = max(n_vocab, vocab_size or 0)  # a padded embedding: ids past the vocabulary decode to nothing
        self.pre = spec.pre
        *stages, last = pre_regexes(spec.pre)
        import regex
        self.stages = [regex.compile(r) for r in stages]
        # tiktoken runs the last regex and the merges; what the regex leaves between its matches is a piece too
        self.enc = tiktoken.Encoding(f"minirt-{spec.pre}", pat_str=f"(?:{last})|(?:(?!(?:{last}))[\\s\\S])+",
                                     mergeable_ranks=ranks, special_tokens={})
        self.rank_to_id = rank_to_id
        self.id_bytes = [id_bytes.get(i, b"") for i in range(n_vocab)]
        self.vocab_size = n_vocab
        self.special = dict(spec.special)
        # control and user-defined tokens are matched in the text first (as llama.cpp and Hugging Face do)
        self._special_re = regex.compile(_trie_pattern(list(self.special))) if self.special else None
        self.normalizer = spec.normalizer
        self.bos_id, self.eos_id, self.add_bos = spec.bos_id, spec.eos_id, spec.add_bos
        self.chat_template = spec.chat_template
        eog = {spec.special[n] for n in EOG_NAMES if n in spec.special}
        self.eog_ids = frozenset(eog | ({spec.eos_id} if spec.eos_id is not None else set()))

    def _ordinary(self, text: str, out: list[int]) -> None:
        """Ids of text without special tokens: normalised, split by the pre-tokenizer's regexes, merged."""
        if self.normalizer == "NFC":
            text = unicodedata.normalize("NFC", text)
        pieces = [text]
        for st in self.stages:
            pieces = _split(st, pieces)
        ranks = [r for piece in pieces for r in self.enc.encode_ordinary(piece)]
        out.extend(self.rank_to_id[np.asarray(ranks, dtype=np.int64)].tolist())

    def _encode(self, text: str) -> list[int]:
        out: list[int] = []
        pos = 0
        for m in (self._special_re.finditer(text) if self._special_re is not None else ()):
            if m.start() > pos:
                self._ordinary(text[pos:m.start()], out)
            out.append(self.special[m.group()])
            pos = m.end()
        if pos < len(text):
            self._ordinary(text[pos:], out)
        return out

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


_HEX_BYTE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


class SPMTokenizer(Tokenizer):
    """SentencePiece: a GGUF `llama` vocabulary (pieces, scores, types) runs on minirt.spm's BPE; a
    tokenizer.model file on the sentencepiece library. Control and user-defined pieces are matched in the text as
    they are before SentencePiece sees the rest (as llama.cpp and Hugging Face do): chat markers such as
    <start_of_turn>, Gemma's whitespace runs."""

    def __init__(self, spec: TokenizerSpec, vocab_size: int | None = None):
        if spec.spm_vocab is not None:
            pieces, types = self._from_vocab(spec.spm_vocab)
            bos = eos = -1
        else:
            pieces, types, bos, eos = self._from_file(spec.spm_model)
        self.vocab_size = self.n_pieces = len(types)
        if vocab_size is not None:
            if self.n_pieces > vocab_size:
                raise MinirtError(f"tokenizer: {self.n_pieces} SentencePiece pieces for an embedding of "
                                  f"{vocab_size} rows (a tokenizer for another model?)")
            self.vocab_size = vocab_size  # a padded embedding: ids past the pieces decode to nothing
        self.types = types
        self.bos_id = spec.bos_id if spec.bos_id is not None else (bos if bos >= 0 else None)
        self.eos_id = spec.eos_id if spec.eos_id is not None else (eos if eos >= 0 else None)
        self.add_bos = spec.add_bos
        self.chat_template = spec.chat_template
        self.eog_ids = frozenset({self.eos_id} - {None})
        special = {}
        for i in np.flatnonzero((types == spm.CONTROL) | (types == spm.USER_DEFINED)).tolist():
            p = pieces(i)
            if p:
                special.setdefault(p, i)
        self.special = special
        self._special_re = re.compile(_trie_pattern(list(special))) if special else None

    def _from_vocab(self, v: dict):
        if len(v["off"]) < 2:
            raise MinirtError("the SentencePiece vocabulary in the GGUF has no pieces")
        self.bpe = spm.SpmBpe(**v)
        self._plain, self.sp = self.bpe.encode, None
        return self.bpe.piece, self.bpe.types

    def _from_file(self, path):
        import sentencepiece
        try:
            self.sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
        except (OSError, RuntimeError) as e:
            raise MinirtError(f"{path}: not a readable SentencePiece model ({e})") from None
        from sentencepiece import sentencepiece_model_pb2 as pb
        proto = pb.ModelProto()
        proto.ParseFromString(open(path, "rb").read())
        types = np.array([p.type for p in proto.pieces], np.int8)  # sentencepiece's numbers, as GGUF's
        del proto
        sp = self.sp
        self._plain, self.bpe = sp.encode, None
        return sp.id_to_piece, types, sp.bos_id(), sp.eos_id()

    def _encode(self, text: str) -> list[int]:
        if self._special_re is None:
            return self._plain(text)
        out, pos = [], 0
        for m in self._special_re.finditer(text):
            if m.start() > pos:
                out += self._plain(text[pos:m.start()])
            out.append(self.special[m.group()])
            pos = m.end()
        if pos < len(text):
            out += self._plain(text[pos:])
        return out

    def token_bytes(self, token_id: int) -> bytes:
        """A piece's bytes: a byte piece's byte, nothing for control and unknown pieces (and ids past the
        pieces), else its text with ▁ as a space."""
        if token_id >= self.n_pieces:
            return b""
        if self.bpe is not None:
            return self.bpe.token_bytes(token_id)
        if self.types[token_id] in (spm.CONTROL, spm.UNKNOWN):
            return b""
        raw = self.sp.id_to_piece(token_id).encode()
        if self.types[token_id] == spm.BYTE:
            hexbyte = _HEX_BYTE.fullmatch(raw.decode("ascii", "replace"))
            return bytes([int(hexbyte.group(1), 16)]) if hexbyte else b""
        return raw.replace("\u2581".encode(), b" ")

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids if int(i) < self.n_pieces]
        if self.sp is not None:
            return self.sp.decode(ids)
        return self.bpe.decode(ids)


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
