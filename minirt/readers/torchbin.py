"""PyTorch checkpoints (`pytorch_model.bin`) read without torch and without running pickled code.

A torch.save file (torch ≥ 1.6) is a zip archive: `*/data.pkl` pickles the state dict, whose tensors refer
to raw storages stored as `*/data/KEY`. The pickle is read by an Unpickler that admits only the names a
state dict needs (OrderedDict, torch's tensor-rebuild functions, the typed storage classes), each replaced
by a stand-in written here; any other global (os.system, builtins.eval, ...) is refused with one line
before anything is called. Storage sizes, offsets, shapes and strides are checked against the archive
before a byte is read.

Bounded by the file, never by numbers in it: the pickle runs on the pure-Python unpickler (its memo is a dict,
so a memo index costs one entry, and every length is a read of at most the bytes there are); BUILD is refused
except where torch.save uses it (the state dict's `_metadata`); zip members are stored or deflated, their
declared sizes checked against their compressed sizes (deflate expands at most ~1032:1) before inflating;
every tensor view (sizes, strides, offset) lies inside its storage and holds no more elements than it.
"""
from __future__ import annotations

import collections
import io
import math
import pickle
import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np

from ..errors import MinirtError
from .base import Tensor

# torch storage class → (numpy dtype, minirt type); bf16 kept as its uint16 bits
STORAGES = {
    "FloatStorage": (np.float32, "F32"), "HalfStorage": (np.float16, "F16"), "BFloat16Storage": (np.uint16, "BF16"),
    "DoubleStorage": (np.float64, "F64"), "LongStorage": (np.int64, "I64"), "IntStorage": (np.int32, "I32"),
    "ShortStorage": (np.int16, "I16"), "CharStorage": (np.int8, "I8"), "ByteStorage": (np.uint8, "U8"),
    "BoolStorage": (np.bool_, "BOOL"),
}


class _Storage:
    def __init__(self, array: np.ndarray, qtype: str):
        self.array, self.qtype = array, qtype


class _StorageType:
    def __init__(self, name: str):
        self.name = name


MAX_RATIO = 1032      # deflate's largest expansion (258 bytes from 2 bits)
MAX_DIMS = 8


def _load_build(self):
    """BUILD: only the `_metadata` attribute of an OrderedDict (how torch.save keeps a state dict's metadata)."""
    state = self.stack.pop()
    inst = self.stack[-1]
    if type(inst) is collections.OrderedDict and isinstance(state, dict) and set(state) == {"_metadata"}:
        inst._metadata = state["_metadata"]
        return
    raise MinirtError(f"{self.path}: refused a BUILD opcode in the pickle (it sets attributes; only a state "
                      f"dict's _metadata may be set)")


def read_member(archive: zipfile.ZipFile, name: str, path: Path) -> bytes:
    """A zip member's bytes, after checking its method and that its declared size is one its compressed
    bytes can hold (so a small member cannot inflate to gigabytes)."""
    info = archive.getinfo(name)
    if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        raise MinirtError(f"{path}: archive member {name} uses compression method {info.compress_type} "
                          f"(torch.save stores members uncompressed)")
    most = info.compress_size * (MAX_RATIO if info.compress_type == zipfile.ZIP_DEFLATED else 1) + 64
    if info.file_size > most:
        raise MinirtError(f"{path}: archive member {name} declares {info.file_size} bytes from "
                          f"{info.compress_size} compressed (corrupt or a zip bomb)")
    try:
        return archive.read(name)
    except (zipfile.BadZipFile, OSError, EOFError, zlib.error, NotImplementedError) as e:
        raise MinirtError(f"{path}: cannot read {name} from the archive ({e}; truncated?)") from None


class _Reader(pickle._Unpickler):
    dispatch = dict(pickle._Unpickler.dispatch)
    dispatch[pickle.BUILD[0]] = _load_build

    def __init__(self, data: bytes, archive: zipfile.ZipFile, prefix: str, path: Path):
        super().__init__(io.BytesIO(data))
        self.archive, self.prefix, self.path = archive, prefix, path
        self.storages: dict[str, _Storage] = {}

    def find_class(self, module: str, name: str):
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return self._rebuild_tensor
        if module == "torch._utils" and name == "_rebuild_parameter":
            return lambda data, requires_grad=False, hooks=None: data
        if module == "torch" and name in STORAGES:
            return _StorageType(name)
        raise MinirtError(f"{self.path}: refused to load {module}.{name} from the pickle (only tensor data is "
                          f"read; convert the file with a trusted tool if it really needs more)")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], _StorageType)):
            raise MinirtError(f"{self.path}: unexpected persistent id in the pickle (not a torch state dict)")
        _, stype, key, _location, numel = pid
        key = str(key)
        if key in self.storages:
            return self.storages[key]
        dtype, qtype = STORAGES[stype.name]
        entry = f"{self.prefix}data/{key}"
        try:
            info = self.archive.getinfo(entry)
        except KeyError:
            raise MinirtError(f"{self.path}: storage {key} is missing from the archive (truncated?)") from None
        itemsize = np.dtype(dtype).itemsize
        if type(numel) is not int or numel < 0 or info.file_size != numel * itemsize:
            raise MinirtError(f"{self.path}: storage {key} has {info.file_size} bytes, not {numel} × {itemsize}")
        raw = read_member(self.archive, entry, self.path)
        if len(raw) != info.file_size:
            raise MinirtError(f"{self.path}: storage {key} is shorter than declared (truncated?)")
        st = _Storage(np.frombuffer(raw, dtype=dtype), qtype)
        self.storages[key] = st
        return st

    def _rebuild_tensor(self, storage, offset, size, stride, requires_grad=False, hooks=None, metadata=None):
        if not isinstance(storage, _Storage):
            raise MinirtError(f"{self.path}: tensor without a storage in the pickle (not a torch state dict)")
        if not (isinstance(size, tuple) and isinstance(stride, tuple) and len(size) == len(stride) <= MAX_DIMS
                and all(type(s) is int for s in size + stride + (offset,))):
            raise MinirtError(f"{self.path}: malformed tensor shape in the pickle")
        n = storage.array.size
        if (offset < 0 or any(s < 0 for s in size) or any(s < 0 for s in stride) or math.prod(size) > n
                or (all(size) and offset + sum((a - 1) * b for a, b in zip(size, stride)) >= n)):
            raise MinirtError(f"{self.path}: tensor of shape {size} at offset {offset} lies outside its storage")
        item = storage.array.itemsize
        view = np.lib.stride_tricks.as_strided(storage.array[offset:] if all(size) else storage.array[:0],
                                               shape=size, strides=[s * item for s in stride], writeable=False)
        data = np.ascontiguousarray(view)
        return Tensor(data, storage.qtype, size)


def read_torch_bin(path: Path) -> dict[str, Tensor]:
    """The tensors of a torch.save'd state dict, by name (float32/float16/bf16-bits arrays)."""
    path = Path(path)
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as f:
            head = f.read(2)
        hint = (" (a pre-1.6 torch file: re-save it with a recent torch, or as safetensors)"
                if head[:1] == b"\x80" else " (truncated or not a torch checkpoint)")
        raise MinirtError(f"{path}: not a zip-format torch checkpoint{hint}")
    try:
        with zipfile.ZipFile(path) as z:
            pkls = [n for n in z.namelist() if n.endswith("data.pkl") and n.count("/") == 1]
            if len(pkls) != 1:
                raise MinirtError(f"{path}: no data.pkl in the archive (not a torch checkpoint)")
            prefix = pkls[0][: -len("data.pkl")]
            reader = _Reader(read_member(z, pkls[0], path), z, prefix, path)
            try:
                obj = reader.load()
            except MinirtError:
                raise
            except (pickle.UnpicklingError, EOFError, TypeError, ValueError, AttributeError, IndexError, KeyError,
                    struct.error, OverflowError) as e:
                raise MinirtError(f"{path}: corrupt pickle in the archive ({type(e).__name__}: {str(e)[:80]})") from None
    except (zipfile.BadZipFile, OSError, EOFError, zlib.error, UnicodeDecodeError, NotImplementedError) as e:
        raise MinirtError(f"{path}: cannot read the archive ({e}; truncated?)") from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise MinirtError(f"{path}: the pickle holds a {type(obj).__name__}, not a state dict")
    out = {}
    for k, v in obj.items():
        if isinstance(v, Tensor):
            if v.qtype == "F64":
                v = Tensor(v.data.astype(np.float32), "F32", v.shape)
            out[str(k)] = v
    return out
