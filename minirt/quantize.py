"""Re-encode a GGUF file's matrices in another type, like llama-quantize.

Every metadata field and tensor is carried over in order; 2-D weight matrices whose rows are whole blocks
are converted (through float32), everything else (norms, biases) stays as it is. The output is written to
a temporary file and renamed only when complete.

Types: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 (gguf's encoders, whose bytes equal llama.cpp's), Q4_K, Q5_K,
Q6_K, Q2_K, Q3_K (kquant_encode: llama.cpp's reference algorithm), each for every matrix ("pure", as
`llama-quantize --pure`; llama-quantize's own Q2_K and Q4_K/Q5_K names are mixes); and the mixes Q3_K_M, Q4_K_M and
Q5_K_M, which choose a type per tensor as llama-quantize does (llama-quant.cpp, llama_tensor_get_type, without an
importance matrix): the output head (or the tied embeddings) in Q6_K; for Q4_K_M/Q5_K_M attn_v and ffn_down in Q6_K
in the layers use_more_bits picks (the first and last eighth, and every third between); for Q3_K_M attn_v in Q5_K
in the first two layers and Q4_K after, ffn_down Q5_K in the first sixteenth and Q4_K after, attn_output Q4_K.
A K-quant needs rows of a multiple of 256; a matrix whose rows are not falls back as in llama.cpp (Q2_K, Q3_K →
Q4_0, Q4_K → Q5_0, Q5_K → Q5_1, Q6_K → Q8_0; a head or tied embedding → Q8_0). Not reproduced: llama.cpp's rules
for Falcon, 8-expert MoE models and 70B Llamas.
"""
from __future__ import annotations

import os
import re
import sys
from collections import Counter
from pathlib import Path

import numpy as np

from .errors import MinirtError
from .progress import Progress

TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
         "Q3_K_M", "Q4_K_M", "Q5_K_M")
K_TYPES = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
# general.file_type (llama_ftype) written for each choice; a pure K type takes its mix's number, as llama-quantize
# --pure does
FILE_TYPE = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9, "Q2_K": 10, "Q3_K": 12,
             "Q3_K_M": 12, "Q4_K": 15, "Q4_K_M": 15, "Q5_K": 17, "Q5_K_M": 17, "Q6_K": 18, "BF16": 32}
FALLBACK = {"Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}


def use_more_bits(i_layer: int, n_layers: int) -> bool:
    """llama.cpp's choice of the layers that get more bits in a _M mix."""
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


def tensor_types(names_shapes: list[tuple[str, list[int]]], qtype: str, n_layers: int) -> dict[str, str]:
    """The type each convertible matrix gets: {name: type}. names_shapes: (name, [rows, cols]) of every matrix to
    convert. The attn_v and ffn_down layers are counted in llama.cpp's order (by layer number, then name)."""
    base = qtype[:4] if qtype.endswith("_M") else qtype
    mix = qtype.endswith("_M")
    tied = not any(n == "output.weight" for n, _ in names_shapes)
    n_wv = sum(1 for n, _ in names_shapes if _is_attn_v(n))
    i_wv = i_down = 0
    out = {}
    for name, (_, cols) in sorted(names_shapes, key=_layer_then_name):
        t = base
        if mix:
            if name == "output.weight" or (tied and name == "token_embd.weight"):
                t = "Q8_0" if cols % 256 else "Q6_K"
            elif _is_attn_v(name):
                if qtype == "Q3_K_M":
                    t = "Q5_K" if i_wv < 2 else "Q4_K"
                elif use_more_bits(i_wv, n_wv):
                    t = "Q6_K"
                i_wv += 1
            elif "ffn_down" in name:
                if qtype == "Q3_K_M":
                    t = "Q5_K" if i_down < n_layers // 16 else "Q4_K"
                elif use_more_bits(i_down, n_layers):
                    t = "Q6_K"
                i_down += 1
            elif "attn_output.weight" in name and qtype == "Q3_K_M":
                t = "Q4_K"
        if t in FALLBACK and cols % 256:
            t = FALLBACK[t]
        out[name] = t
    return out


def _layer_then_name(item: tuple[str, list[int]]) -> tuple[int, str]:
    m = re.match(r"blk\.(\d+)\.", item[0])
    return (int(m.group(1)) if m else -1, item[0])


def _is_attn_v(name: str) -> bool:
    return any(k in name for k in ("attn_v.weight", "attn_qkv.weight", "attn_kv_b.weight"))


def copy_metadata(reader, writer, skip=()) -> None:
    """Every key/value of a gguf.GGUFReader into a GGUFWriter, types kept (but the header's own fields, the
    architecture, which the writer already has, and the keys in skip)."""
    import gguf
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture" or name in skip:
            continue
        vtype = field.types[0]
        if vtype == gguf.GGUFValueType.ARRAY:
            writer.add_key_value(name, field.contents(), vtype, sub_type=field.types[-1])
        else:
            writer.add_key_value(name, field.contents(), vtype)


def copy_tensor(writer, t) -> None:
    """A tensor of a gguf.GGUFReader into a GGUFWriter, its bytes and type as they are."""
    from gguf import GGMLQuantizationType as Q
    data = np.asarray(t.data)
    raw = t.tensor_type if t.tensor_type not in (Q.F32, Q.F16) else None
    writer.add_tensor(t.name, data, raw_shape=data.shape if raw is None else None, raw_dtype=raw)


def quantize_gguf(src: str | os.PathLike, dst: str | os.PathLike, qtype: str, progress: bool = True) -> Path:
    import gguf
    from gguf import GGMLQuantizationType as Q
    if qtype not in TYPES:
        raise MinirtError(f"unknown type {qtype!r}: choose one of {', '.join(TYPES)}")
    src, dst = Path(src), Path(dst)
    if src.suffix != ".gguf" and not src.is_file():
        raise MinirtError(f"{src}: quantize reads a GGUF file")
    if dst.exists() and dst.is_dir():
        raise MinirtError(f"{dst} is a folder; give an output file name")
    try:
        reader = gguf.GGUFReader(str(src), "r")
    except Exception as e:
        raise MinirtError(f"{src}: not a readable GGUF file ({type(e).__name__}: {e})") from None
    arch = reader.fields["general.architecture"].contents()
    shapes = {t.name: [int(x) for x in reversed(t.shape.tolist())] for t in reader.tensors}
    matrices = [(t.name, shapes[t.name]) for t in reader.tensors if _convertible(t.name, shapes[t.name])]
    n_layers = reader.fields.get(f"{arch}.block_count")
    n_layers = int(n_layers.contents()) if n_layers is not None else sum("ffn_down" in n for n, _ in matrices)
    choice = tensor_types(matrices, qtype, n_layers)
    tmp = dst.with_name(dst.name + ".part")
    writer = gguf.GGUFWriter(str(tmp), arch)
    try:
        copy_metadata(reader, writer, skip=("general.file_type",))
        writer.add_file_type(FILE_TYPE[qtype])
        bar = Progress(f"quantize to {qtype}", len(reader.tensors), "tensors") if progress else None
        for t in reader.tensors:
            target = choice.get(t.name)
            if target is not None and t.tensor_type != Q[target]:
                w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32).reshape(shapes[t.name])
                raw = Q[target] if target not in ("F32", "F16") else None
                writer.add_tensor(t.name, encode(w, target), raw_dtype=raw)
            else:
                copy_tensor(writer, t)
            if bar:
                bar.update(1, note=t.name)
        if bar:
            bar.close()
        if progress and qtype.endswith("_M"):
            counts = Counter(choice.values())
            print(f"{qtype}: " + ", ".join(f"{n} {k}" for k, n in sorted(counts.items())) + " matrices",
                  file=sys.stderr)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, dst)
    except MinirtError:
        tmp.unlink(missing_ok=True)
        raise
    except (OSError, ValueError) as e:
        tmp.unlink(missing_ok=True)
        raise MinirtError(f"writing {dst} failed: {e}") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return dst


def _convertible(name: str, shape: list[int]) -> bool:
    """A weight matrix (2-D, not a norm) whose rows are whole 32-blocks; the rest is copied as it is."""
    return len(shape) == 2 and name.endswith(".weight") and not name.endswith("_norm.weight") and shape[1] % 32 == 0


def encode(w: np.ndarray, qtype: str) -> np.ndarray:
    """float32 matrix → the stored array of qtype (float16 for F16, blocks as uint8 rows otherwise)."""
    from gguf import GGMLQuantizationType as Q
    from gguf import quants
    if qtype == "F32":
        return w
    if qtype == "F16":
        return w.astype(np.float16)
    if qtype in K_TYPES:
        from .kquant_encode import quantize_k
        return quantize_k(w, qtype)
    return quants.quantize(w, Q[qtype])
