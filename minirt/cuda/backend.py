"""GPU backend (CuPy): a loaded Model on an NVIDIA GPU, its decode step captured once as a CUDA graph.

to_gpu(model) uploads every matrix once, as stored: GGUF block matrices (Q8_0, Q4_0, Q4_1) as their blocks
(scales split off: the file's bytes), dequantized inside the matmul kernels; float matrices as float16.
to_gpu(model, "float16" | "bfloat16" | "float32") expands every matrix to that type instead. LowRank
matrices (--mode lowrank) stay factored and run on the fused low-rank kernel. The KV cache lives on the
device (float32), and so do sampling and speculative verification: a greedy decode step is one graph
replay (embedding → 5 kernels a layer → norm → head → argmax, the position advanced on the device; on
Hopper and later each kernel is a programmatic dependent launch, which overlaps its start with the kernel
before) and one 4-byte read of the token; a speculative step is one graph replay over K+1 positions and
one verification kernel. MINIRT_GPU_LAYERS=1 runs all layers in one persistent kernel instead (slower on
an H200: BENCHMARKS.md). A model the backend cannot run is refused (gpu_refusal) before any upload.

GPUModel keeps Model's contract: forward(tokens, cache, logits) returns float32 logits on the host;
new_cache(), logits(), generate(), truncated() behave as on the CPU. Kernels: minirt/cuda/kernels.py.
"""
from __future__ import annotations

import copy
import math
import os
from dataclasses import replace

import numpy as np

from ..errors import MinirtError
from .kernels import SMEM_MAX
from ..generate import Generation
from ..linear import Dense, Quant
from ..modes.lowrank import LowRank
from ..sampling import Sampler, SamplingParams

DEVICES = ("cpu", "cuda", "auto")
DTYPES = ("float16", "bfloat16", "float32")


def cuda_unavailable() -> str | None:
    """None when CuPy finds a GPU, else why not (one line)."""
    try:
        import cupy
    except Exception:
        return "CuPy is not installed (pip install cupy-cuda13x)"
    try:
        n = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:
        return f"CuPy finds no usable GPU or CUDA driver ({type(e).__name__})"
    return None if n > 0 else "CuPy finds no GPU"


def resolve_device(device: str) -> str:
    """'cpu' or 'cuda' for --device cpu|cuda|auto; cuda without a usable GPU is a one-line error."""
    if device not in DEVICES:
        raise MinirtError(f"unknown device '{device}': choose one of {', '.join(DEVICES)}")
    if device == "cpu":
        return "cpu"
    why = cuda_unavailable()
    if why is None:
        return "cuda"
    if device == "auto":
        return "cpu"
    raise MinirtError(f"--device cuda: {why}; run with --device cpu (or auto)")


STORED_FORMATS = ("Q8_0", "Q4_0", "Q4_1", "F16", "BF16")  # Quant formats the backend uploads (blocks or float16)


def gpu_refusal(model) -> str | None:
    """Why the GPU backend cannot run this model (one line), or None: checked before anything is uploaded."""
    c = model.cfg
    if c.arch not in ("llama", "gpt2"):
        return f"the GPU backend does not run {c.arch} models yet; use --device cpu"
    if c.rope_scaling or c.sliding_window:  # its RoPE tables and attention know neither
        return "the GPU backend does not run RoPE scaling or sliding-window attention yet; use --device cpu"
    if c.head_dim > 128 or c.head_dim % 4 or c.n_heads % c.n_kv_heads:
        return f"the GPU backend needs head_dim ≤ 128 and divisible by 4 (got {c.head_dim}); use --device cpu"
    mats = [("head", model.head)] + [(f"layer {i} {a}", getattr(L, a)) for i, L in enumerate(model.layers)
                                     for a in ("qkv", "wo", "up", "down")]
    for i, L in enumerate(model.layers):
        if L.q_norm is not None or L.post_attn_norm is not None:
            return f"the GPU backend does not run layer {i}'s extra norms (QK/post norms) yet; use --device cpu"
    for where, lin in mats:
        parts = [lin.u, lin.v] if isinstance(lin, LowRank) else [lin]  # u's width is the rank (zero-padded)
        for p in parts:
            if isinstance(p, Quant) and p.qtype not in STORED_FORMATS:
                return f"the GPU backend has no kernels for {p.qtype} ({where}); use --device cpu"
            if not isinstance(p, (Dense, Quant)):
                return f"the GPU backend cannot run a {type(p).__name__} matrix ({where}); use --device cpu"
            if p.in_features % 8 and p is not getattr(lin, "u", None):
                return f"the GPU backend needs matrix widths divisible by 8 ({where} is {p.in_features} wide)"
    e = model.embed
    if not c.tied_head and not isinstance(e.head, (Dense, Quant)) and e.t.qtype not in STORED_FORMATS + ("F32",):
        return f"the GPU backend has no kernels for {e.t.qtype} embeddings; use --device cpu"
    return None


def to_gpu(model, dtype: str | None = None) -> "GPUModel":
    """The model's weights on the GPU (see the module note); dtype None keeps block formats as stored."""
    why = gpu_refusal(model)
    if why:  # before anything is uploaded
        raise MinirtError(why)
    if resolve_device("cuda") != "cuda":  # pragma: no cover (resolve_device raises)
        raise MinirtError("no GPU")
    return GPUModel(model, dtype)


# ---- weights ------------------------------------------------------------------------------------------
def float_matrix(lin) -> np.ndarray:
    """A Dense or Quant matrix as float32 (out, in) in natural column order."""
    if isinstance(lin, Dense):
        return lin.w
    if isinstance(lin, Quant):
        w = np.empty((lin.out_features, lin.in_features), np.float32)
        lin._dequantize(0, lin.out_features, w)
        if lin.nb:  # block-transposed columns back to natural order
            w = np.ascontiguousarray(w.reshape(-1, 32, lin.nb).transpose(0, 2, 1)).reshape(w.shape)
        return w
    if hasattr(lin, "dequantized"):  # KQuant (K-quants, Q5_0/Q5_1), Stacked (mixed formats): natural order
        return lin.dequantized()
    raise MinirtError(f"cannot upload a {type(lin).__name__} to the GPU")


def to_device_dtype(cp, w: np.ndarray, dtype: str):
    """float32 numpy → device array of float16, float32, or bfloat16 bits (uint16, rounded to nearest even)."""
    w = np.ascontiguousarray(w, dtype=np.float32)
    if dtype == "float16":
        return cp.asarray(w.astype(np.float16))
    if dtype == "float32":
        return cp.asarray(w)
    u = w.view(np.uint32).astype(np.uint64)
    return cp.asarray(((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16))


def _pad_cols(w: np.ndarray, n: int) -> np.ndarray:
    return w if w.shape[1] == n else np.pad(w, ((0, 0), (0, n - w.shape[1])))


class GDense:
    """A matrix (out, in) on the device: the gemv kernel (T rows of x, one warp per output row)."""

    def __init__(self, cp, k, w: np.ndarray, bias, dtype: str):
        self.k = k
        self.out_features, self.in_features = w.shape
        if self.in_features % 8:
            raise MinirtError(f"the GPU backend needs matrix widths divisible by 8, got {self.in_features}")
        self.w = to_device_dtype(cp, w, dtype)
        self.b = None if bias is None else cp.asarray(np.asarray(bias, np.float32))

    def __call__(self, x, out, T: int, mode: int = 0, **norm):
        """out = epilogue(x · Wᵀ + b) (modes: see gemv_kernels); norm: nst, norm, layer, ost (see Kernels.gemv)."""
        self.k.gemv(x, self.w, self.b, out, T, mode, **norm)

    @property
    def nbytes(self) -> int:
        return self.w.nbytes + (0 if self.b is None else self.b.nbytes)


def quant_blocks(cp, lin: Quant):
    """A Quant matrix's blocks on the device as stored (kernels.QMat), or None for float formats."""
    from .kernels import QUANT_TYPES, QMat
    if lin.qtype not in QUANT_TYPES or not lin.nb:
        return None
    return QMat(cp, lin.qtype, lin.qn, lin.d, lin.m, (lin.out_features, lin.in_features))


class GQuant(GDense):
    """A block-format matrix on the device as stored (Q8_0, Q4_0, Q4_1): the same gemv, dequantizing in the
    kernel (a lane per 32-weight block)."""

    def __init__(self, cp, k, q, bias):
        self.k, self.w = k, q
        self.out_features, self.in_features = q.shape
        self.b = None if bias is None else cp.asarray(np.asarray(bias, np.float32))


class GLowRank:
    """y = (x · Vᵀ) · Uᵀ (+ b) in one fused kernel; the rank is zero-padded to a multiple of 8."""

    def __init__(self, cp, k, u: np.ndarray, v: np.ndarray, bias, dtype: str):
        self.cp, self.k = cp, k
        self.out_features, self.rank = u.shape
        self.in_features = v.shape[1]
        if self.in_features % 8:
            raise MinirtError(f"the GPU backend needs matrix widths divisible by 8, got {self.in_features}")
        rp = -(-self.rank // 8) * 8
        self.u = to_device_dtype(cp, _pad_cols(u, rp), dtype)
        self.v = to_device_dtype(cp, np.pad(v, ((0, rp - self.rank), (0, 0))), dtype)
        self.b = None if bias is None else cp.asarray(np.asarray(bias, np.float32))
        self.bar = cp.zeros(2, cp.int32)  # the grid barrier's arrival count and generation
        self._mid: dict[int, object] = {}

    def __call__(self, x, out, T: int, mode: int = 0, **norm):
        mid = self._mid.get(T)
        if mid is None:
            mid = self._mid[T] = self.cp.empty((T, self.u.shape[1]), self.cp.float32)
        self.k.lowrank(x, self.v, self.u, self.b, mid, out, self.bar, T, mode, **norm)

    @property
    def nbytes(self) -> int:
        return self.u.nbytes + self.v.nbytes + (0 if self.b is None else self.b.nbytes)


class GLayer:
    def __init__(self, up, L, norm):
        self.attn_norm, self.ffn_norm = norm(L.attn_norm), norm(L.ffn_norm)
        self.qkv, self.wo, self.up, self.down = up(L.qkv), up(L.wo), up(L.up), up(L.down)


# ---- the KV cache --------------------------------------------------------------------------------------
class GPUCache:
    """Keys and values of every layer on the device (n_layers, n_kv_heads, capacity, head_dim), float32.

    pos is kept on the host and on the device (the kernels read it there, so captured graphs replay at any
    position); truncate() or setting pos marks the device copy stale, and the next forward rewrites it."""

    def __init__(self, cp, cfg, capacity: int):
        self.capacity = capacity
        shape = (cfg.n_layers, cfg.n_kv_heads, capacity, cfg.head_dim)
        self.k = cp.zeros(shape, cp.float32)
        self.v = cp.zeros(shape, cp.float32)
        self.pos_dev = cp.zeros(1, cp.int32)
        self.hist = cp.zeros(capacity + 1, cp.int32)  # greedy tokens by position (argmax_step writes them)
        self.graphs: dict = {}
        self.seen: set = set()
        self._pos, self.synced = 0, True

    @property
    def pos(self) -> int:
        return self._pos

    @pos.setter
    def pos(self, v: int) -> None:
        self._pos, self.synced = int(v), False

    def truncate(self, pos: int) -> None:
        if not 0 <= pos <= self._pos:
            raise ValueError(f"cannot truncate a cache of {self._pos} positions to {pos}")
        self.pos = pos

    def reserve(self, n: int) -> None:
        if self._pos + n > self.capacity:
            raise MinirtError(f"context is full: {self._pos} + {n} tokens exceed the context of {self.capacity} "
                              "(shorten the prompt or raise --ctx)")


# ---- the model -----------------------------------------------------------------------------------------
class GPUModel:
    device = "cuda"
    mode, mode_options = "dense", {}  # what generate() decodes with by default (minirt.modes.remember sets them)
    GRAPH_MAX_T = 8  # steps of up to this many positions are captured as CUDA graphs (decode, verification)

    def __init__(self, model, dtype: str | None = None):
        import cupy as cp

        from .kernels import LAYER_POINTERS, kernels
        if dtype is not None and dtype not in DTYPES:
            raise MinirtError(f"unknown GPU weight type '{dtype}': choose one of {', '.join(DTYPES)}")
        c = model.cfg
        why = gpu_refusal(model)
        if why:
            raise MinirtError(why)
        self.cp, self.k, self.dtype = cp, kernels(), dtype
        fdtype = dtype or "float16"  # float matrices (and every matrix, when dtype is given)
        self.cfg, self.tokenizer, self.source, self.file_type = c, model.tokenizer, model.source, model.file_type
        self.ctx = model.ctx  # the context used: new caches' default capacity
        self.lowrank = getattr(model, "lowrank", None)
        self.cpu = model  # the host model (its matrices stay in their stored format): drafters factor it
        self.stream = cp.cuda.Stream(non_blocking=True)
        with self.stream:
            def up(lin):
                if isinstance(lin, LowRank):
                    return GLowRank(cp, self.k, float_matrix(lin.u), float_matrix(lin.v), lin.bias, fdtype)
                q = quant_blocks(cp, lin) if isinstance(lin, Quant) and dtype is None else None
                if q is not None:
                    return GQuant(cp, self.k, q, lin.bias)
                return GDense(cp, self.k, float_matrix(lin), lin.bias, fdtype)

            def norm(n):
                return (cp.asarray(n.weight), None if n.bias is None else cp.asarray(n.bias), float(n.eps))

            self.layers = [GLayer(up, L, norm) for L in model.layers]
            self.head = up(model.head)
            if c.tied_head and isinstance(self.head, GDense):
                self.embed_table = self.head.w  # one copy serves both (float or blocks)
            else:
                e = model.embed
                src = e.head if isinstance(e.head, (Dense, Quant)) else None
                if src is None and dtype is None and e.t.qtype in ("Q8_0", "Q4_0", "Q4_1"):
                    src = Quant(e.t)
                q = quant_blocks(cp, src) if isinstance(src, Quant) and dtype is None else None
                if q is not None:
                    self.embed_table = q
                else:
                    t = float_matrix(src) if src is not None else np.asarray(e.t.float32())
                    self.embed_table = to_device_dtype(cp, t, fdtype)
            self.pos_embed = None if model.pos_embed is None else cp.asarray(model.pos_embed)
            self.norm = norm(model.norm)
            self.rope_cos, self.rope_sin = map(cp.asarray, model.rope(self.ctx))
            self._rope_retired: list = []  # smaller tables that graphs captured earlier may still read
            self.pos_scratch = cp.zeros(1, cp.int32)  # position for caches that are not GPUCaches (views)
            self.result = cp.zeros(2, cp.int32)
            # the persistent layers kernel: every layer's matrices of one type, none factored
            mats = [m for L in self.layers for m in (L.qkv, L.wo, L.up, L.down)]
            types = {self.k.wtype(m.w) for m in mats if isinstance(m, GDense)}
            self.layers_type = types.pop() if len(types) == 1 and all(isinstance(m, GDense) for m in mats) else None
            self.layer_table = self.bar = None
            if self.layers_type:
                ptr = lambda a: 0 if a is None else a.data.ptr  # noqa: E731
                rows = []
                for L in self.layers:
                    row = []
                    for m in (L.qkv, L.wo, L.up, L.down):
                        w = m.w
                        row += ([ptr(w.q), ptr(w.d), ptr(w.m)] if self.layers_type in ("Q8_0", "Q4_0", "Q4_1")
                                else [ptr(w), 0, 0]) + [ptr(m.b)]
                    row += [ptr(L.attn_norm[0]), ptr(L.attn_norm[1]), ptr(L.ffn_norm[0]), ptr(L.ffn_norm[1])]
                    assert len(row) == LAYER_POINTERS
                    rows.append(row)
                self.layer_table = cp.asarray(np.array(rows, np.uint64))
                self.bar = cp.zeros(2, cp.int32)  # the grid barrier's arrival count and generation
        self.stream.synchronize()
        # MINIRT_GPU_LAYERS=1: the persistent layers kernel (one launch for all layers) instead of 5 launches a
        # layer; off by default: slower on an H200 (SmolLM2 Q4_1: 880 vs 1150 tok/s, its 150 grid barriers cost
        # more than the graph's launch gaps; BENCHMARKS.md)
        self.persistent = self.layers_type is not None and os.environ.get("MINIRT_GPU_LAYERS", "0") == "1"
        self.per_sm = int(os.environ.get("MINIRT_GPU_LAYERS_PER_SM", "2"))  # blocks per SM in that grid (at most)
        # the persistent kernel pulls each layer into L2 during the one before (1; 0: not)
        self.prefetch = int(os.environ.get("MINIRT_GPU_PREFETCH", "1"))
        # programmatic dependent launch in the captured steps (Hopper and later): a kernel's blocks come up and
        # pull their weights into L2 while the kernel before it runs (kernels.py: pdl_launch, pdl_wait)
        cc = cp.cuda.Device().compute_capability
        self.pdl = int(cc) >= 90 and os.environ.get("MINIRT_GPU_PDL", "1") == "1"
        self._scratch: dict[int, dict] = {}

    # ---- buffers and caches -----------------------------------------------------------------------
    def new_cache(self, capacity: int | None = None) -> GPUCache:
        """A cache for capacity positions (default: the context used, self.ctx), at most the model's maximum."""
        return GPUCache(self.cp, self.cfg, min(capacity or self.ctx, self.cfg.max_ctx))

    def _rope(self, n: int) -> None:
        """RoPE tables on the device covering positions 0..n−1: grown (from the host model's) with the caches."""
        if self.cfg.arch == "llama" and self.rope_cos.shape[0] < n:
            self._rope_retired.append((self.rope_cos, self.rope_sin))
            self.rope_cos, self.rope_sin = map(self.cp.asarray, self.cpu.rope(n))

    def _buffers(self, T: int) -> dict:
        s = self._scratch.get(T)
        if s is None:
            cp, c = self.cp, self.cfg
            f = cp.float32
            s = dict(tok=cp.zeros(T, cp.int32), x=cp.empty((T, c.dim), f), h=cp.empty((T, c.dim), f),
                     hrows=cp.empty((T, c.dim), f), qkv=cp.empty((T, c.q_dim + 2 * c.kv_dim), f),
                     q=cp.empty((T, c.n_heads, c.head_dim), f), att=cp.empty((T, c.q_dim), f),
                     act=cp.empty((T, c.hidden_dim), f), logits=cp.empty((T, c.vocab_size), f),
                     st=cp.zeros((2 * len(self.layers) + 1, T, 2), cp.float64))
            self._scratch[T] = s
        return s

    def _pos(self, cache):
        """The device position of a cache, written from the host where it is stale."""
        if isinstance(cache, GPUCache):
            if not cache.synced:
                cache.pos_dev.set(np.array([cache.pos], np.int32), stream=self.stream)
                cache.synced = True
            return cache.pos_dev
        self.pos_scratch.set(np.array([cache.pos], np.int32), stream=self.stream)
        return self.pos_scratch

    # ---- one step: kernels only (capturable) ------------------------------------------------------
    def _step(self, T: int, cache, pos, b: dict, head: str, finish: str) -> None:
        k, c = self.k, self.cfg
        llama = c.arch == "llama"
        layer_norm = not llama
        H, Hkv, hd, cap = c.n_heads, c.n_kv_heads, c.head_dim, cache.capacity
        scale = 1.0 / math.sqrt(hd)
        x, h = b["x"], b["h"]
        # steps of a few positions (decode, verification): norms inside the matmuls, RoPE and the cache store
        # inside attention, residual adds and activations in the matmuls' epilogues: 5 kernels a layer
        # (the norms read the Σx, Σx² that the kernels writing x accumulate: st, one slot per norm)
        fused = T <= self.GRAPH_MAX_T
        up_mode = 2 if llama else 3
        st = b["st"]
        k.embed(b["tok"], self.embed_table, self.pos_embed, pos, x, T, st)
        persistent = fused and self.persistent and k.layers_smem(T, c.dim, c.q_dim, c.hidden_dim) <= SMEM_MAX
        if persistent:  # every layer in one launch
            L0 = self.layers[0]
            k.layers(self.layer_table, self.layers_type, len(self.layers), x, b["qkv"], b["att"], b["act"], st, pos,
                     self.rope_cos, self.rope_sin, llama, cache.k, cache.v, scale, T, c.dim, H, Hkv, hd, cap,
                     c.hidden_dim, up_mode, layer_norm, L0.attn_norm[2], L0.ffn_norm[2], self.bar, self.per_sm,
                     self.prefetch)
        for li, L in enumerate(self.layers if not persistent else ()):
            kc, vc = cache.k[li], cache.v[li]
            if fused:
                L.qkv(x, b["qkv"], T, 0, nst=st[2 * li], norm=L.attn_norm, layer=layer_norm)
            else:
                k.norm(x, *L.attn_norm[:2], L.attn_norm[2], h, T, layer_norm)
                L.qkv(h, b["qkv"], T, 0)
                k.rope_store(b["qkv"], pos, self.rope_cos, self.rope_sin, llama, b["q"], kc, vc, T, H, Hkv, hd, cap)
            k.attention(b["qkv"], pos, self.rope_cos, self.rope_sin, llama, kc, vc, scale, b["att"], T, H, Hkv, hd,
                        cap, store=fused)
            if fused:
                L.wo(b["att"], x, T, 1, ost=st[2 * li + 1])
                L.up(x, b["act"], T, up_mode, nst=st[2 * li + 1], norm=L.ffn_norm, layer=layer_norm)
                L.down(b["act"], x, T, 1, ost=st[2 * li + 2])
            else:
                L.wo(b["att"], x, T, 1)
                k.norm(x, *L.ffn_norm[:2], L.ffn_norm[2], h, T, layer_norm)
                L.up(h, b["act"], T, up_mode)
                L.down(b["act"], x, T, 1)
        rows = x[T - 1:] if head == "last" else x
        R = rows.shape[0]
        # the head (vocab × dim) has many short rows: normalizing once beats normalizing in every warp (measured)
        k.norm(rows, *self.norm[:2], self.norm[2], b["hrows"], R, layer_norm)
        self.head(b["hrows"], b["logits"], R, 0)
        if finish == "argmax":
            k.argmax_step(b["logits"], c.vocab_size, self._buffers(1)["tok"], pos, cache.hist, T)
        elif finish == "advance":
            k.advance(pos, T)

    def _run(self, T: int, cache, head: str, finish: str) -> dict:
        """Launch a step; steps of ≤ GRAPH_MAX_T positions on a GPUCache are captured once (on their second
        use: the first runs eagerly, which loads the kernels and allocates scratch) and replayed."""
        self._rope(cache.capacity)  # before any capture: a graph keeps the tables it was captured with
        b = self._buffers(T)
        pos = self._pos(cache)
        if not isinstance(cache, GPUCache) or T > self.GRAPH_MAX_T:
            self._step(T, cache, pos, b, head, finish)
            return b
        key = (id(self), T, head, finish)
        g = cache.graphs.get(key)
        if g is None:
            if key not in cache.seen:
                cache.seen.add(key)
                self._step(T, cache, pos, b, head, finish)
                return b
            s = self.stream
            s.begin_capture()
            try:
                self.k.pdl = self.pdl
                self._step(T, cache, pos, b, head, finish)
            finally:
                self.k.pdl = False
                g = s.end_capture()
            cache.graphs[key] = g
        g.launch(stream=self.stream)
        return b

    def _check(self, tokens, cache) -> np.ndarray:
        tokens = np.asarray(tokens, dtype=np.int64).reshape(-1)
        if len(tokens) == 0:
            raise MinirtError("no tokens to run")
        if tokens.min() < 0 or tokens.max() >= self.cfg.vocab_size:
            raise MinirtError(f"token id out of range 0..{self.cfg.vocab_size - 1}")
        cache.reserve(len(tokens))
        return tokens

    def _advance_host(self, cache, T: int) -> None:
        if isinstance(cache, GPUCache):
            cache._pos += T  # the device copy was advanced by the step itself
        else:
            cache.pos += T

    # ---- the forward pass -------------------------------------------------------------------------
    def forward_device(self, tokens, cache, logits: str = "last"):
        """Like forward, but the logits rows stay on the device (a view of a reused buffer)."""
        if logits not in ("last", "all"):
            raise ValueError(f"logits must be 'last' or 'all', not {logits!r}")
        tokens = self._check(tokens, cache)
        T = len(tokens)
        with self.stream:
            b = self._buffers(T)
            b["tok"].set(tokens.astype(np.int32), stream=self.stream)
            self._run(T, cache, logits, "advance")
        self._advance_host(cache, T)
        return b["logits"][:1 if logits == "last" else T]

    def forward(self, tokens, cache, logits="last", progress=None) -> np.ndarray:
        """Run positions cache.pos … cache.pos+T−1 and return logits (rows, vocab) float32 on the host.
        progress(done, total) is called once, when the positions have run (the device runs them in one pass)."""
        if isinstance(logits, str) and logits not in ("last", "all"):
            raise ValueError(f"logits must be 'last', 'all' or an index, not {logits!r}")
        rows = self.forward_device(tokens, cache, logits if isinstance(logits, str) else "all")
        out = rows.get(stream=self.stream)
        if progress is not None:
            progress(len(np.atleast_1d(tokens)), len(np.atleast_1d(tokens)))
        return out if isinstance(logits, str) else np.ascontiguousarray(out[logits])

    def logits(self, token_ids) -> np.ndarray:
        ids = list(token_ids)
        return self.forward(ids, self.new_cache(len(ids)), logits="all")

    # ---- greedy decoding on the device ------------------------------------------------------------
    def prefill_greedy(self, tokens, cache) -> None:
        """Run the prompt; its argmax token lands in the decode input (and cache.hist) on the device."""
        tokens = self._check(tokens, cache)
        T = len(tokens)
        with self.stream:
            b = self._buffers(T)
            b["tok"].set(tokens.astype(np.int32), stream=self.stream)
            self._run(T, cache, "last", "argmax")
        self._advance_host(cache, T)

    def step_greedy(self, cache) -> None:
        """One decode step on the last argmax token (one graph replay), no host sync."""
        cache.reserve(1)
        with self.stream:
            self._run(1, cache, "last", "argmax")
        self._advance_host(cache, 1)

    def read_token(self) -> int:
        """The token the last greedy step chose (one 4-byte copy: the host sync of a decode step)."""
        return int(self._buffers(1)["tok"][:1].get(stream=self.stream)[0])

    def decode_greedy(self, tokens, cache, n: int) -> list[int]:
        """n greedy tokens after a prompt, with one host sync at the end (for benchmarks)."""
        p0 = cache.pos + len(tokens)
        self.prefill_greedy(tokens, cache)
        for _ in range(n - 1):
            self.step_greedy(cache)
        return [int(t) for t in cache.hist[p0:p0 + n].get(stream=self.stream)]

    # ---- conveniences -------------------------------------------------------------------------------
    def generate(self, prompt, **kwargs):
        return GPUGeneration(self, prompt, **kwargs)

    def lowrank_twin(self, arg: str = "") -> "GPUModel":
        """The --draft lowrank[:ARG] twin on the device: the host model factored, then uploaded; made once
        (make_drafter asks for it), so every generation reuses it."""
        from ..modes.speculative import lowrank_twin
        twins = self.__dict__.setdefault("_lowrank_twins", {})
        if arg not in twins:
            twins[arg] = GPUModel(lowrank_twin(self.cpu, arg), self.dtype)
        return twins[arg]

    def truncated(self, n_layers: int) -> "GPUModel":
        """The first n_layers with the final norm and head (early-exit drafter), sharing every weight."""
        m = copy.copy(self)
        m.cfg, m.layers, m._scratch = replace(self.cfg, n_layers=n_layers), self.layers[:n_layers], {}
        return m

    @property
    def weight_type(self) -> str:
        """The types the matrices have on the device, e.g. "Q4_1 (head Q8_0)" or "float16"."""
        head = self.k.wtype(self.head.w) if isinstance(self.head, GDense) else "low-rank " + self.k.wtype(self.head.v)
        body = {self.k.wtype(m.w) if isinstance(m, GDense) else "low-rank " + self.k.wtype(m.v)
                for L in self.layers for m in (L.qkv, L.wo, L.up, L.down)}
        main = "+".join(sorted(body))
        return main if body == {head} else f"{main} (head {head})"

    @property
    def weight_bytes(self) -> int:
        """Device bytes of weights read per decode step (matrices and head)."""
        return sum(L.qkv.nbytes + L.wo.nbytes + L.up.nbytes + L.down.nbytes for L in self.layers) + self.head.nbytes

    def memory_bandwidth(self, mib: int = 1024, repeats: int = 5) -> float:
        """Device memory bandwidth in bytes/s: a device-to-device copy, bytes read plus written, median."""
        cp = self.cp
        a = cp.ones(mib << 18, cp.float32)
        b = cp.empty_like(a)
        rates = []
        with self.stream:
            for _ in range(repeats + 1):
                e0, e1 = cp.cuda.Event(), cp.cuda.Event()
                e0.record(self.stream)
                b[...] = a
                e1.record(self.stream)
                e1.synchronize()
                rates.append(2 * a.nbytes / (cp.cuda.get_elapsed_time(e0, e1) * 1e-3))
        return float(np.median(rates[1:]))


# ---- sampling and verification on the device ---------------------------------------------------------
def device_distribution(cp, x, p: SamplingParams, seen=None):
    """Sampler.distribution for rows of logits on the device (float64 arithmetic, as on the CPU).
    seen: (rows, vocab) bool, the tokens the repetition penalty applies to."""
    x = x.astype(cp.float64)
    R, V = x.shape
    r = p.repetition_penalty
    if r != 1.0 and seen is not None:
        x = cp.where(seen, cp.where(x > 0, x / r, x * r), x)
    if p.greedy:
        out = cp.zeros_like(x)
        out[cp.arange(R), cp.argmax(x, axis=1)] = 1.0
        return out
    x = x / p.temperature
    if p.top_k and p.top_k < V:
        kth = cp.partition(x, V - p.top_k, axis=1)[:, V - p.top_k:V - p.top_k + 1]
        x = cp.where(x >= kth, x, -cp.inf)
    probs = cp.exp(x - x.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    if p.top_p < 1.0:
        order = cp.argsort(-probs, axis=1)
        sp = cp.take_along_axis(probs, order, axis=1)
        keep = (cp.cumsum(sp, axis=1) - sp) < p.top_p
        mask = cp.zeros(probs.shape, bool)
        mask[cp.arange(R)[:, None], order] = keep
        probs = cp.where(mask, probs, 0.0)
    if p.min_p > 0:
        probs = cp.where(probs >= p.min_p * probs.max(axis=1, keepdims=True), probs, 0.0)
    return probs / probs.sum(axis=1, keepdims=True)


class DeviceSampler:
    """Draws tokens from device logits with a Sampler's rules and random stream; one sync per call."""

    def __init__(self, model: GPUModel, sampler: Sampler, history=()):
        self.m, self.cp, self.sampler = model, model.cp, sampler
        self.p = sampler.params
        with model.stream:
            self.seen = self.cp.zeros(model.cfg.vocab_size, bool)
            if len(history):
                self.seen[self.cp.asarray(np.asarray(history, np.int64))] = True
            self.dummy = self.cp.zeros(1, self.cp.int32)

    def push(self, tok: int) -> None:
        if self.p.repetition_penalty != 1.0:
            with self.m.stream:
                self.seen[tok] = True

    def verify(self, rows, draft: list[int], qs=None) -> tuple[int, int]:
        """Accepted drafts and the next token, from logits rows (len(draft)+1, vocab) on the device."""
        cp, p, m = self.cp, self.p, self.m
        R, V = rows.shape
        with m.stream:
            seen = None
            if p.repetition_penalty != 1.0:
                seen = cp.tile(self.seen, (R, 1))
                for i, t in enumerate(draft):
                    seen[i + 1:, t] = True
            if p.greedy:
                P = rows
                if seen is not None:  # argmax of the penalized logits
                    x = rows.astype(cp.float64)
                    P = cp.where(seen, cp.where(x > 0, x / p.repetition_penalty, x * p.repetition_penalty), x)
                P = cp.ascontiguousarray(P, dtype=cp.float32)
                Q, u = None, self.dummy
            else:
                P = cp.ascontiguousarray(device_distribution(cp, rows, p, seen), dtype=cp.float32)
                Q = None if not qs else cp.asarray(np.stack(qs).astype(np.float32))
                u = cp.asarray(self.sampler.rng.random(R).astype(np.float32))
            d = cp.asarray(np.asarray(draft, np.int32)) if draft else self.dummy
            m.k.verify(P, V, d, len(draft), Q, u, p.greedy, m.result)
            res = m.result.get(stream=m.stream)
        return int(res[0]), int(res[1])

    def sample(self, rows) -> int:
        return self.verify(rows, [])[1]


class GPUGeneration(Generation):
    """Generation on a GPUModel: sampling on the device; greedy decoding as graph replays, the next step
    launched before the host handles the current token."""

    def _continues_cache(self) -> bool:
        return False

    def _dense_tokens(self):
        m, cache = self.model, self.cache
        p = self.sampler.params
        if p.greedy and p.repetition_penalty == 1.0:
            m.prefill_greedy(self.prompt_ids, cache)
            while True:
                tok = m.read_token()
                more = cache.pos < cache.capacity
                if more:
                    m.step_greedy(cache)  # runs while the host detokenizes tok
                yield tok
                if not more:
                    return
        ds = DeviceSampler(m, self.sampler, self.prompt_ids)
        rows = m.forward_device(self.prompt_ids, cache)
        while True:
            tok = ds.sample(rows)
            ds.push(tok)
            yield tok
            if cache.pos >= cache.capacity:
                return
            rows = m.forward_device([tok], cache)

    def _tokens(self):
        if self.drafter is None:  # plain decoding (this class's), or another mode's token source
            return super()._tokens()
        return speculative_tokens_gpu(self.model, self.cache, self.prompt_ids, self.sampler, self.drafter,
                                      self.draft_k, self.max_tokens, self.spec)


def speculative_tokens_gpu(model: GPUModel, cache, prompt: list[int], sampler: Sampler, drafter, k: int,
                           max_tokens: int, stats, adaptive: bool = True):
    """minirt.modes.speculative.speculative_tokens on the device: the K+1 positions scored by one graph replay,
    the acceptance rule applied by one verification kernel (one host sync per step). Same drafters, same
    adaptive K, same rule: greedy output is identical to plain greedy decoding on the GPU."""
    from ..modes.speculative import DraftLength
    length = DraftLength(k, adaptive)
    ds = DeviceSampler(model, sampler, prompt)
    context = list(prompt)
    first = ds.sample(model.forward_device(prompt, cache))
    ds.push(first)
    yield first
    context.append(first)
    drafter.start(context, cache)
    last, produced = first, 1
    while produced < max_tokens:
        room = cache.capacity - cache.pos - 1
        if room < 1:
            return
        n = max(0, min(length.next(), room, max_tokens - produced - 1))
        draft, qs = drafter.propose(context, n, sampler) if n else ([], None)
        n_draft = len(draft)
        rows = model.forward_device([last] + draft, cache, logits="all")
        n_ok, tok = ds.verify(rows, draft, qs)
        out = draft[:n_ok] + [tok]
        cache.truncate(cache.pos - (n_draft - n_ok))
        stats.record(n_draft, n_ok)
        length.update(n_draft, n_ok)
        for t in out:
            context.append(t)
            ds.push(t)
            produced += 1
            yield t
            if produced >= max_tokens:
                return
        last = context[-1]
        drafter.rollback(context)
