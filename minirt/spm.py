"""SentencePiece's BPE on a vocabulary given as lists (a GGUF `llama` vocabulary), without the sentencepiece library.

sentencepiece's processor for Gemma 3's 262,144 pieces held ~44 MB of the process (its ModelProto and maps) and
needed a serialized proto built first. Here the vocabulary is one byte blob with offsets, float32 scores, int8 types
and an open-addressing table of ids keyed by a hash of the piece's bytes (≈ 7 MB for Gemma), and the merge loop is
compiled. The algorithm is sentencepiece's (bpe_model.cc, sentencepiece_processor.cc), step for step:
  - normalization as the identity: runs of spaces collapsed and the ends stripped where the vocabulary asks
    (remove_extra_whitespaces), "▁" before the text (add_dummy_prefix), spaces written "▁";
  - the text is split into characters; every adjacent pair whose concatenation is a piece (normal, user-defined or
    unused) enters a queue ordered by the piece's score, ties to the leftmost; the best pair is merged and its new
    neighbours enter the queue, until no pair is a piece;
  - a final symbol that is an unused piece is split back along the merges that made it;
  - a symbol that is no piece becomes its UTF-8 bytes' <0xXX> pieces where the vocabulary has all 256 of them
    (byte fallback), else the unknown id, one per run of unknown symbols.
tests/test_tokenizer.py compares ids and text with sentencepiece's processor on the same vocabulary.
"""
from __future__ import annotations

import numpy as np
from numba import njit

from .errors import MinirtError

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
JIT = dict(cache=True)


@njit(**JIT)
def _hash(buf, a, b):
    """FNV-1a over buf[a:b]."""
    h = np.uint64(14695981039346656037)
    for i in range(a, b):
        h = (h ^ np.uint64(buf[i])) * np.uint64(1099511628211)
    return h


@njit(**JIT)
def _same(x, i, y, a, b):
    """x[i:i + b − a] == y[a:b] (bounds are the caller's)."""
    for k in range(b - a):
        if x[i + k] != y[a + k]:
            return False
    return True


@njit(**JIT)
def _build_table(blob, off, mergeable, table):
    """table[slot] = the first id of each mergeable piece's bytes (open addressing, linear probing)."""
    mask = len(table) - 1
    for i in range(len(off) - 1):
        if not mergeable[i]:
            continue
        a, b = off[i], off[i + 1]
        s = np.int64(_hash(blob, a, b) & np.uint64(mask))
        while table[s] >= 0:
            j = table[s]
            if off[j + 1] - off[j] == b - a and _same(blob, off[j], blob, a, b):
                break  # a repeated piece: the first id keeps it
            s = (s + 1) & mask
        else:
            table[s] = i


@njit(**JIT)
def _lookup(text, a, b, blob, off, table):
    """The id of the piece text[a:b], or −1."""
    mask = len(table) - 1
    s = np.int64(_hash(text, a, b) & np.uint64(mask))
    while table[s] >= 0:
        j = table[s]
        if off[j + 1] - off[j] == b - a and _same(blob, off[j], text, a, b):
            return j
        s = (s + 1) & mask
    return -1


@njit(**JIT)
def _push(hs, hl, hn, n, score, left, size):
    """Add (score, left, size) to the binary heap of n entries (best = highest score, then lowest left)."""
    i = n
    while i > 0:
        p = (i - 1) // 2
        if hs[p] > score or (hs[p] == score and hl[p] < left):
            break
        hs[i], hl[i], hn[i] = hs[p], hl[p], hn[p]
        i = p
    hs[i], hl[i], hn[i] = score, left, size
    return n + 1


@njit(**JIT)
def _pop(hs, hl, hn, n):
    """Remove the best entry (returned before the call by reading index 0); n − 1 entries remain."""
    n -= 1
    score, left, size = hs[n], hl[n], hn[n]
    i = 0
    while True:
        c = 2 * i + 1
        if c >= n:
            break
        if c + 1 < n and (hs[c + 1] > hs[c] or (hs[c + 1] == hs[c] and hl[c + 1] < hl[c])):
            c += 1
        if score > hs[c] or (score == hs[c] and left < hl[c]):
            break
        hs[i], hl[i], hn[i] = hs[c], hl[c], hn[c]
        i = c
    hs[i], hl[i], hn[i] = score, left, size
    return n


@njit(**JIT)
def _merge(text, blob, off, scores, table):
    """sentencepiece's BPE merges over the UTF-8 bytes of normalized text → the final symbols (start, end, id or
    −1) and the merges made (start, middle, end) in order."""
    L = len(text)
    start = np.empty(L, np.int64)  # symbols: one per character, each alive until merged into its left neighbour
    n = 0
    i = 0
    while i < L:
        c = text[i]
        start[n] = i
        n += 1
        i += 1 if c < 0x80 else 2 if c < 0xE0 else 3 if c < 0xF0 else 4
    end = np.empty(n, np.int64)
    end[:n - 1] = start[1:n]
    if n:
        end[n - 1] = L
    nxt = np.arange(1, n + 1)
    prv = np.arange(-1, n - 1)
    hs, hl, hn = np.empty(3 * n, np.float32), np.empty(3 * n, np.int64), np.empty(3 * n, np.int64)
    m = 0
    for k in range(n - 1):
        j = _lookup(text, start[k], end[k + 1], blob, off, table)
        if j >= 0:
            m = _push(hs, hl, hn, m, scores[j], k, end[k + 1] - start[k])
    log = np.empty((n, 3), np.int64)
    nlog = 0
    while m:
        left, size = hl[0], hn[0]
        m = _pop(hs, hl, hn, m)
        right = nxt[left] if end[left] > start[left] else n
        if right >= n or end[right] - start[left] != size:
            continue  # one side was merged since: a stale entry
        log[nlog, 0], log[nlog, 1], log[nlog, 2] = start[left], end[left], end[right]
        nlog += 1
        end[left] = end[right]
        end[right] = start[right]  # dead
        nxt[left] = nxt[right]
        if nxt[left] < n:
            prv[nxt[left]] = left
        p, q = prv[left], nxt[left]
        if p >= 0:
            j = _lookup(text, start[p], end[left], blob, off, table)
            if j >= 0:
                m = _push(hs, hl, hn, m, scores[j], p, end[left] - start[p])
        if q < n:
            j = _lookup(text, start[left], end[q], blob, off, table)
            if j >= 0:
                m = _push(hs, hl, hn, m, scores[j], left, end[q] - start[left])
    out = np.empty((n, 3), np.int64)
    k, s = 0, 0
    while s < n:
        out[k, 0], out[k, 1] = start[s], end[s]
        out[k, 2] = _lookup(text, start[s], end[s], blob, off, table)
        k += 1
        s = nxt[s]
    return out[:k], log[:nlog]


def vocab_arrays(pieces: list[str], scores=None, types=None) -> dict:
    """A vocabulary's lists as arrays (blob: the pieces' UTF-8 bytes end to end, off: n + 1 offsets, float32
    scores, int8 types): a reader hands these on, so that the 262k Python strings are freed before the weights
    are read."""
    n = len(pieces)
    if types is not None and not all(0 <= t <= 6 for t in types):
        raise MinirtError("SentencePiece vocabulary: a token type is outside 0…6 (corrupt vocabulary)")
    encoded = [p.encode("utf-8", "surrogatepass") for p in pieces]
    off = np.zeros(n + 1, np.int64)
    np.cumsum(np.fromiter(map(len, encoded), np.int64, n), out=off[1:])
    return dict(blob=np.frombuffer(b"".join(encoded), np.uint8), off=off,
                scores=np.zeros(n, np.float32) if scores is None else np.asarray(scores, np.float32),
                types=np.full(n, NORMAL, np.int8) if types is None else np.asarray(types, np.int8))


class SpmBpe:
    """encode(text) → ids, piece_bytes(id) and decode(ids) for a SentencePiece BPE vocabulary (vocab_arrays)."""

    def __init__(self, blob, off, scores, types, unk_id: int = 0, add_dummy_prefix: bool = True,
                 remove_extra_whitespaces: bool = False):
        n = len(off) - 1
        self.blob, self.off, self.scores = blob, off, scores
        self.types = np.array(types, np.int8)  # a copy: the rules below retype some pieces
        self.types[self.types == 0] = NORMAL  # llama.cpp's "undefined"
        self.byte_ids = self._byte_ids()
        self.byte_of = {} if self.byte_ids is None else {int(i): b for b, i in enumerate(self.byte_ids)}
        if self.byte_ids is None:  # a partial set of byte pieces stays as plain pieces (sentencepiece's rule)
            self.types[self.types == BYTE] = NORMAL
        self.types[(self.types == UNKNOWN) & (np.arange(n) != unk_id)] = UNUSED  # one unknown piece: unk_id's
        self.unk_id = unk_id
        self.add_dummy_prefix, self.remove_extra_whitespaces = add_dummy_prefix, remove_extra_whitespaces
        self.table = np.full(1 << max(4, (2 * n).bit_length()), -1, np.int32)
        _build_table(self.blob, self.off, np.isin(self.types, (NORMAL, USER_DEFINED, UNUSED)), self.table)

    @classmethod
    def from_lists(cls, pieces: list[str], scores=None, types=None, **options) -> "SpmBpe":
        return cls(**vocab_arrays(pieces, scores, types), **options)

    def _byte_ids(self):
        """ids of the pieces <0x00> … <0xFF> (all 256 typed BYTE), else None."""
        ids = np.flatnonzero(self.types == BYTE)
        if len(ids) != 256:
            return None
        out = np.full(256, -1, np.int64)
        for i in ids:
            piece = self.piece(int(i))
            if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
                try:
                    out[int(piece[3:5], 16)] = i
                except ValueError:
                    return None
        return out if (out >= 0).all() else None

    def piece(self, i: int) -> str:
        return bytes(self.blob[self.off[i]:self.off[i + 1]]).decode("utf-8", "replace")

    def piece_bytes(self, i: int) -> bytes:
        return self.blob[self.off[i]:self.off[i + 1]].tobytes()

    def token_bytes(self, i: int) -> bytes:
        """What piece i writes into a text: its byte (a byte piece), nothing (control and unknown pieces), else
        its text with ▁ as a space."""
        t = self.types[i]
        if t == CONTROL or t == UNKNOWN:
            return b""
        if t == BYTE:
            return bytes([self.byte_of[i]])
        return self.piece_bytes(i).replace("\u2581".encode(), b" ")

    def decode(self, ids: list[int]) -> str:
        """sentencepiece's decoding: control pieces vanish, the unknown piece reads " ⁇ ", byte pieces join into
        UTF-8, ▁ reads as a space, and the first piece loses the dummy-prefix space."""
        out = bytearray()
        first = self.add_dummy_prefix or self.remove_extra_whitespaces
        for i in ids:
            t = self.types[i]
            if t == CONTROL:
                continue
            if t == UNKNOWN:
                out += " \u2047 ".encode()
            elif t == BYTE:
                out += self.token_bytes(i)
            else:
                raw = self.piece_bytes(i)
                if first:
                    raw = raw.removeprefix("\u2581".encode())
                out += raw.replace("\u2581".encode(), b" ")
            first = False
        return out.decode("utf-8", "replace")

    def normalize(self, text: str) -> str:
        if self.remove_extra_whitespaces:
            text = " ".join(t for t in text.split(" ") if t)
        if not text:
            return ""
        return ("▁" if self.add_dummy_prefix else "") + text.replace(" ", "▁")

    def encode(self, text: str) -> list[int]:
        text = self.normalize(text)
        if not text:
            return []
        raw = text.encode("utf-8", "surrogatepass")
        symbols, log = _merge(np.frombuffer(raw, np.uint8), self.blob, self.off, self.scores, self.table)
        found = symbols[:, 2]
        if (found >= 0).all() and not (self.types[found] == UNUSED).any():
            return found.tolist()  # every symbol a piece: the common case
        split = None
        ids: list[int] = []
        prev_unk = False
        for a, b, i in symbols.tolist():
            if i >= 0 and self.types[i] == UNUSED:
                split = split if split is not None else {(s, e): mid for s, mid, e in log.tolist()}
                ids += self._resegment(raw, a, b, split)
                prev_unk = False
            elif i >= 0:
                ids.append(i)
                prev_unk = False
            elif self.byte_ids is not None:
                ids += [int(self.byte_ids[c]) for c in raw[a:b]]
            elif not prev_unk:  # a run of unknown symbols is one unknown id, as sentencepiece gives it
                ids.append(self.unk_id)
                prev_unk = True
        return ids

    def _resegment(self, raw: bytes, a: int, b: int, split: dict) -> list[int]:
        i = int(_lookup(np.frombuffer(raw, np.uint8), a, b, self.blob, self.off, self.table))
        if i >= 0 and self.types[i] == UNUSED and (a, b) in split:
            mid = split[(a, b)]
            return self._resegment(raw, a, mid, split) + self._resegment(raw, mid, b, split)
        return [i if i >= 0 else self.unk_id]
