"""What every reader returns: Tensors (possibly quantized) and a description of the tokenizer."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..config import ModelConfig


@dataclass
class Tensor:
    """A 1-D or 2-D tensor as stored: float arrays, or GGUF blocks (uint8 rows) with their type name."""
    data: np.ndarray          # float32/float16 values, uint16 bf16 bits, or uint8 quantized rows
    qtype: str                # "F32" | "F16" | "BF16" | "Q8_0" | "Q4_0" | "Q4_1" | ...
    shape: tuple[int, ...]    # logical shape, (rows, cols) for matrices

    def float32(self) -> np.ndarray:
        """Dequantize (or upcast) to a float32 array of the logical shape."""
        if self.qtype == "F32":
            return np.ascontiguousarray(self.data, dtype=np.float32).reshape(self.shape)
        if self.qtype == "F16":
            return self.data.astype(np.float32).reshape(self.shape)
        if self.qtype == "BF16":
            return (self.data.astype(np.uint32) << 16).view(np.float32).reshape(self.shape)
        from gguf import GGMLQuantizationType, quants
        out = quants.dequantize(np.asarray(self.data), GGMLQuantizationType[self.qtype])
        return np.ascontiguousarray(out, dtype=np.float32).reshape(self.shape)

    def take_rows(self, order: np.ndarray) -> "Tensor":
        """The same tensor with its rows reordered (blocks lie within rows, so this works quantized too)."""
        return Tensor(np.ascontiguousarray(self.data[order]), self.qtype, self.shape)

    def transpose(self) -> "Tensor":
        """Transpose a float matrix (Hugging Face GPT-2 stores Conv1D weights as (in, out))."""
        assert self.qtype in ("F32", "F16", "BF16"), "only float tensors can be transposed"
        return Tensor(np.ascontiguousarray(self.data.T), self.qtype, self.shape[::-1])


def release_pages(arr: np.ndarray) -> None:
    """Drop the pages under arr (a contiguous view of a mapped file) from this process's resident set; they fault
    back in if read again. Loaders call it on each chunk they have copied, so that a large matrix is never
    resident twice (mapped and copied). Not a view of a mapping: nothing to do."""
    import mmap
    base = arr
    while isinstance(base, np.ndarray) and base.base is not None:
        base = base.base
    if isinstance(base, memoryview):
        base = base.obj
    if not isinstance(base, mmap.mmap) or not hasattr(base, "madvise") or not arr.flags.c_contiguous:
        return
    lo = arr.ctypes.data - np.frombuffer(base, np.uint8).ctypes.data
    a = lo // mmap.PAGESIZE * mmap.PAGESIZE
    base.madvise(mmap.MADV_DONTNEED, a, lo + arr.nbytes - a)


@dataclass
class TokenizerSpec:
    """Everything needed to build a tokenizer; which fields are set depends on kind."""
    kind: str                                   # "bpe" (byte-level) | "spm" (sentencepiece) | "none"
    tokens: list[str] = field(default_factory=list)     # bpe: id → token string (byte-level unicode form)
    merges: list[str] = field(default_factory=list)     # bpe: "a b" pairs in priority order
    special: dict[str, int] = field(default_factory=dict)
    pre: str = "gpt-2"                          # bpe: pre-tokenizer, as llama.cpp names it (tokenizer.ggml.pre)
    normalizer: str | None = None               # bpe: None | "NFC" (tokenizer.json's normalizer, e.g. Qwen2's)
    spm_model: Path | None = None               # spm: path of tokenizer.model
    spm_vocab: dict | None = None               # spm: or a GGUF `llama` vocabulary (minirt.spm.SpmBpe's arguments)
    tiktoken_file: Path | None = None           # bpe given as a .tiktoken ranks file
    bos_id: int | None = None
    eos_id: int | None = None
    add_bos: bool = False
    chat_template: str | None = None


@dataclass
class Checkpoint:
    config: ModelConfig
    tensors: dict[str, Tensor]
    tokenizer: TokenizerSpec
    source: Path
    file_type: str = ""       # e.g. "Q4_1", "F32": the dominant matrix type, for reports
    mapping: object = None    # the mmap the tensors view, if any
    metadata: dict = field(default_factory=dict)  # minirt's own metadata (e.g. a low-rank export's manifest)
    ignored: list = field(default_factory=list)   # tensor names in the file no reader maps (reported once)
    names: dict = field(default_factory=dict)     # canonical name → the file's own, where they differ
    validated: bool = False   # set by readers.validate once config and tensors are checked

    def release_pages(self) -> None:
        """Drop the file's pages from this process's resident set (they fault back in if still used):
        called as each layer has been copied into its kernel layout, so loading never holds both."""
        if self.mapping is not None and hasattr(self.mapping, "madvise"):
            import mmap
            self.mapping.madvise(mmap.MADV_DONTNEED)
