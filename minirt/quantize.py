"""Re-encode a GGUF file's matrices in another type (F32, F16, BF16, Q8_0, Q4_0, Q4_1), like llama-quantize.

Every metadata field and tensor is carried over in order; 2-D weight matrices whose rows are whole blocks
are converted (through float32), everything else (norms, biases) stays as it is. The output is written to
a temporary file and renamed only when complete.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .errors import MinirtError
from .progress import Progress

TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1")


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
    tmp = dst.with_name(dst.name + ".part")
    writer = gguf.GGUFWriter(str(tmp), arch)
    try:
        copy_metadata(reader, writer, skip=("general.file_type",))
        writer.add_file_type({"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "BF16": 32}[qtype])
        target = Q[qtype]
        bar = Progress(f"quantize to {qtype}", len(reader.tensors), "tensors") if progress else None
        for t in reader.tensors:
            shape = [int(x) for x in reversed(t.shape.tolist())]
            convert = len(shape) == 2 and t.name.endswith(".weight") and shape[1] % 32 == 0
            if convert and t.tensor_type != target:
                w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32).reshape(shape)
                if qtype == "F32":
                    data = w
                elif qtype == "F16":
                    data = w.astype(np.float16)
                else:
                    data = gguf.quants.quantize(w, target)
                writer.add_tensor(t.name, data, raw_dtype=target if qtype not in ("F32", "F16") else None)
            else:
                copy_tensor(writer, t)
            if bar:
                bar.update(1, note=t.name)
        if bar:
            bar.close()
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
