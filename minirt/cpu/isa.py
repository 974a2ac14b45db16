"""ISA primitives for the CPU kernels: Numba @intrinsics that emit LLVM IR, one code path per instruction set.

Paths, lowest first (MINIRT_ISA forces one; the default is the highest the host has):
    portable    plain LLVM vector IR (zext/sext, mul, add): runs anywhere, ARM included
    avx2        vpmaddubsw + vpmaddwd (u8×s8 → i16 pairs → i32), llama.cpp's AVX2 arithmetic
    avxvnni     vpdpbusd on 256 bits (AVX-VNNI, or AVX-512 VNNI+VL: the same LLVM intrinsic)
    avx512vnni  vpdpbusd on 512 bits: two blocks of 32 per instruction

The path is a tag (tag(): an empty array whose dtype names the path) passed to every kernel as its first
argument: each path is its own compiled specialization (its own entry in Numba's on-disk cache), and a path the host lacks is never compiled (an
AVX-512 intrinsic on a machine without AVX-512 aborts LLVM). The kernels see these values:
    Vec('u8'|'i8', 32·G)  weight / activation bytes of G blocks (G = 1, or 2 on avx512vnni)
    Vec('i32', 8·G)       lane i = Σ of bytes 4i..4i+3 products: 8 lanes per block
    Vec('f32', 8·G)       float lanes in the same grouping
"""
from __future__ import annotations

import os

import llvmlite.binding as llb
from llvmlite import ir
from numba import types
import numpy as np
from numba.extending import intrinsic, models, register_model

from ..errors import MinirtError

PATHS = ("portable", "avx2", "avxvnni", "avx512vnni")
ENV = "MINIRT_ISA"


def host_paths(features: dict | None = None) -> list[str]:
    """The paths this CPU can run, lowest first (from llvmlite's host features)."""
    f = llb.get_host_cpu_features() if features is None else features
    ok = ["portable"]
    if f.get("avx2") and f.get("fma") and f.get("f16c"):
        ok.append("avx2")
        if f.get("avxvnni") or (f.get("avx512vnni") and f.get("avx512vl")):
            ok.append("avxvnni")
        if f.get("avx512vnni") and f.get("avx512bw") and f.get("avx512vl") and f.get("avx512f"):
            ok.append("avx512vnni")
    return ok


def choose(env: str | None = None, available: list[str] | None = None) -> str:
    """The path to run: the host's best, or the lower one MINIRT_ISA names."""
    available = host_paths() if available is None else available
    want = (os.environ.get(ENV, "") if env is None else env).strip().lower()
    if not want:
        return available[-1]
    if want not in PATHS:
        raise MinirtError(f"{ENV}={want!r} is not a path; use one of {', '.join(PATHS)}")
    if want not in available:
        raise MinirtError(f"{ENV}={want}: this CPU cannot run it; use one of {', '.join(available)}")
    return want


# ---- the tag: a value whose Numba type names the path, so that each path is a separate compiled specialization.
# An empty array of a distinct dtype per path: the dispatcher types arrays in C (a custom Python type would
# cost a Python typeof on every kernel call).
TAG_DTYPES = {"portable": np.int8, "avx2": np.int16, "avxvnni": np.int32, "avx512vnni": np.int64}
TAGS = {p: np.empty(0, dt) for p, dt in TAG_DTYPES.items()}
_BY_DTYPE = {str(np.dtype(dt)): p for p, dt in TAG_DTYPES.items()}


def path_of(t) -> str | None:
    """The path a tag stands for: t is a tag (array) or its Numba type; None if it is not a tag."""
    if isinstance(t, np.ndarray):
        return _BY_DTYPE.get(str(t.dtype)) if t.shape == (0,) else None
    if isinstance(t, types.Array) and t.ndim == 1:
        return _BY_DTYPE.get(str(t.dtype))
    return None


def tag(path: str | None = None) -> np.ndarray:
    """The value to pass as the kernels' first argument for a path (default: the one chosen at import)."""
    return TAGS[path or SELECTED]


def _blocks(t) -> int:  # blocks of 32 per vector step
    return 2 if path_of(t) == "avx512vnni" else 1


SELECTED = choose()  # once, at import


# ---- vector values ------------------------------------------------------------------------------------
_ELEM = {"u8": ir.IntType(8), "i8": ir.IntType(8), "i16": ir.IntType(16), "i32": ir.IntType(32),
         "f32": ir.FloatType()}


class Vec(types.Type):
    def __init__(self, kind: str, n: int):
        self.kind, self.n = kind, n
        super().__init__(name=f"Vec({kind}x{n})")


def _lt(kind: str, n: int) -> ir.VectorType:
    return ir.VectorType(_ELEM[kind], n)


@register_model(Vec)
class _VecModel(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, _lt(fe_type.kind, fe_type.n))


FAST = ("contract",)  # was "fast": reassociation let LLVM sum a 1-position kernel in another order than a 4-position one
CONTRACT = ("contract",)  # fused multiply-adds, no reordering: the same bits for a position at any T
I8, I16, I32, F32 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.FloatType()


def _call(b: ir.IRBuilder, name: str, ret, args):
    fnty = ir.FunctionType(ret, [a.type for a in args])
    fn = b.module.globals.get(name) or ir.Function(b.module, fnty, name)
    return b.call(fn, args)


def _splat(ty: ir.VectorType, v) -> ir.Constant:
    return ir.Constant(ty, [ir.Constant(ty.element, v)] * ty.count)


def _ptr(ctx, b, aty, arr, off, vty):
    """Pointer to element off of a 1-D array, as a pointer to vty."""
    a = ctx.make_array(aty)(ctx, b, arr)
    return b.bitcast(b.gep(a.data, [off]), vty.as_pointer())


def _shuffle(b, v, w, mask):
    return b.shuffle_vector(v, w, ir.Constant(ir.VectorType(I32, len(mask)), mask))


def _group4(b, v, n_out, add):
    """Lane i = v[4i] + v[4i+1] + v[4i+2] + v[4i+3]."""
    parts = [_shuffle(b, v, v, [4 * i + k for i in range(n_out)]) for k in range(4)]
    return add(add(parts[0], parts[1]), add(parts[2], parts[3]))


def _is_int_tag(t):
    return path_of(t) is not None


# ---- primitives -----------------------------------------------------------------------------------------
@intrinsic
def blocks_per_step(typingctx, isa):
    """G: blocks of 32 per vector step (2 on avx512vnni)."""
    if not _is_int_tag(isa):
        return None
    g = _blocks(isa)

    def cg(ctx, b, sig, args):
        return ir.Constant(ir.IntType(64), g)
    return types.intp(isa), cg


@intrinsic
def fzero(typingctx, isa):
    """Float accumulator lanes (8·G), zero."""
    if not _is_int_tag(isa):
        return None
    n = 8 * _blocks(isa)

    def cg(ctx, b, sig, args):
        return ir.Constant(_lt("f32", n), None)
    return Vec("f32", n)(isa), cg


@intrinsic
def wload(typingctx, isa, q, b):
    """Weights of blocks b..b+G−1 of one row q (1-D), as bytes in the order of the values they stand for.
    int8 q (Q8_0): 32 int8 per block, as stored. uint8 q (Q4_0/Q4_1): 16 bytes per block, value i in the
    low nibble of byte i and value 16+i in the high nibble (GGUF's layout), unpacked to 32 values 0..15."""
    if not _is_int_tag(isa) or not isinstance(q, types.Array):
        return None
    g = _blocks(isa)
    nib = q.dtype == types.uint8

    def cg(ctx, bld, sig, args):
        _, arr, blk = args
        if not nib:
            off = bld.mul(blk, ir.Constant(blk.type, 32))
            return bld.load(_ptr(ctx, bld, sig.args[1], arr, off, _lt("i8", 32 * g)), align=1)
        off = bld.mul(blk, ir.Constant(blk.type, 16))
        v = bld.load(_ptr(ctx, bld, sig.args[1], arr, off, _lt("u8", 16 * g)), align=1)
        lo = bld.and_(v, _splat(v.type, 15))
        hi = bld.lshr(v, _splat(v.type, 4))
        mask = []
        for k in range(g):
            mask += list(range(16 * k, 16 * k + 16)) + list(range(16 * g + 16 * k, 16 * g + 16 * k + 16))
        return _shuffle(bld, lo, hi, mask)
    return Vec("i8" if not nib else "u8", 32 * g)(isa, q, b), cg


@intrinsic
def xload(typingctx, isa, x, off):
    """32·G int8 activations from x[off:] (1-D)."""
    if not _is_int_tag(isa):
        return None
    n = 32 * _blocks(isa)

    def cg(ctx, b, sig, args):
        return b.load(_ptr(ctx, b, sig.args[1], args[1], args[2], _lt("i8", n)), align=1)
    return Vec("i8", n)(isa, x, off), cg


@intrinsic
def fload(typingctx, isa, x, off):
    """8·G float32 values from x[off:] (1-D)."""
    if not _is_int_tag(isa):
        return None
    n = 8 * _blocks(isa)

    def cg(ctx, b, sig, args):
        return b.load(_ptr(ctx, b, sig.args[1], args[1], args[2], _lt("f32", n)), align=4)
    return Vec("f32", n)(isa, x, off), cg


def _dot_portable(b, w, x, signed_w):
    n = w.type.count
    wide = ir.VectorType(I32, n)
    wv = b.sext(w, wide) if signed_w else b.zext(w, wide)
    p = b.mul(wv, b.sext(x, wide))
    return _group4(b, p, n // 4, b.add)


def _dot_avx2(b, w, x):
    """u8 w × s8 x: vpmaddubsw (pairs, i16; |2·15·127| or |2·127·127| fit) then vpmaddwd with ones."""
    p16 = _call(b, "llvm.x86.avx2.pmadd.ub.sw", ir.VectorType(I16, 16), [w, x])
    return _call(b, "llvm.x86.avx2.pmadd.wd", ir.VectorType(I32, 8), [p16, _splat(ir.VectorType(I16, 16), 1)])


def _dot_vnni(b, w, x):
    n = w.type.count
    name = "llvm.x86.avx512.vpdpbusd.512" if n == 64 else "llvm.x86.avx512.vpdpbusd.256"
    acc = ir.Constant(ir.VectorType(I32, n // 4), None)
    return _call(b, name, acc.type, [acc, w, x])


@intrinsic
def dot(typingctx, isa, w, x):
    """Integer dot products of 4-byte groups: lane i = Σ_k w[4i+k]·x[4i+k] (w: u8 nibbles or s8; x: s8)."""
    if not _is_int_tag(isa) or not isinstance(w, Vec) or not isinstance(x, Vec):
        return None
    path, n = path_of(isa), w.n
    signed_w = w.kind == "i8"

    def cg(ctx, b, sig, args):
        _, wv, xv = args
        if path == "portable":
            return _dot_portable(b, wv, xv, signed_w)
        if signed_w:  # s8 × s8 → |w| (u8) × (x with w's sign): llama.cpp's mul_sum_i8_pairs
            neg = b.icmp_signed("<", wv, ir.Constant(wv.type, None))
            if n == 32:
                xv = _call(b, "llvm.x86.avx2.psign.b", xv.type, [xv, wv])
            else:
                xv = b.select(neg, b.sub(ir.Constant(xv.type, None), xv), xv)
            wv = b.select(neg, b.sub(ir.Constant(wv.type, None), wv), wv)
        if path == "avx2":
            return _dot_avx2(b, wv, xv)
        return _dot_vnni(b, wv, xv)
    return Vec("i32", n // 4)(isa, w, x), cg


def _half_to_float(b, h):
    """i16 (vector) IEEE half bits → float. fpext of half: vcvtph2ps with F16C, fcvt on ARM."""
    ty = h.type
    fty = ir.VectorType(ir.HalfType(), ty.count) if isinstance(ty, ir.VectorType) else ir.HalfType()
    oty = ir.VectorType(F32, ty.count) if isinstance(ty, ir.VectorType) else F32
    return b.fpext(b.bitcast(h, fty), oty)


@intrinsic
def dscale(typingctx, isa, d, blk):
    """Block scales d[blk..blk+G−1] (f16 bits, 1-D uint16) as float32, each repeated over its 8 lanes."""
    if not _is_int_tag(isa):
        return None
    g = _blocks(isa)

    def cg(ctx, b, sig, args):
        h = b.load(_ptr(ctx, b, sig.args[1], args[1], args[2], ir.VectorType(I16, g)), align=2)
        f = _half_to_float(b, h)
        return _shuffle(b, f, f, [k for k in range(g) for _ in range(8)])
    return Vec("f32", 8 * g)(isa, d, blk), cg


@intrinsic
def half(typingctx, h):
    """One f16 (uint16 bits) → float32."""
    if not isinstance(h, types.Integer):
        return None

    def cg(ctx, b, sig, args):
        return _half_to_float(b, b.trunc(args[0], I16) if args[0].type.width > 16 else args[0])
    return types.float32(h), cg


@intrinsic
def bfloat(typingctx, h):
    """One bfloat16 (uint16 bits) → float32: the upper half of a float32."""
    if not isinstance(h, types.Integer):
        return None

    def cg(ctx, b, sig, args):
        v = args[0]
        u = b.zext(v, I32) if v.type.width < 32 else b.trunc(v, I32) if v.type.width > 32 else v
        return b.bitcast(b.shl(b.and_(u, ir.Constant(I32, 0xFFFF)), ir.Constant(I32, 16)), F32)
    return types.float32(h), cg


@intrinsic
def fma_acc(typingctx, acc, s, xs, ds):
    """acc + float(s)·xs·ds   (s: i32 lanes; xs, ds: float lanes)."""
    if not isinstance(acc, Vec):
        return None

    def cg(ctx, b, sig, args):
        a, sv, x, d = args
        f = b.sitofp(sv, a.type) if isinstance(sig.args[1], Vec) and sig.args[1].kind == "i32" else sv
        return b.fadd(a, b.fmul(b.fmul(f, x, flags=FAST), d, flags=FAST), flags=FAST)
    return acc(acc, s, xs, ds), cg


@intrinsic
def fsum(typingctx, v):
    """Σ of float lanes (a tree of adds)."""
    if not isinstance(v, Vec):
        return None

    def cg(ctx, b, sig, args):
        x = args[0]
        n = x.type.count
        while n > 1:
            n //= 2
            x = b.fadd(_shuffle(b, x, x, list(range(n))), _shuffle(b, x, x, list(range(n, 2 * n))), flags=FAST)
        return b.extract_element(x, ir.Constant(I32, 0))
    return types.float32(v), cg


@intrinsic
def fdot(typingctx, isa, w, x, off):
    """Float group-of-4 products of weight values w (u8 nibbles or s8) with float32 x[off:off+32·G]:
    lane i = Σ_k w[4i+k]·x[off+4i+k] in float32 (the exact path: activations are not rounded)."""
    if not _is_int_tag(isa) or not isinstance(w, Vec):
        return None
    n = w.n
    signed_w = w.kind == "i8"

    def cg(ctx, b, sig, args):
        _, wv, arr, o = args
        fty = ir.VectorType(F32, n)
        wf = b.sitofp(wv, fty) if signed_w else b.uitofp(wv, fty)
        xf = b.load(_ptr(ctx, b, sig.args[2], arr, o, fty), align=4)
        p = b.fmul(wf, xf, flags=FAST)
        return _group4(b, p, n // 4, lambda u, v: b.fadd(u, v, flags=FAST))
    return Vec("f32", n // 4)(isa, w, x, off), cg


@intrinsic
def hload(typingctx, isa, q, off, bf16):
    """16-bit floats q[off:off+8·G·2] (uint16, F16 or BF16 by bf16, a literal bool) widened to 16·G float32:
    F16 by fpext (vcvtph2ps), BF16 by a 16-bit shift."""
    if not _is_int_tag(isa) or not isinstance(bf16, types.BooleanLiteral):
        return None
    n = 16 * _blocks(isa)
    is_bf = bf16.literal_value

    def cg(ctx, b, sig, args):
        h = b.load(_ptr(ctx, b, sig.args[1], args[1], args[2], ir.VectorType(I16, n)), align=2)
        if is_bf:
            u = b.shl(b.zext(h, ir.VectorType(I32, n)), _splat(ir.VectorType(I32, n), 16))
            return b.bitcast(u, ir.VectorType(F32, n))
        return _half_to_float(b, h)
    return Vec("f32", n)(isa, q, off, bf16), cg


def _ptr2(ctx, b, aty, arr, row, off, vty):
    """Pointer to arr[row, off] of a 2-D array whose rows are unit-stride, as a pointer to vty: no view (a row
    view in a loop costs its reference counting, ~20 ns a row in the half kernels)."""
    a = ctx.make_array(aty)(ctx, b, arr)
    st = b.extract_value(a.strides, 0)
    i64 = ir.IntType(64)
    row = b.sext(row, i64) if row.type.width < 64 else row
    off = b.sext(off, i64) if off.type.width < 64 else off
    p = b.gep(b.bitcast(a.data, ir.IntType(8).as_pointer()), [b.mul(row, st)])
    p = b.gep(b.bitcast(p, a.data.type), [off])
    return b.bitcast(p, vty.as_pointer())


@intrinsic
def hload2(typingctx, isa, q, row, off, bf16):
    """As hload from q[row, off:] of a 2-D uint16 array (rows unit-stride)."""
    if not _is_int_tag(isa) or not isinstance(bf16, types.BooleanLiteral) or not isinstance(q, types.Array):
        return None
    n = 16 * _blocks(isa)
    is_bf = bf16.literal_value

    def cg(ctx, b, sig, args):
        h = b.load(_ptr2(ctx, b, sig.args[1], args[1], args[2], args[3], ir.VectorType(I16, n)), align=2)
        if is_bf:
            u = b.shl(b.zext(h, ir.VectorType(I32, n)), _splat(ir.VectorType(I32, n), 16))
            return b.bitcast(u, ir.VectorType(F32, n))
        return _half_to_float(b, h)
    return Vec("f32", n)(isa, q, row, off, bf16), cg


@intrinsic
def fvload2(typingctx, isa, x, row, off):
    """16·G float32 values from x[row, off:] of a 2-D array (rows unit-stride)."""
    if not _is_int_tag(isa) or not isinstance(x, types.Array):
        return None
    n = 16 * _blocks(isa)

    def cg(ctx, b, sig, args):
        return b.load(_ptr2(ctx, b, sig.args[1], args[1], args[2], args[3], _lt("f32", n)), align=4)
    return Vec("f32", n)(isa, x, row, off), cg


def _sum16_masks():
    """Shuffle masks of sum16x16's levels: each level adds the low and high halves of every group of partial sums
    of two vectors, so that after 4 levels lane i holds the total of vector i."""
    masks, s = [], 16
    while s > 1:
        h, lo, hi = s // 2, [], []
        for src in range(2):
            for g in range(16 // s):
                base = 16 * src + g * s
                lo += list(range(base, base + h))
                hi += list(range(base + h, base + s))
        masks.append((lo, hi))
        s = h
    return masks


@intrinsic
def sum16x16(typingctx, v0, v1, v2, v3, v4, v5, v6, v7, v8, v9, v10, v11, v12, v13, v14, v15):
    """The totals of 16 vectors of 16 float lanes, as one vector (lane i = Σ of vector i): 15 shuffle-pair adds,
    where 16 separate horizontal sums take 64 (the GEMM block's reduction)."""
    vs = (v0, v1, v2, v3, v4, v5, v6, v7, v8, v9, v10, v11, v12, v13, v14, v15)
    if not all(isinstance(v, Vec) and v.n == 16 and v.kind == "f32" for v in vs):
        return None
    masks = _sum16_masks()

    def cg(ctx, b, sig, args):
        cur = list(args)
        for lo, hi in masks:
            cur = [b.fadd(_shuffle(b, cur[i], cur[i + 1], lo), _shuffle(b, cur[i], cur[i + 1], hi), flags=FAST)
                   for i in range(0, len(cur), 2)]
        return cur[0]
    return Vec("f32", 16)(*vs), cg


@intrinsic
def fstore4(typingctx, out, row, col, v, i):
    """out[row, col:col+4] = lanes 4i..4i+3 of v (16 float lanes; out 2-D float32 with unit-stride rows; i a
    literal int)."""
    if not isinstance(v, Vec) or not isinstance(i, types.IntegerLiteral) or not isinstance(out, types.Array):
        return None
    k = i.literal_value

    def cg(ctx, b, sig, args):
        o, r, c, vv, _ = args
        q = _shuffle(b, vv, vv, [4 * k + m for m in range(4)])
        b.store(q, _ptr2(ctx, b, sig.args[0], o, r, c, q.type), align=4)
        return ctx.get_dummy_value()
    return types.none(out, row, col, v, i), cg


@intrinsic
def lane(typingctx, v, i):
    """Lane i of float lanes v."""
    if not isinstance(v, Vec) or not isinstance(i, types.Integer):
        return None

    def cg(ctx, b, sig, args):
        return b.extract_element(args[0], args[1])
    return types.float32(v, i), cg


@intrinsic
def fvload(typingctx, isa, x, off):
    """16·G float32 values from x[off:] (1-D)."""
    if not _is_int_tag(isa):
        return None
    n = 16 * _blocks(isa)

    def cg(ctx, b, sig, args):
        return b.load(_ptr(ctx, b, sig.args[1], args[1], args[2], _lt("f32", n)), align=4)
    return Vec("f32", n)(isa, x, off), cg


@intrinsic
def fzero16(typingctx, isa):
    if not _is_int_tag(isa):
        return None
    n = 16 * _blocks(isa)

    def cg(ctx, b, sig, args):
        return ir.Constant(_lt("f32", n), None)
    return Vec("f32", n)(isa), cg


@intrinsic
def fmadd(typingctx, acc, a, c):
    """acc + a·c, float lanes."""
    if not isinstance(acc, Vec):
        return None

    def cg(ctx, b, sig, args):
        return b.fadd(args[0], b.fmul(args[1], args[2], flags=FAST), flags=FAST)
    return acc(acc, a, c), cg


@intrinsic
def fadd(typingctx, a, c):
    """a + c, float lanes."""
    if not isinstance(a, Vec):
        return None

    def cg(ctx, b, sig, args):
        return b.fadd(args[0], args[1], flags=FAST)
    return a(a, c), cg


@intrinsic
def isum(typingctx, v):
    """Σ of int32 lanes (for tests: the integers a path computes)."""
    if not isinstance(v, Vec) or v.kind != "i32":
        return None

    def cg(ctx, b, sig, args):
        return _call(b, f"llvm.vector.reduce.add.v{v.n}i32", I32, [args[0]])
    return types.int32(v), cg


# ---- the interleaved layout (qmatmul's kernels): 16 rows per group, lane r of a vector = row r ------------
# Per group of 16 rows and block of 32 values, k-group c (values 4c..4c+3 of the block) of the 16 rows lies in
# 64 bytes, row r at bytes 4r..4r+3: Q8_0 as int8 at 64·c; Q4_* as nibbles, k-groups c and c+4 in the low and high
# nibbles of the bytes at 64·c (c < 4: GGUF's byte 4c+k of a block holds values 4c+k and 16+4c+k). A path with
# 16 int32 lanes (avx512vnni) takes a group at once; the others (8 lanes) take it in halves of 8 rows (bytes
# 32·h.. of each 64). Activations enter as a 4-byte k-group broadcast to every lane.
def _lanes(t) -> int:
    return 16 if path_of(t) == "avx512vnni" else 8


@intrinsic
def sum_offset(typingctx, isa, q, no_h):
    """Where a block's integer sums start, per unit of Σx (the block's int8 activations), for bdots' bias:
    −128 for Q8_0 (int8 q) on the VNNI paths (its weights enter as w + 128), −8 for Q4_0 (uint8 q without a
    second term, no_h: its −8 offset kept in the integers, as llama.cpp's q4_0·q8_0), else 0."""
    if not _is_int_tag(isa) or not isinstance(q, types.Array):
        return None
    q8 = q.dtype == types.int8
    v = -128 if path_of(isa) in ("avxvnni", "avx512vnni") and q8 else 0

    def cg(ctx, b, sig, args):
        if q8:
            return ir.Constant(I32, v)
        return b.select(args[2], ir.Constant(I32, -8), ir.Constant(I32, 0))
    return types.int32(isa, q, types.boolean), cg


@intrinsic
def lanes(typingctx, isa):
    """L: rows per vector of the interleaved kernels (16 on avx512vnni, else 8)."""
    if not _is_int_tag(isa):
        return None
    n = _lanes(isa)

    def cg(ctx, b, sig, args):
        return ir.Constant(ir.IntType(64), n)
    return types.intp(isa), cg


def _kgroup(ctx, b, aty, arr, base, c, n, q8):
    """k-group c of a block whose bytes start at base: 4·n bytes, lane r = row r, as value bytes."""
    chunk = c if q8 else c % 4
    off = b.add(base, ir.Constant(base.type, 64 * chunk))
    v = b.load(_ptr(ctx, b, aty, arr, off, _lt("u8", 4 * n)), align=1)
    if q8:
        return v
    if c >= 4:  # the high nibbles: a 16-bit shift and the mask (vpsrlw + vpand: a byte shift is vgf2p8affineqb on
        w = b.bitcast(v, ir.VectorType(I16, 2 * n))  # the multiply ports, which vpdpbusd needs)
        v = b.bitcast(b.lshr(w, _splat(w.type, 4)), v.type)
    return b.and_(v, _splat(v.type, 15))


def _xbcast(ctx, b, aty, arr, off, n):
    """The 4 int8 activations at arr[off:off+4] in every one of n lanes."""
    v = b.load(_ptr(ctx, b, aty, arr, off, ir.VectorType(I32, 1)), align=1)
    return b.bitcast(_shuffle(b, v, v, [0] * n), _lt("i8", 4 * n))


def _xbcast2(ctx, b, aty, arr, row, off, n):
    """As _xbcast from row `row` of a 2-D C-contiguous int8 array."""
    a = ctx.make_array(aty)(ctx, b, arr)
    st = b.extract_value(a.strides, 0)
    p = b.gep(a.data, [b.add(b.mul(row, st), off)])
    v = b.load(b.bitcast(p, ir.VectorType(I32, 1).as_pointer()), align=1)
    return b.bitcast(_shuffle(b, v, v, [0] * n), _lt("i8", 4 * n))


def _elem2(ctx, b, aty, arr, row, col):
    """arr[row, col] of a 2-D C-contiguous array."""
    a = ctx.make_array(aty)(ctx, b, arr)
    st = b.extract_value(a.shape, 1)
    return b.load(b.gep(a.data, [b.add(b.mul(row, st), col)]))


@intrinsic
def bdots(typingctx, isa, q, base, xq, t, nt, xo, bias, blk, n_pos):
    """Integer dot products of one block of a group (rows in lanes) with the int8 activations of n_pos positions
    t, t+1, … of xq (2-D; positions past t+nt−1 repeat t+nt−1): a tuple of n_pos int32 lane vectors, lane r =
    bias[t, blk] + Σ_i q[r, i]·xq[t, xo + i] over the block's 32 values. q: the group's bytes (1-D, int8 Q8_0 or
    uint8 nibbles), base: the block's first byte (plus 32·h for half h on 8-lane paths). bias (int32 (T, nb),
    sum_offset·Σx): Q8_0's weights enter the VNNI paths as w ^ 0x80 = w + 128 (unsigned), their sums start at
    −128·Σx; Q4_0's at −8·Σx (its offset kept in the integers). Each weight k-group, loaded and unpacked once,
    goes to every position before the next; calls at the same base share the weight loads (LLVM's GVN), which
    is how the kernels use it (n_pos = 1: the positions' chains one after another measured the same as
    interleaved, and 8 at once computes the unused ones at 5-7 positions). n_pos: a literal int."""
    if not _is_int_tag(isa) or not isinstance(q, types.Array) or not isinstance(n_pos, types.IntegerLiteral):
        return None
    path, n = path_of(isa), _lanes(isa)
    q8 = q.dtype == types.int8
    N = n_pos.literal_value
    vt = Vec("i32", n)

    def cg(ctx, b, sig, args):
        _, qa, base_, xa, t_, nt_, xo_, ba, blk_, _n = args
        i64 = ir.IntType(64)
        t_ = b.sext(t_, i64) if t_.type.width < 64 else t_
        last = b.sub(b.add(t_, nt_ if nt_.type.width == 64 else b.sext(nt_, i64)), ir.Constant(i64, 1))
        rows = [b.select(b.icmp_signed("<", b.add(t_, ir.Constant(i64, k)), last),
                         b.add(t_, ir.Constant(i64, k)), last) if k else t_ for k in range(N)]
        zero = ir.Constant(_lt("i32", n), None)
        accs = []
        for k in range(N):
            s = _elem2(ctx, b, sig.args[7], ba, rows[k], blk_)
            s = b.trunc(s, I32) if s.type.width > 32 else s
            v = b.insert_element(zero, s, ir.Constant(I32, 0))
            accs.append(_shuffle(b, v, v, [0] * n))
        p16 = [None] * N
        for c in (0, 4, 1, 5, 2, 6, 3, 7) if not q8 else range(8):
            w = _kgroup(ctx, b, sig.args[1], qa, base_, c, n, q8)
            xoff = b.add(xo_, ir.Constant(xo_.type, 4 * c))
            if q8 and path in ("avxvnni", "avx512vnni"):
                w = b.xor(w, _splat(w.type, 0x80))
            wneg = b.icmp_signed("<", w, ir.Constant(w.type, None)) if q8 and path == "avx2" else None
            wabs = b.select(wneg, b.sub(ir.Constant(w.type, None), w), w) if wneg is not None else None
            for k in range(N):
                xv = _xbcast2(ctx, b, sig.args[3], xa, rows[k], xoff, n)
                if path == "portable":
                    wide = ir.VectorType(I32, 4 * n)
                    p = b.mul(b.sext(w, wide) if q8 else b.zext(w, wide), b.sext(xv, wide))
                    accs[k] = b.add(accs[k], _group4(b, p, n, b.add))
                elif path == "avx2" and q8:
                    xs = _call(b, "llvm.x86.avx2.psign.b", xv.type, [xv, w])
                    accs[k] = b.add(accs[k], _dot_avx2(b, wabs, xs))
                elif path == "avx2":  # nibbles: 8 pair sums ≤ 8·2·15·127 < 2¹⁵, one vpmaddwd per block
                    pp = _call(b, "llvm.x86.avx2.pmadd.ub.sw", ir.VectorType(I16, 16), [w, xv])
                    p16[k] = pp if p16[k] is None else b.add(p16[k], pp)
                else:
                    name = "llvm.x86.avx512.vpdpbusd.512" if n == 16 else "llvm.x86.avx512.vpdpbusd.256"
                    accs[k] = _call(b, name, accs[k].type, [accs[k], w, xv])
        if path == "avx2" and not q8:
            accs = [b.add(accs[k], _call(b, "llvm.x86.avx2.pmadd.wd", ir.VectorType(I32, 8),
                                         [p16[k], _splat(ir.VectorType(I16, 16), 1)])) for k in range(N)]
        return ctx.make_tuple(b, sig.return_type, accs)
    return types.UniTuple(vt, N)(isa, q, base, xq, t, nt, xo, bias, blk, n_pos), cg


@intrinsic
def bdotf(typingctx, isa, q, base, x, xo):
    """As bdot with float32 activations x[xo:xo+32] (the exact path): float products, float lanes."""
    if not _is_int_tag(isa) or not isinstance(q, types.Array):
        return None
    n = _lanes(isa)
    q8 = q.dtype == types.int8

    def cg(ctx, b, sig, args):
        _, qa, base_, xa, xo_ = args
        fty = ir.VectorType(F32, 4 * n)
        acc = ir.Constant(_lt("f32", n), None)
        for c in range(8):
            w = _kgroup(ctx, b, sig.args[1], qa, base_, c, n, q8)
            wf = b.sitofp(w, fty) if q8 else b.uitofp(w, fty)
            x4 = b.load(_ptr(ctx, b, sig.args[3], xa, b.add(xo_, ir.Constant(xo_.type, 4 * c)),
                             ir.VectorType(F32, 4)), align=4)
            xv = _shuffle(b, x4, x4, [k for _ in range(n) for k in range(4)])
            acc = b.fadd(acc, _group4(b, b.fmul(wf, xv, flags=FAST), n, lambda u, v: b.fadd(u, v, flags=FAST)),
                         flags=FAST)
        return acc
    return Vec("f32", n)(isa, q, base, x, xo), cg


def _bytes(ctx, b, aty, arr):
    """The array's data as a byte pointer."""
    return b.bitcast(ctx.make_array(aty)(ctx, b, arr).data, ir.IntType(8).as_pointer())


def _prefetch(b, ptr, locality):
    """llvm.prefetch of the line at ptr (i8*), for reading: locality 3 to L1 (prefetcht0), 2 to L2 (prefetcht1)."""
    p8 = ir.IntType(8).as_pointer()
    fn = b.module.globals.get("llvm.prefetch.p0i8") or ir.Function(
        b.module, ir.FunctionType(ir.VoidType(), [p8, I32, I32, I32]), "llvm.prefetch.p0i8")
    b.call(fn, [ptr, ir.Constant(I32, 0), ir.Constant(I32, locality), ir.Constant(I32, 1)])


@intrinsic
def prefetch(typingctx, q, off, nbytes):
    """Prefetch (to L1, read) the lines of q's bytes off..off+nbytes (q 1-D; past its end is harmless: a
    prefetch never faults). The interleaved kernels fetch a few KB ahead of the block they compute: at 8
    positions a block's compute outlasts the hardware prefetcher's lead."""
    if not isinstance(q, types.Array) or not isinstance(nbytes, types.IntegerLiteral):
        return None
    n = nbytes.literal_value

    def cg(ctx, b, sig, args):
        base = _bytes(ctx, b, sig.args[0], args[0])
        for k in range(0, n, 64):
            _prefetch(b, b.gep(base, [b.add(args[1], ir.Constant(args[1].type, k))]), 3)
        return ctx.get_dummy_value()
    return types.none(q, off, nbytes), cg


@intrinsic
def prefetch_l2(typingctx, x, off):
    """Prefetch to L2 (prefetcht1) the line of x's byte off (x any array; a prefetch never faults): data wanted a
    while from now, which would crowd L1 out."""
    if not isinstance(x, types.Array) or not isinstance(off, types.Integer):
        return None

    def cg(ctx, b, sig, args):
        _prefetch(b, b.gep(_bytes(ctx, b, sig.args[0], args[0]), [args[1]]), 2)
        return ctx.get_dummy_value()
    return types.none(x, off), cg


@intrinsic
def hvec(typingctx, isa, h, off):
    """L f16 values h[off:off+L] (uint16 bits, 1-D) as float32 lanes (vcvtph2ps)."""
    if not _is_int_tag(isa):
        return None
    n = _lanes(isa)

    def cg(ctx, b, sig, args):
        v = b.load(_ptr(ctx, b, sig.args[1], args[1], args[2], ir.VectorType(I16, n)), align=2)
        return _half_to_float(b, v)
    return Vec("f32", n)(isa, h, off), cg


@intrinsic
def lzero(typingctx, isa):
    """L float lanes, zero."""
    if not _is_int_tag(isa):
        return None
    n = _lanes(isa)

    def cg(ctx, b, sig, args):
        return ir.Constant(_lt("f32", n), None)
    return Vec("f32", n)(isa), cg


def _fsplat(b, s, n):
    v = b.insert_element(ir.Constant(_lt("f32", n), None), s, ir.Constant(I32, 0))
    return _shuffle(b, v, v, [0] * n)


@intrinsic
def fma_is(typingctx, acc, iv, dv, s):
    """acc + float(iv) · (dv · s): int32 lanes iv, float lanes dv, a float32 scalar s."""
    if not isinstance(acc, Vec) or not isinstance(iv, Vec) or not isinstance(s, types.Float):
        return None

    def cg(ctx, b, sig, args):
        a, i, d, sc = args
        f = b.sitofp(i, a.type) if sig.args[1].kind == "i32" else i
        return b.fadd(a, b.fmul(f, b.fmul(d, _fsplat(b, sc, a.type.count), flags=CONTRACT), flags=CONTRACT), flags=CONTRACT)
    return acc(acc, iv, dv, s), cg


@intrinsic
def fma_s(typingctx, acc, v, s):
    """acc + v · s (float lanes v, a float32 scalar s)."""
    if not isinstance(acc, Vec) or not isinstance(s, types.Float):
        return None

    def cg(ctx, b, sig, args):
        a, v, sc = args
        return b.fadd(a, b.fmul(v, _fsplat(b, sc, a.type.count), flags=CONTRACT), flags=CONTRACT)
    return acc(acc, v, s), cg


@intrinsic
def fstore(typingctx, out, off, a, c):
    """out[off:off+L] = a + c (float lanes; out 1-D float32, unit stride)."""
    if not isinstance(a, Vec) or not isinstance(out, types.Array):
        return None

    def cg(ctx, b, sig, args):
        o, off_, av, cv = args
        b.store(b.fadd(av, cv, flags=CONTRACT), _ptr(ctx, b, sig.args[0], o, off_, av.type), align=4)
        return ctx.get_dummy_value()
    return types.none(out, off, a, c), cg


@intrinsic
def fmaf(typingctx, a, c, d):
    """a·c + d rounded once (llvm.fma.f32: vectorized with the loop; never reassociated, as fastmath's a·c + d
    may be)."""
    if not all(isinstance(v, types.Float) for v in (a, c, d)):
        return None

    def cg(ctx, b, sig, args):
        v = [ctx.cast(b, x, t, types.float32) for x, t in zip(args, sig.args)]
        return _call(b, "llvm.fma.f32", F32, v)
    return types.float32(a, c, d), cg


@intrinsic
def f32_bits(typingctx, i):
    """The float32 whose bits are the int32 i."""
    if not isinstance(i, types.Integer):
        return None

    def cg(ctx, b, sig, args):
        v = ctx.cast(b, args[0], sig.args[0], types.int32)
        return b.bitcast(v, F32)
    return types.float32(i), cg


@intrinsic
def absmax32(typingctx, x, off):
    """max |x[off:off+32]| (x 1-D float32, unit stride) as one vector load, fabs and a max tree (plain LLVM IR,
    every path): a loop of max() over the 32 values stays a scalar chain. x must be contiguous (layout C)."""
    if not isinstance(x, types.Array) or x.ndim != 1 or x.layout != "C" or x.dtype != types.float32:
        return None

    def cg(ctx, b, sig, args):
        vty = ir.VectorType(F32, 32)
        v = b.load(_ptr(ctx, b, sig.args[0], args[0], args[1], vty), align=4)
        v = _call(b, "llvm.fabs.v32f32", vty, [v])
        return _call(b, "llvm.vector.reduce.fmax.v32f32", F32, [v])
    return types.float32(x, off), cg


@intrinsic
def round32(typingctx, x, off, inv, out, oo):
    """out[oo:oo+32] = int8(rint(x[off:off+32] · inv)) (round half to even, as np.round; |x · inv| ≤ 127) and
    the sum of those 32 integers, in vectors (plain LLVM IR, every path): the scalar loop was ~1.4 cycles a value.
    x 1-D float32 and out 1-D int8, both contiguous."""
    if not (isinstance(x, types.Array) and x.ndim == 1 and x.layout == "C" and x.dtype == types.float32
            and isinstance(out, types.Array) and out.ndim == 1 and out.layout == "C" and out.dtype == types.int8):
        return None

    def cg(ctx, b, sig, args):
        xa, o, iv, oa, oo_ = args
        vty = ir.VectorType(F32, 32)
        v = b.load(_ptr(ctx, b, sig.args[0], xa, o, vty), align=4)
        v = _call(b, "llvm.rint.v32f32", vty, [b.fmul(v, _fsplat(b, ctx.cast(b, iv, sig.args[2], types.float32), 32))])
        i = b.fptosi(v, ir.VectorType(I32, 32))
        b.store(b.trunc(i, ir.VectorType(ir.IntType(8), 32)), _ptr(ctx, b, sig.args[3], oa, oo_,
                                                                  ir.VectorType(ir.IntType(8), 32)), align=1)
        return _call(b, "llvm.vector.reduce.add.v32i32", I32, [i])
    return types.int32(x, off, inv, out, oo), cg


# ---- 16 float lanes, no path tag: plain LLVM vectors (zmm on AVX-512, two ymm on AVX2, four xmm elsewhere) --
def _c2(x):
    return isinstance(x, types.Array) and x.ndim == 2 and x.layout == "C" and x.dtype == types.float32


@intrinsic
def v16(typingctx, x, row, col):
    """x[row, col:col+16] of a 2-D float32 array whose rows are unit-stride, as one vector of 16 float32 lanes (one
    zmm with AVX-512, two ymm elsewhere): the prompt GEMM's, the F32 decode's and attention's loads. A uint16
    array holds f16 bits (a float16 KV cache): its 16 values are widened (vcvtph2ps with F16C), exactly."""
    if not isinstance(x, types.Array) or x.ndim != 2 or x.dtype not in (types.float32, types.uint16):
        return None
    is_half = x.dtype == types.uint16

    def cg(ctx, b, sig, args):
        if is_half:
            h = b.load(_ptr2(ctx, b, sig.args[0], args[0], args[1], args[2], ir.VectorType(I16, 16)), align=2)
            return _half_to_float(b, h)
        return b.load(_ptr2(ctx, b, sig.args[0], args[0], args[1], args[2], _lt("f32", 16)), align=4)
    return Vec("f32", 16)(x, row, col), cg


@intrinsic
def widen(typingctx, v):
    """A value of a KV cache as float32: a float32 as it is, a uint16 (f16 bits) widened (as half())."""
    if v == types.float32:
        return types.float32(v), lambda ctx, b, sig, args: args[0]
    if v == types.uint16:
        return types.float32(v), lambda ctx, b, sig, args: _half_to_float(b, args[0])
    return None


@intrinsic
def narrow(typingctx, like, v):
    """The float32 v as an element of the array `like` (a KV cache): float32 as it is; for uint16 (f16 bits)
    rounded to the nearest f16, ties to even (fptrunc: vcvtps2ph with F16C), as numpy's astype(np.float16)."""
    if not isinstance(like, types.Array) or not isinstance(v, types.Float):
        return None
    if like.dtype == types.float32:
        return types.float32(like, v), lambda ctx, b, sig, args: ctx.cast(b, args[1], sig.args[1], types.float32)
    if like.dtype != types.uint16:
        return None

    def cg(ctx, b, sig, args):
        f = ctx.cast(b, args[1], sig.args[1], types.float32)
        return b.bitcast(b.fptrunc(f, ir.HalfType()), I16)
    return types.uint16(like, v), cg


@intrinsic
def v16put(typingctx, x, row, col, v):
    """x[row, col:col+16] = v."""
    if not _c2(x) or not isinstance(v, Vec):
        return None

    def cg(ctx, b, sig, args):
        b.store(args[3], _ptr2(ctx, b, sig.args[0], args[0], args[1], args[2], args[3].type), align=4)
        return ctx.get_dummy_value()
    return types.none(x, row, col, v), cg


@intrinsic
def v16zero(typingctx):
    """16 float32 lanes, zero."""
    def cg(ctx, b, sig, args):
        return ir.Constant(_lt("f32", 16), None)
    return Vec("f32", 16)(), cg


@intrinsic
def v16fma(typingctx, acc, a, c):
    """acc + a·c: a a vector or a float32 scalar (splat), c a vector; fused, never reordered."""
    if not isinstance(acc, Vec) or not isinstance(c, Vec):
        return None

    def cg(ctx, b, sig, args):
        a = args[1] if isinstance(sig.args[1], Vec) else _fsplat(b, ctx.cast(b, args[1], sig.args[1], types.float32), 16)
        return b.fadd(args[0], b.fmul(a, args[2], flags=CONTRACT), flags=CONTRACT)
    return acc(acc, a, c), cg


def _vmax(b, x, y):
    return b.select(b.fcmp_ordered(">", x, y), x, y)  # vmaxps (maxnum adds a NaN fix-up to every max)


@intrinsic
def v16max(typingctx, a, c):
    """The lane-wise max of two vectors of 16 float lanes (NaN lanes: c's)."""
    if not isinstance(a, Vec) or a.n != 16 or a != c:
        return None
    return a(a, c), lambda ctx, b, sig, args: _vmax(b, args[0], args[1])


@intrinsic
def hmax16(typingctx, v):
    """The largest of 16 float lanes (a tree of maxes)."""
    if not isinstance(v, Vec) or v.n != 16:
        return None

    def cg(ctx, b, sig, args):
        x, n = args[0], 16
        while n > 1:
            n //= 2
            x = _vmax(b, _shuffle(b, x, x, list(range(n))), _shuffle(b, x, x, list(range(n, 2 * n))))
        return b.extract_element(x, ir.Constant(I32, 0))
    return types.float32(v), cg


@intrinsic
def v16keep(typingctx, v, n, fill):
    """v with the lanes from n on replaced by the float32 fill (lanes 0 … n−1 kept): a vector's tail."""
    if not isinstance(v, Vec) or v.n != 16 or not isinstance(n, types.Integer) or not isinstance(fill, types.Float):
        return None

    def cg(ctx, b, sig, args):
        ity = ir.VectorType(I32, 16)
        nn = ctx.cast(b, args[1], sig.args[1], types.int32)
        nn = b.insert_element(ir.Constant(ity, None), nn, ir.Constant(I32, 0))
        keep = b.icmp_signed("<", ir.Constant(ity, list(range(16))), _shuffle(b, nn, nn, [0] * 16))
        return b.select(keep, args[0], _fsplat(b, ctx.cast(b, args[2], sig.args[2], types.float32), 16))
    return v(v, n, fill), cg


# e^x in float32 (Cephes' expf): the constants of kernels.expf (scalar) and v16expf (16 lanes)
LOG2E, LN2_HI, LN2_LO = 1.4426950408889634, 0.693145751953125, 1.428606765330187e-06
EXP_LO, EXP_HI = -86.6, 88.72284  # ≈ 2^−125 (normal: no denormals) … past float32's largest (inf)
EXP_POLY = (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1)


@intrinsic
def v16expf(typingctx, x, m):
    """e^(x − m) lane-wise for 16 float lanes x and a float32 m: kernels.expf's steps on vectors, the softmax's
    exponentials 16 at a time (within 1 ulp of e^ of the float32 x − m; ≈ 2^−125 below EXP_LO, inf past
    EXP_HI)."""
    if not isinstance(x, Vec) or x.n != 16 or not isinstance(m, types.Float):
        return None

    def cg(ctx, b, sig, args):
        ty = args[0].type
        ity = ir.VectorType(I32, 16)

        def k(c):
            return _splat(ty, float(np.float32(c)))

        def fma(p, q, r):
            return _call(b, "llvm.fma.v16f32", ty, [p, q, r])
        d = b.fsub(args[0], _fsplat(b, ctx.cast(b, args[1], sig.args[1], types.float32), 16))
        d = _call(b, "llvm.minnum.v16f32", ty, [_call(b, "llvm.maxnum.v16f32", ty, [d, k(EXP_LO)]), k(EXP_HI)])
        n = _call(b, "llvm.floor.v16f32", ty, [fma(d, k(LOG2E), k(0.5))])
        r = fma(n, k(-LN2_HI), d)
        r = fma(n, k(-LN2_LO), r)
        p = k(EXP_POLY[0])
        for c in EXP_POLY[1:]:
            p = fma(p, r, k(c))
        y = b.fadd(fma(p, b.fmul(r, r), r), k(1.0))
        e = b.shl(b.add(b.fptosi(n, ity), _splat(ity, 126)), _splat(ity, 23))
        return b.fmul(b.fmul(y, b.bitcast(e, ty)), k(2.0))  # 2^(n−1)·2: n ≤ 128
    return x(x, m), cg


__all__ = ["PATHS", "ENV", "SELECTED", "host_paths", "choose", "tag", "path_of", "TAGS", "Vec", "blocks_per_step",
           "fzero", "wload", "xload", "fload", "dot", "dscale", "half", "bfloat", "fma_acc", "fsum", "fdot", "hload",
           "fvload", "hload2", "fvload2", "sum16x16", "fstore4", "lane", "fzero16", "fmadd", "fadd",
           "isum", "sum_offset", "prefetch", "prefetch_l2", "lanes", "bdots", "bdotf", "hvec", "lzero", "fma_is",
           "fma_s", "fstore", "fmaf", "f32_bits", "absmax32", "round32", "v16", "widen", "narrow", "v16put", "v16zero",
           "v16fma", "v16max", "hmax16", "v16keep", "v16expf", "LOG2E", "LN2_HI", "LN2_LO", "EXP_LO", "EXP_HI",
           "EXP_POLY"]
