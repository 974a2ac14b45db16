"""A SentencePiece model (the bytes of a `tokenizer.model`) built from a vocabulary: pieces, scores, types.

GGUF's `llama` vocabularies and llama2.c's tokenizer.bin keep only these lists; the sentencepiece library
needs a serialized ModelProto (sentencepiece_model.proto). The few fields a Llama-style BPE model uses are
written here by hand in protobuf's wire format (the protobuf package is not needed):
  ModelProto:     1 pieces (repeated SentencePiece), 2 trainer_spec, 3 normalizer_spec
  SentencePiece:  1 piece (string), 2 score (float), 3 type (enum: 1 normal, 2 unknown, 3 control,
                  4 user defined, 5 unused, 6 byte)
  TrainerSpec:    3 model_type (2 = BPE), 4 vocab_size, 35 byte_fallback, 40 unk_id, 41 bos_id, 42 eos_id,
                  43 pad_id
  NormalizerSpec: 1 name, 3 add_dummy_prefix, 4 remove_extra_whitespaces, 5 escape_whitespaces
Normalisation is the identity with a dummy prefix ("▁" before the text) and whitespace escaped, as in
Llama's tokenizer.model; that is also what llama.cpp's SPM tokenizer assumes.
"""
from __future__ import annotations

import struct


def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # negative int32 values: ten-byte two's complement, as protobuf writes them
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _key(field: int, wire: int) -> bytes:
    return _varint(field << 3 | wire)


def _bytes(field: int, data: bytes) -> bytes:
    return _key(field, 2) + _varint(len(data)) + data


def _int(field: int, value: int) -> bytes:
    return _key(field, 0) + _varint(int(value))


def model_proto(tokens: list[str], scores: list[float] | None, types: list[int] | None, unk_id: int = 0,
                bos_id: int = 1, eos_id: int = 2, pad_id: int = -1, add_dummy_prefix: bool = True,
                remove_extra_whitespaces: bool = False) -> bytes:
    """Serialized ModelProto of a BPE SentencePiece model with these pieces (ids in list order)."""
    n = len(tokens)
    scores = scores if scores is not None else [0.0] * n
    types = types if types is not None else [1] * n
    out = bytearray()
    byte_fallback = sum(t == 6 for t in types) == 256  # SentencePiece wants all 256 byte pieces or none
    if not byte_fallback:
        types = [1 if t == 6 else t for t in types]  # a partial set stays as plain pieces
    for tok, score, ty in zip(tokens, scores, types):
        piece = _bytes(1, tok.encode("utf-8")) + _key(2, 5) + struct.pack("<f", score)
        if ty != 1:
            piece += _int(3, ty)
        out += _bytes(1, piece)
    trainer = (_int(3, 2) + _int(4, n) + _int(35, byte_fallback) + _int(40, unk_id) + _int(41, bos_id)
               + _int(42, eos_id) + _int(43, pad_id))
    out += _bytes(2, trainer)
    normalizer = (_bytes(1, b"identity") + _int(3, add_dummy_prefix) + _int(4, remove_extra_whitespaces)
                  + _int(5, 1))
    out += _bytes(3, normalizer)
    return bytes(out)


def proto_from_gguf(meta: dict) -> bytes:
    """A tokenizer.model from a GGUF's SentencePiece (`llama`) vocabulary keys: pieces, scores, types, specials."""
    return model_proto(list(meta["tokenizer.ggml.tokens"]), meta.get("tokenizer.ggml.scores"),
                       meta.get("tokenizer.ggml.token_type"),
                       unk_id=meta.get("tokenizer.ggml.unknown_token_id", 0),
                       bos_id=meta.get("tokenizer.ggml.bos_token_id", -1),
                       eos_id=meta.get("tokenizer.ggml.eos_token_id", -1),
                       add_dummy_prefix=bool(meta.get("tokenizer.ggml.add_space_prefix", True)),
                       remove_extra_whitespaces=bool(meta.get("tokenizer.ggml.remove_extra_whitespaces", False)))
