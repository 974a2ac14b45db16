"""Linear layers: the seam where weight formats and acceleration modes plug in.

A Linear maps x (T, in_features) → out (T, out_features) into a preallocated output. The model only
calls forward(); which kernel runs, and which bytes are read, is the Linear's business.
"""
from __future__ import annotations

import numba
import numpy as np

from .cpu import gemm, isa, kernels, kquants, qmatmul
from .cpu.threads import split_rows
from .readers.base import Tensor, release_pages

BLAS_MIN_ROWS = 16  # from this many positions on, a BLAS GEMM beats the row-parallel Numba kernel (measured)


def stacked_bias(ws: list[Tensor], bs: list[Tensor | None] | None) -> np.ndarray | None:
    """The bias of matrices stacked along their outputs (zeros where one has none), or None if none has one."""
    if not bs or all(b is None for b in bs):
        return None
    return np.concatenate([b.float32() if b is not None else np.zeros(t.shape[0], np.float32) for b, t in zip(bs, ws)])


class Linear:
    in_features: int
    out_features: int
    bias: np.ndarray | None = None

    def forward(self, x: np.ndarray, out: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    @property
    def nbytes(self) -> int:
        """Bytes of weights read per forward call (the memory traffic of one decode step)."""
        raise NotImplementedError


class Dense(Linear):
    """A float32 matrix (out, in): Numba matvec for decode, BLAS GEMM for batches of positions."""

    def __init__(self, w: np.ndarray, bias: np.ndarray | None = None):
        self.w = np.ascontiguousarray(w, dtype=np.float32)
        self.out_features, self.in_features = self.w.shape
        self.bias = None if bias is None else np.ascontiguousarray(bias, dtype=np.float32)

    @classmethod
    def from_tensors(cls, ws: list[Tensor], bs: list[Tensor | None] | None = None) -> "Dense":
        """One Dense from matrices stacked along their outputs (fused Q/K/V, or gate/up)."""
        w = np.concatenate([t.float32() for t in ws]) if len(ws) > 1 else ws[0].float32()
        return cls(w, stacked_bias(ws, bs))

    def forward(self, x, out):
        if x.shape[0] >= BLAS_MIN_ROWS and gemm.USE:
            gemm.gemm(np.ascontiguousarray(x), self.w, out, numba.get_num_threads())
        elif x.shape[0] >= BLAS_MIN_ROWS:
            split_rows(self.out_features, lambda a, b: np.matmul(x, self.w[a:b].T, out=out[:, a:b]))
        else:
            kernels.matmul_f32(x, self.w, out, numba.get_num_threads())
        if self.bias is not None:
            out += self.bias
        return out

    @property
    def nbytes(self) -> int:
        return self.w.nbytes + (0 if self.bias is None else self.bias.nbytes)


class Quant(Linear):
    """A matrix kept in its stored format (Q8_0, Q4_0, Q4_1, F16, BF16): no float32 copy.

    The kernels of minirt/cpu/qmatmul.py run on the quantized rows, on the instruction set chosen at import
    (minirt/cpu/isa.py; MINIRT_ISA forces a lower one). Block formats (Q8_0, Q4_0, Q4_1) take int8-quantized
    activations, as llama.cpp does, at any number of positions: each loaded weight block serves 8 positions at a
    time, so a prompt runs on the same kernels as a decode step (pp128 ×3 against dequantized tiles and BLAS,
    and a position's bits do not depend on how a prompt is chunked). exact=True (float32 activations) and
    F16/BF16 take the kernels up to GEMM_MIN_ROWS − 1 positions; more dequantize tiles and multiply with BLAS."""

    FORMATS = {"Q8_0": (34, 2, None), "Q4_0": (18, 2, None), "Q4_1": (20, 4, 2), "F16": (0, 0, None),
               "BF16": (0, 0, None)}  # bytes per block, offset of the quants, offset of m
    GEMM_MIN_ROWS = 17  # from this many positions on: dequantized tiles and BLAS (exact and 16-bit matrices)
    TILE = 64

    def __init__(self, t: Tensor, bias: np.ndarray | None = None, exact: bool = False):
        self.qtype = t.qtype
        self.exact = exact  # float32 activations in the decode kernels (slower, no activation rounding)
        block, qoff, moff = self.FORMATS[t.qtype]
        N, K = t.shape
        self.out_features, self.in_features = N, K
        self.bias = None if bias is None else np.ascontiguousarray(bias, dtype=np.float32)
        if block == 0:  # F16 / BF16: 16-bit values as they are
            self._qn = np.ascontiguousarray(t.data).view(np.uint16).reshape(N, K)
            self.nb = 0
            self.qi = np.zeros((1, 1), np.uint8)
            self.di = self.mi = np.zeros((N, 0), np.uint16)
            return
        if K % 32:
            raise ValueError(f"{t.qtype} rows of {K} values are not whole blocks")
        nb = self.nb = K // 32
        blocks = np.asarray(t.data).reshape(N, nb, block)
        R = qmatmul.ROWS
        G = -(-N // R)
        self.qi = np.empty((G, nb * R * (block - qoff)), np.int8 if t.qtype == "Q8_0" else np.uint8)
        self.di = np.empty((G, nb * R), np.uint16)
        self.mi = np.empty((G, nb * R if moff else 0), np.uint16)
        step = R * max(1, (1 << 20) // max(1, R * nb * block))
        # in chunks of ~1 MB, each released from the mapping once repacked (chunks of 8 MB left ~16 MB of freed
        # temporaries in the heap at the peak: glibc serves them from the heap once its mmap threshold has grown)
        for a in range(0, N, step):
            b = blocks[a:a + step]
            d = b[:, :, 0:2].view(np.uint16)[:, :, 0]
            m = b[:, :, moff:moff + 2].view(np.uint16)[:, :, 0] if moff else np.zeros((len(b), 0), np.uint16)
            qi, di, mi = qmatmul.pack(b[:, :, qoff:].view(self.qi.dtype), d, m)
            g = a // R
            self.qi[g:g + len(qi)], self.di[g:g + len(qi)], self.mi[g:g + len(qi)] = qi, di, mi
            release_pages(b)

    @property
    def qn(self) -> np.ndarray:
        """The quants in GGUF's order (N, nb·32 int8 | nb·16 nibble bytes), rebuilt from the interleaved
        layout the kernels read (qi, di, mi: qmatmul.pack); F16/BF16: the values (N, K). For the GPU upload
        and exports."""
        if not self.nb:
            return self._qn
        return qmatmul.unpack_q(self.qi, self.out_features, self.nb)

    @property
    def d(self) -> np.ndarray:
        """The f16 block scales (N, nb) in GGUF's row order (rebuilt; the kernels read di)."""
        return qmatmul.unpack_s(self.di, self.out_features) if self.nb else self.di

    @property
    def m(self) -> np.ndarray:
        """Q4_1's f16 block minimums (N, nb), else (N, 0) (rebuilt; the kernels read mi)."""
        return qmatmul.unpack_s(self.mi, self.out_features) if self.nb else self.mi

    @property
    def q(self) -> np.ndarray:
        """The quants in the block-transposed order of earlier versions (byte i of block b at i·nb + b; for
        code that reads them directly, e.g. lowrank's export). The kernels use qi (the interleaved layout)."""
        if not self.nb:
            return self.qn
        qn = self.qn
        N, w = qn.shape
        return np.ascontiguousarray(qn.reshape(N, self.nb, w // self.nb).transpose(0, 2, 1)).reshape(N, w)

    @property
    def _tag(self):
        """The ISA path for this matrix (the interleaved kernels take any number of blocks)."""
        return isa.tag()

    @classmethod
    def concat(cls, parts: list["Quant"]) -> "Quant":
        """Stack matrices of one format along their outputs (fused Q/K/V, gate/up)."""
        out = object.__new__(cls)
        out.__dict__.update(parts[0].__dict__)
        out.__dict__.pop("_bufs", None)
        if not out.nb:
            out._qn = np.concatenate([p.qn for p in parts])
            out.di = out.mi = np.zeros((len(out._qn), 0), np.uint16)
        elif all(p.out_features % qmatmul.ROWS == 0 for p in parts[:-1]):  # whole groups: stacked as they are
            out.qi, out.di, out.mi = (np.concatenate([getattr(p, k) for p in parts]) for k in ("qi", "di", "mi"))
        else:  # a part ends inside a group: repacked from GGUF's order
            n, nb = sum(p.out_features for p in parts), out.nb
            qn = np.concatenate([p.qn for p in parts])
            out.qi, out.di, out.mi = qmatmul.pack(qn.reshape(n, nb, -1), np.concatenate([p.d for p in parts]),
                                                  np.concatenate([p.m for p in parts]))
        out.out_features = sum(p.out_features for p in parts)
        out.bias = None  # make_linear sets the stacked bias
        return out

    def _act_buffers(self, T: int):
        """int8 activations, their block scales (×8 lanes), sums and correction factors for T positions:
        allocated once per T."""
        bufs = self.__dict__.get("_bufs")
        if bufs is None or len(bufs[0]) < T:  # grown to the next power of two: a few sizes over any prompt mix
            n = 1 << (T - 1).bit_length()
            bufs = self._bufs = (np.empty((n, self.in_features), np.int8), np.empty((n, self.nb * 8), np.float32),
                                 np.empty((n, self.nb), np.float32), np.empty((n, self.nb), np.float32))
        return tuple(b[:T] for b in bufs)

    def _correction(self, xs, xk, exact=False):
        """(h, xk) of the second term: Q4_1 m·Σx; Q4_0 −8·d·Σx on the exact (float) path, none on the int8 one
        (matmul_q keeps Q4_0's −8 in the integer sums when h has no columns); none for Q8_0."""
        if self.qtype == "Q4_0" and exact:
            np.multiply(xs, np.float32(-8.0), out=xk)
            return self.di, xk
        return self.mi, xs

    def forward(self, x, out):
        T = x.shape[0]
        n = numba.get_num_threads()
        if T < self.GEMM_MIN_ROWS and self.nb and self.exact:
            xs = x.reshape(T, self.nb, 32).sum(axis=2, dtype=np.float32)
            h, xk = self._correction(xs, np.empty_like(xs), exact=True)
            qmatmul.matmul_q_exact(self._tag, np.ascontiguousarray(x), xk, self.qi, self.di, h, out, n)
        elif self.nb and not self.exact:
            xq, xde, xs, xk = self._act_buffers(T)
            qmatmul.quantize_x(x, xq, xde, xs)
            h, xk = self._correction(xs, xk)
            qmatmul.matmul_q(self._tag, xq, xde, xk, self.qi, self.di, h, out, n)
        elif T < self.GEMM_MIN_ROWS:
            qmatmul.matmul_half(self._tag, np.ascontiguousarray(x), self._qn, self.qtype == "BF16", out, n)
        elif not self.nb and gemm.USE:
            gemm.gemm_half(np.ascontiguousarray(x), self._qn, self.qtype == "BF16", out, n)
        else:
            split_rows(self.out_features, lambda a, b: self._gemm(x, out, a, b))
        if self.bias is not None:
            out += self.bias
        return out

    def _gemm(self, x, out, a, b):
        w = np.empty((min(self.TILE, b - a), self.in_features), np.float32)
        for r in range(a, b, self.TILE):
            e = min(b, r + self.TILE)
            self._dequantize_natural(r, e, w)
            np.matmul(x, w[:e - r].T, out=out[:, r:e])

    def _dequantize_natural(self, a: int, b: int, w: np.ndarray) -> None:
        """Rows a..b−1 as float32 into w, in natural column order."""
        if self.nb:
            qmatmul.dequantize_i(self.qi, self.di, self.mi, a, b, w)
        else:
            qmatmul.dequantize_half(self._qn, self.qtype == "BF16", a, b, w)

    def _dequantize(self, a: int, b: int, w: np.ndarray) -> None:
        """Rows a..b−1 in the block-transposed column order of earlier versions (gpu.float_matrix undoes it)."""
        self._dequantize_natural(a, b, w)
        if self.nb:
            n = b - a
            w[:n] = w[:n].reshape(n, self.nb, 32).transpose(0, 2, 1).reshape(n, -1)

    def rows(self, ids) -> np.ndarray:
        """Selected rows as float32 in natural column order (a tied head serves as the embedding table)."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        w = np.empty((len(ids), self.in_features), np.float32)
        self._dequantize_rows(ids, w)  # one compiled call (a Python call per row cost ~20 µs each)
        return w

    def _dequantize_rows(self, ids: np.ndarray, w: np.ndarray) -> None:
        if self.nb:
            qmatmul.dequantize_rows_i(self.qi, self.di, self.mi, ids, w)
        else:
            qmatmul.dequantize_rows_half(self._qn, self.qtype == "BF16", ids, w)

    def dequantized(self) -> np.ndarray:
        """The float32 matrix in natural column order (for tests and exports)."""
        return self.rows(np.arange(self.out_features))

    @property
    def nbytes(self) -> int:
        q = self.qi if self.nb else self._qn
        return q.nbytes + self.di.nbytes + self.mi.nbytes + (0 if self.bias is None else self.bias.nbytes)


def make_linear(ws: list[Tensor], bs: list[Tensor | None] | None = None, dequantize: bool = False,
                exact: bool = False) -> Linear:
    """The Linear for matrices stacked along their outputs: kept in their stored format when they share
    one that has kernels, else float32. exact: float32 activations in the quantized decode kernels."""
    qtypes = {t.qtype for t in ws}
    if not dequantize and all(KQuant.fits(t) or (t.qtype in Quant.FORMATS and t.shape[1] % 32 == 0) for t in ws):
        if qtypes <= set(KQuant.FORMATS) or len(qtypes) > 1:  # K-quants; mixed formats: each part its own kernel
            parts = [KQuant(t, exact=exact) if t.qtype in KQuant.FORMATS else Quant(t, exact=exact) for t in ws]
            lin = parts[0] if len(parts) == 1 else KQuant.concat(parts) if len(qtypes) == 1 else Stacked(parts)
            lin.bias = stacked_bias(ws, bs)
            return lin
    if dequantize or len(qtypes) != 1 or next(iter(qtypes)) not in Quant.FORMATS or ws[0].shape[1] % 32:
        return Dense.from_tensors(ws, bs)
    parts = [Quant(t, exact=exact) for t in ws]
    q = parts[0] if len(parts) == 1 else Quant.concat(parts)
    q.bias = stacked_bias(ws, bs)
    return q


class KQuant(Linear):
    """A matrix in a K-quant or 5-bit format (Q2_K … Q6_K, Q5_0, Q5_1), each row its stored bytes (no float32 copy).

    minirt/cpu/kquants.py's kernels run at any number of positions with int8 activations (as llama.cpp's
    vec_dot_qK_q8_K), each weight block loaded once for several positions. With exact=True (float32
    activations) they run up to Quant.GEMM_MIN_ROWS − 1 positions; more dequantize tiles of rows (the gguf
    package's arithmetic) and multiply them with BLAS."""

    FORMATS = kquants.FORMATS

    @classmethod
    def fits(cls, t: Tensor) -> bool:
        return t.qtype in cls.FORMATS and len(t.shape) == 2 and t.shape[1] % cls.FORMATS[t.qtype][1] == 0

    def __init__(self, t: Tensor, bias: np.ndarray | None = None, exact: bool = False):
        self.qtype, self.exact = t.qtype, exact
        _, per, size = self.FORMATS[t.qtype]
        N, K = t.shape
        self.out_features, self.in_features = N, K
        self.bias = None if bias is None else np.ascontiguousarray(bias, dtype=np.float32)
        self.q = np.array(np.asarray(t.data).reshape(N, K // per * size), np.uint8)  # a copy: the file is unmapped
        self.fmt = kquants.FORMAT_TAGS[t.qtype]

    @classmethod
    def concat(cls, parts: list["KQuant"]) -> "KQuant":
        """Stack matrices of one format along their outputs (fused Q/K/V, gate/up)."""
        out = object.__new__(cls)
        out.__dict__.update(parts[0].__dict__)
        out.__dict__.pop("_bufs", None)
        out.q = np.concatenate([p.q for p in parts])
        out.out_features = sum(p.out_features for p in parts)
        out.bias = None
        return out

    @property
    def _tag(self):
        tag = isa.tag()  # 2-block steps (avx512vnni) need an even number of blocks
        return isa.tag("avxvnni") if (self.in_features // 32) % 2 and isa.TAGS["avx512vnni"] is tag else tag

    def _buffers(self, T: int):
        """int8 activations, their scales over 8 lanes, sums per 16, and the threads' row-scale scratch."""
        bufs = self.__dict__.get("_bufs")
        n = numba.get_num_threads()
        if bufs is None or len(bufs[0]) < T or len(bufs[3]) != n:  # rows grown to the next power of two
            K, r = self.in_features, 1 << (T - 1).bit_length()
            bufs = self._bufs = (np.empty((r, K), np.int8), np.empty((r, K // 4), np.float32),
                                 np.empty((r, K // 16), np.float32), np.empty((n, 2, K // 16), np.float32))
        return bufs[0][:T], bufs[1][:T], bufs[2][:T], bufs[3]

    def forward(self, x, out):
        T = x.shape[0]
        if T < Quant.GEMM_MIN_ROWS or not self.exact:
            xq, xde, xs16, scratch = self._buffers(T)
            if self.exact:
                x = np.ascontiguousarray(x)
                kquants.sums16(x, xs16)
                kquants.matmul_k_exact(self._tag, self.fmt, x, xs16, self.q, scratch, out)
            else:
                kquants.quantize_x(x, xq, xde, xs16)
                kquants.matmul_k(self._tag, self.fmt, xq, xde, xs16, self.q, scratch, out)
        else:
            split_rows(self.out_features, lambda a, b: self._gemm(x, out, a, b))
        if self.bias is not None:
            out += self.bias
        return out

    TILE = Quant.TILE
    _gemm = Quant._gemm  # dequantized tiles and BLAS, through _dequantize_natural

    def _dequantize_natural(self, a: int, b: int, w: np.ndarray) -> None:
        kquants.dequantize(self.fmt, self.q, a, b, w)

    def _dequantize_rows(self, ids: np.ndarray, w: np.ndarray) -> None:
        kquants.dequantize_rows(self.fmt, self.q, ids, w)

    rows = Quant.rows  # selected rows as float32 (a tied head serves as the embedding table)

    def dequantized(self) -> np.ndarray:
        w = np.empty((self.out_features, self.in_features), np.float32)
        kquants.dequantize(self.fmt, self.q, 0, self.out_features, w)
        return w

    @property
    def nbytes(self) -> int:
        return self.q.nbytes + (0 if self.bias is None else self.bias.nbytes)


class Stacked(Linear):
    """Matrices of different stored formats stacked along their outputs (a Q4_K_M's Q/K/V may mix Q5_0 and Q8_0):
    each part runs its own kernel into its slice of the output."""

    def __init__(self, parts: list[Linear]):
        self.parts = parts
        self.in_features = parts[0].in_features
        self.out_features = sum(p.out_features for p in parts)
        self.bias = None
        self.qtype = "+".join(getattr(p, "qtype", "?") for p in parts)

    def forward(self, x, out):
        a = 0
        for p in self.parts:
            p.forward(x, out[:, a:a + p.out_features])
            a += p.out_features
        if self.bias is not None:
            out += self.bias
        return out

    def dequantized(self) -> np.ndarray:
        return np.concatenate([p.dequantized() for p in self.parts])

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.parts) + (0 if self.bias is None else self.bias.nbytes)
