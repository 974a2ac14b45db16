"""A SentencePiece model (the bytes of a `tokenizer.model`) built from a vocabulary: pieces, scores, types.

GGUF's `llama` vocabularies and llama2.c's tokenizer.bin keep only these lists; the sentencepiece library
needs a serialized ModelProto. It is built with the protobuf definitions sentencepiece itself ships
(sentencepiece_model_pb2): a BPE model with these pieces, byte fallback where all 256 byte pieces exist, and
normalisation as the identity with whitespace escaped and, where the vocabulary asks for it, a dummy prefix
("▁" before the text), as in Llama's tokenizer.model; that is also what llama.cpp's SPM tokenizer assumes.
"""
from __future__ import annotations


def model_proto(tokens: list[str], scores: list[float] | None, types: list[int] | None, unk_id: int = 0,
                bos_id: int = 1, eos_id: int = 2, pad_id: int = -1, add_dummy_prefix: bool = True,
                remove_extra_whitespaces: bool = False) -> bytes:
    """Serialized ModelProto of a BPE SentencePiece model with these pieces (ids in list order)."""
    from sentencepiece import sentencepiece_model_pb2 as pb
    n = len(tokens)
    scores = scores if scores is not None else [0.0] * n
    types = types if types is not None else [1] * n
    byte_fallback = sum(t == 6 for t in types) == 256  # SentencePiece wants all 256 byte pieces or none
    if not byte_fallback:
        types = [1 if t == 6 else t for t in types]  # a partial set stays as plain pieces
    # SentencePiece has one unknown piece: unk_id's; other pieces typed unknown (Phi-3's [PADnnnnn]) are unused
    types = [2 if i == unk_id else 5 if t == 2 else t for i, t in enumerate(types)]
    m = pb.ModelProto()
    m.pieces.extend(pb.ModelProto.SentencePiece(piece=tok, score=score, type=ty)
                    for tok, score, ty in zip(tokens, scores, types))
    t = m.trainer_spec
    t.model_type, t.vocab_size, t.byte_fallback = pb.TrainerSpec.BPE, n, byte_fallback
    t.unk_id, t.bos_id, t.eos_id, t.pad_id = unk_id, bos_id, eos_id, pad_id
    ns = m.normalizer_spec
    ns.name, ns.add_dummy_prefix, ns.remove_extra_whitespaces, ns.escape_whitespaces = \
        "identity", add_dummy_prefix, remove_extra_whitespaces, True
    return m.SerializeToString()


def proto_from_gguf(meta: dict) -> bytes:
    """A tokenizer.model from a GGUF's SentencePiece (`llama`) vocabulary keys: pieces, scores, types, specials."""
    return model_proto(list(meta["tokenizer.ggml.tokens"]), meta.get("tokenizer.ggml.scores"),
                       meta.get("tokenizer.ggml.token_type"),
                       unk_id=meta.get("tokenizer.ggml.unknown_token_id", 0),
                       bos_id=meta.get("tokenizer.ggml.bos_token_id", -1),
                       eos_id=meta.get("tokenizer.ggml.eos_token_id", -1),
                       add_dummy_prefix=bool(meta.get("tokenizer.ggml.add_space_prefix", True)),
                       remove_extra_whitespaces=bool(meta.get("tokenizer.ggml.remove_extra_whitespaces", False)))
