"""Model: a ModelConfig, one Linear per weight matrix, norms and embeddings, and the forward pass.

forward(tokens, cache) runs T new positions (a whole prompt, or one token per decode step) against the KV
cache and returns logits for the rows asked for; a long prompt goes through the layers PREFILL_CHUNK
positions at a time, so that memory is bounded by the chunk and the cache. GPT-2 and LLaMA share the pass:
    x = embed[tokens] (+ pos_embed[positions])                          GPT-2: learned positions
    per layer:  h = norm(x);  q,k,v = h·Wqkv;  RoPE(q,k) (LLaMA);  cache ← k,v
                x += attention(q, cache)·Wo
                h = norm(x);  x += act(h·Wup)·Wdown                     LLaMA: silu(h·Wg)·(h·Wu), fused as one Linear
    logits = norm(x)·Headᵀ
"""
from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

import numba
import numpy as np

from . import jitcache
from .cpu import isa, kernels, step
from .config import ModelConfig
from .errors import MinirtError
from .kvcache import KVCache, context_size, kv_dtype
from .linear import Dense, Linear, Quant, make_linear
from .modes.lowrank import LowRank
from .readers import Checkpoint, Tensor
from .cpu.threads import blas_single_threaded
from .tokenizer import Tokenizer, build_tokenizer

# Positions per pass through the layers (llama.cpp's micro-batch plays this part). A longer prompt runs in
# ⌈T/PREFILL_CHUNK⌉ balanced chunks against the cache, so activation buffers hold at most PREFILL_CHUNK rows
# (and more than PREFILL_CHUNK/2: every chunk takes the batched kernels a single pass would take, and
# every kernel computes a row from that row and the cache alone, so the logits are the same bits, as long
# as BLAS's sum order does not depend on the row count: true of OpenBLAS at real model sizes, not at toy
# ones). 256 rows keep BLAS GEMMs at full speed while SmolLM2's buffers stay under 10 MB.
PREFILL_CHUNK = 256


@dataclass
class Norm:
    weight: np.ndarray
    bias: np.ndarray | None  # None: RMSNorm (LLaMA); else LayerNorm (GPT-2)
    eps: float

    def __call__(self, x: np.ndarray, out: np.ndarray) -> np.ndarray:
        if self.bias is None:
            kernels.rmsnorm(x, self.weight, self.eps, out)
        else:
            kernels.layernorm(x, self.weight, self.bias, self.eps, out)
        return out


class Embedding:
    """Token embeddings, kept in their stored format; rows are dequantized when looked up. A tied head
    serves as the table itself, so the matrix is held once."""

    def __init__(self, t: Tensor, head: Linear | None = None):
        self.t, self.head = t, head

    def __getitem__(self, ids: np.ndarray) -> np.ndarray:
        if isinstance(self.head, Quant):
            return self.head.rows(ids)
        if isinstance(self.head, Dense):
            return self.head.w[ids]
        return Tensor(self.t.data[ids], self.t.qtype, (len(ids), self.t.shape[1])).float32()


@dataclass
class Layer:
    attn_norm: Norm
    qkv: Linear     # rows: q (n_heads·hd) | k (n_kv·hd) | v (n_kv·hd)
    wo: Linear
    ffn_norm: Norm
    up: Linear      # gated FFNs: gate | up (2·hidden rows); GPT-2: fc (hidden rows)
    down: Linear
    q_norm: np.ndarray | None = None      # traits.qk_norm: RMSNorm weights over each head (hd,)
    k_norm: np.ndarray | None = None
    post_attn_norm: Norm | None = None    # traits.post_norms
    post_ffn_norm: Norm | None = None


class Model:
    mode = "dense"                           # what generate() decodes with by default: minirt.load(mode=…)
    mode_options = MappingProxyType({})      # … and that mode's options (minirt.modes.remember sets both)
    compiled_step = os.environ.get("MINIRT_STEP", "1") != "0"  # T ≤ 16 in one compiled call (MINIRT_STEP=0: off)

    def __init__(self, cfg: ModelConfig, layers: list[Layer], embed: Embedding, pos_embed: np.ndarray | None,
                 norm: Norm, head: Linear, tokenizer: Tokenizer, source: Path | None = None, file_type: str = "",
                 ctx: int | None = None, kv_type: str = "f32"):
        self.cfg, self.layers, self.embed, self.pos_embed = cfg, layers, embed, pos_embed
        self.norm, self.head, self.tokenizer = norm, head, tokenizer
        self.source, self.file_type = source, file_type
        self.ctx = context_size(cfg.max_ctx, ctx)  # the context used: new caches' default capacity
        kv_dtype(kv_type)
        self.kv_type = kv_type  # how new caches store keys and values: "f32", or "f16" (kvcache.KV_TYPES)
        # RoPE tables, one pair per base the layers use, grow with the caches that use them (rope()); without
        # RoPE (GPT-2) one empty pair is never read: one kernel signature
        self.thetas = sorted({cfg.layer_theta(i) for i in range(cfg.n_layers)}) if cfg.traits.rope else [0.0]
        empty = np.zeros((0 if cfg.traits.rope else 1, max(cfg.head_dim // 2, 1)), np.float32)
        self.rope_tables = {th: (empty, empty) for th in self.thetas}
        self._scratch: dict[str, np.ndarray] = {}
        self._step = None  # (key, StepTable | None): see _step_table

    @classmethod
    def from_checkpoint(cls, ck: Checkpoint, dequantize: bool = False, exact: bool = False,
                        ctx: int | None = None, kv_type: str = "f32") -> "Model":
        """Build the model. Matrices stay in their stored format (Quant) unless dequantize=True (float32).
        Decode steps on block formats round activations to int8 per block, as llama.cpp does;
        exact=True keeps them float32 (slower; what the float reference tests use).
        ctx: the context used (default min(DEFAULT_CTX, the model's maximum)); above the maximum is an error.
        kv_type: how new caches store keys and values, "f32" or "f16" (kvcache.KV_TYPES)."""
        from .readers.validate import validate
        validate(ck)  # readers validate what they return; a Checkpoint built by hand is checked here
        cfg, t = ck.config, ck.tensors
        ctx = context_size(cfg.max_ctx, ctx)  # refused before any building
        kv_dtype(kv_type)
        # the tokenizer first: what building it leaves free goes back to the system before the weights come in
        tok = build_tokenizer(ck.tokenizer, cfg.vocab_size)
        if tok.chat_template is None:  # a file without a template: the family's own, as llama.cpp falls back to
            from .chat import BUILTIN_TEMPLATES
            tok.chat_template = BUILTIN_TEMPLATES.get(cfg.arch)
        jitcache.release_compiler_pages()

        def linear(ws, bs=None):
            return make_linear(ws, bs, dequantize, exact)

        def matrix(name: str, ws: list[str], bs: list[str]) -> Linear:
            """The Linear for canonical matrices ws stacked (biases bs), or its factors in a low-rank export."""
            if name + ".lr_u" in t:
                from .modes.lowrank import lowrank_from_tensors
                b = t.get(name + ".lr_b")
                return lowrank_from_tensors(t[name + ".lr_u"], t[name + ".lr_v"], None if b is None else b.float32(),
                                            exact)
            return linear([t[w] for w in ws], [t.get(b) for b in bs])
        eps = cfg.norm_eps

        def norm(prefix: str) -> Norm:
            b = t.get(prefix + ".bias")
            # copies: once loading is done nothing refers to the mapped file, which is then unmapped
            return Norm(np.array(t[prefix + ".weight"].float32()), None if b is None else np.array(b.float32()), eps)

        tr = cfg.traits
        layers = []
        for i in range(cfg.n_layers):
            p = f"layers.{i}."
            if tr.fused_qkv:
                qkv = matrix(p + "qkv", [p + "wqkv"], [p + "bqkv"])
            else:
                qkv = matrix(p + "qkv", [p + "wq", p + "wk", p + "wv"], [p + "bq", p + "bk", p + "bv"])
            if tr.ffn == "gelu" or tr.fused_up:  # one stored matrix: fc, or gate|up (Phi-3)
                up = matrix(p + "up", [p + "w_up"], [p + "b_up"])
            else:
                up = matrix(p + "up", [p + "w_gate", p + "w_up"], [p + "b_gate", p + "b_up"])
            L = Layer(norm(p + "attn_norm"), qkv, matrix(p + "wo", [p + "wo"], [p + "bo"]),
                      norm(p + "ffn_norm"), up, matrix(p + "down", [p + "w_down"], [p + "b_down"]))
            if tr.qk_norm:
                L.q_norm = np.array(t[p + "q_norm"].float32())
                L.k_norm = np.array(t[p + "k_norm"].float32())
            if tr.post_norms:
                L.post_attn_norm, L.post_ffn_norm = norm(p + "post_attn_norm"), norm(p + "post_ffn_norm")
            layers.append(L)
            ck.release_pages()
        head = matrix("head", ["embed" if cfg.tied_head else "head"], [])
        table = head if cfg.tied_head else (linear([t["embed"]]) if "head.lr_u" in t else None)
        embed = Embedding(t["embed"], table)  # a tied head (or a copy, if the head is factored) is the table
        pos = np.array(t["pos_embed"].float32()) if "pos_embed" in t else None
        ck.release_pages()
        model = cls(cfg, layers, embed, pos, norm("norm"), head, tok, ck.source, ck.file_type, ctx, kv_type)
        if "minirt.lowrank.manifest" in ck.metadata:
            from .modes.lowrank import describe_export
            describe_export(model, ck.metadata["minirt.lowrank.manifest"])
        return model

    # ---- the forward pass -------------------------------------------------------------------------
    def new_cache(self, capacity: int | None = None) -> KVCache:
        """A KV cache for capacity positions (default: the context used, self.ctx), at most the model's maximum,
        of the model's kv_type."""
        return KVCache(self.cfg, min(capacity or self.ctx, self.cfg.max_ctx), kv_type=self.kv_type)

    def rope(self, n: int, theta: float | None = None) -> tuple[np.ndarray, np.ndarray]:
        """RoPE cos/sin tables (for base theta, default the model's) covering positions 0..n−1, grown on
        demand: sized by the caches in use (doubling, up to the model's maximum, so that growing caches
        rebuild them rarely), never by a maximum the file claims. A position's row is the same in tables of
        every length."""
        c = self.cfg
        for th in self.thetas:
            have = self.rope_tables[th][0].shape[0]
            if c.traits.rope and have < n:
                self.rope_tables[th] = kernels.rope_tables(max(n, min(2 * have, c.max_ctx)), c.head_dim, th,
                                                           c.rope_inv_freq(th))
        if not c.traits.rope:
            return self.rope_tables[self.thetas[0]]
        if theta is None:  # the global layers' base (a model of sliding-window layers only: its one base)
            theta = c.rope_theta if c.rope_theta in self.rope_tables else self.thetas[-1]
        return self.rope_tables[theta]

    @property
    def rope_cos(self) -> np.ndarray:
        """The global layers' cos table as it is now (not grown)."""
        th = self.cfg.rope_theta
        return self.rope_tables[th if self.cfg.traits.rope and th in self.rope_tables else self.thetas[-1]][0]

    def _buffers(self, T: int) -> dict[str, np.ndarray]:
        """Activation buffers for T ≤ PREFILL_CHUNK positions: views of one set, grown to the largest T seen."""
        s = self._scratch
        if not s or len(s["h"]) < T:
            c = self.cfg
            up_rows = self.layers[0].up.out_features
            s.clear()
            s.update(h=np.empty((T, c.dim), np.float32), o=np.empty((T, c.dim), np.float32),
                     qkv=np.empty((T, c.q_dim + 2 * c.kv_dim), np.float32),
                     q=np.empty((T, c.n_heads, c.head_dim), np.float32),
                     att=np.empty((T, c.n_heads, c.head_dim), np.float32),
                     up=np.empty((T, up_rows), np.float32), act=np.empty((T, c.hidden_dim), np.float32))
        return {k: v[:T] for k, v in s.items()}

    def forward(self, tokens, cache: KVCache, logits="last",
                progress: Callable[[int, int], None] | None = None) -> np.ndarray:
        """Run positions cache.pos … cache.pos+T−1 and return logits (rows, vocab) as float32.

        logits: "last" (one row), "all", or anything that indexes the T rows (a slice, an index array).
        More than PREFILL_CHUNK positions run in chunks (see PREFILL_CHUNK); progress(done, total), if
        given, is called after each chunk with the positions run so far (for a prefill progress bar)."""
        if len(np.atleast_1d(tokens)) < 4:
            return self._forward(tokens, cache, logits, progress)
        with blas_single_threaded():
            return self._forward(tokens, cache, logits, progress)

    def _forward(self, tokens, cache: KVCache, logits, progress) -> np.ndarray:
        c = self.cfg
        tokens = np.asarray(tokens, dtype=np.int64).reshape(-1)
        T = len(tokens)
        if T == 0:
            raise MinirtError("no tokens to run")
        if tokens.min() < 0 or tokens.max() >= c.vocab_size:
            raise MinirtError(f"token id out of range 0..{c.vocab_size - 1}")
        if isinstance(logits, str):
            if logits not in ("last", "all"):
                raise ValueError(f"logits must be 'last', 'all' or an index, not {logits!r}")
            want = np.arange(T - 1, T) if logits == "last" else np.arange(T)
        else:
            want = np.atleast_1d(np.arange(T)[logits])  # checked before the cache moves
        cache.reserve(T)
        self.rope(cache.capacity)
        scores = kernels.attention_scratch(c, cache.pos + T)
        final = np.empty((len(want), c.dim), np.float32)  # the last hidden state of the rows asked for
        n_chunks = -(-T // PREFILL_CHUNK)
        bounds = [T * i // n_chunks for i in range(n_chunks + 1)]  # balanced: no short last chunk
        for a, b in zip(bounds, bounds[1:]):
            x = self._run_layers(tokens[a:b], cache, scores)
            sel = np.flatnonzero((want >= a) & (want < b))
            final[sel] = x[want[sel] - a]
            if progress is not None:
                progress(b, T)
        h = self.norm(final, np.empty_like(final))
        return self.head.forward(h, np.empty((len(h), c.vocab_size), np.float32))

    def _embed(self, tokens: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """The residual stream (T, dim) entering the first layer."""
        x = self.embed[tokens]
        if self.pos_embed is not None:
            x += self.pos_embed[positions]
        if self.cfg.traits.embed_scale:
            x *= np.float32(math.sqrt(self.cfg.dim))
        return x

    def _run_layers(self, tokens: np.ndarray, cache: KVCache, scores: np.ndarray) -> np.ndarray:
        """The layers in one compiled call (cpu/step.py) where the step covers the model and T, else per operation."""
        if self.compiled_step and len(tokens) <= step.MAX_T:
            table = self._step_table()
            if table is not None and table.covers(len(tokens)):
                return table.run(self, tokens, cache, scores)
        return self._layers(tokens, cache, scores)

    def _step_table(self) -> "StepTable | None":
        """The compiled step's table for the model as it is now (rebuilt when a mode swaps a Linear or a
        norm), or None where the step does not cover the model (step_fallback_reason says why)."""
        key = step_key(self)
        if self._step is None or self._step[0] != key:
            self._step = (key, None if step_fallback_reason(self) else StepTable(self))
        return self._step[1]

    def _layers(self, tokens: np.ndarray, cache: KVCache, scores: np.ndarray) -> np.ndarray:
        """The residual stream (T, dim) after every layer for positions cache.pos …; the cache advances by T.
        The per-operation path (cpu/step.py runs the same kernels in one compiled call where it can)."""
        c = self.cfg
        T = len(tokens)
        pos0 = cache.pos
        positions = np.arange(pos0, pos0 + T, dtype=np.int64)
        s = self._buffers(T)
        x = self._embed(tokens, positions)
        tr = c.traits
        qd = c.q_dim
        act = {"swiglu": kernels.swiglu, "geglu": kernels.geglu, "gelu": kernels.gelu_new}[tr.ffn]
        for li, L in enumerate(self.layers):
            L.attn_norm(x, s["h"])
            L.qkv.forward(s["h"], s["qkv"])
            if L.q_norm is not None:
                kernels.head_rmsnorm(s["qkv"], 0, c.n_heads, c.head_dim, L.q_norm, c.norm_eps)
                kernels.head_rmsnorm(s["qkv"], qd, c.n_kv_heads, c.head_dim, L.k_norm, c.norm_eps)
            cos, sin = self.rope(0, c.layer_theta(li))
            kernels.qkv_rope_store(s["qkv"], positions, cos, sin, tr.rope, s["q"], cache.k[li], cache.v[li])
            kernels.attention(s["q"], cache.k[li], cache.v[li], pos0, c.scale, c.layer_window(li), scores, s["att"])
            o = L.wo.forward(s["att"].reshape(T, qd), s["o"])
            x += o if L.post_attn_norm is None else L.post_attn_norm(o, o)
            L.ffn_norm(x, s["h"])
            L.up.forward(s["h"], s["up"])
            act(s["up"], s["act"])
            o = L.down.forward(s["act"], s["o"])
            x += o if L.post_ffn_norm is None else L.post_ffn_norm(o, o)
        cache.pos = pos0 + T
        return x

    def logits(self, token_ids) -> np.ndarray:
        """Logits (T, vocab) for every position of a token sequence, from a fresh cache."""
        ids = list(token_ids)
        return self.forward(ids, self.new_cache(len(ids)), logits="all")

    def truncated(self, n_layers: int) -> "Model":
        """The first n_layers with the final norm and head (early exit): a drafter sharing every weight."""
        from dataclasses import replace
        m = Model(replace(self.cfg, n_layers=n_layers), self.layers[:n_layers], self.embed, self.pos_embed,
                  self.norm, self.head, self.tokenizer, self.source, self.file_type, self.ctx, self.kv_type)
        return m

    # ---- conveniences -------------------------------------------------------------------------
    def warmup(self) -> float:
        """Run the kernels once (one position, then a few at once, as a decode step and a prompt pass do) so
        that compiling or loading them from Numba's cache is not counted as prompt or decode time, as
        llama.cpp's warm-up run does. Returns the seconds it took."""
        import time
        t0 = time.perf_counter()
        cache = self.new_cache(32)
        tok = self.tokenizer.bos_id if self.tokenizer.bos_id is not None else 0
        for n in (1, 5, 24):  # a decode step, a few positions (drafts), a prompt (the batched path)
            self.forward([tok] * n, cache)
        jitcache.release_compiler_pages()  # LLVM ran only to load the kernels: its pages can go
        return time.perf_counter() - t0

    def generate(self, prompt, **kwargs):
        """Stream generated text pieces for a prompt (str or token ids), in the model's mode unless mode= is
        given; see minirt.generate.Generation."""
        from .generate import Generation
        return Generation(self, prompt, **kwargs)

    @property
    def weight_bytes(self) -> int:
        """Bytes of weights read per decode step (all matrices plus the head; embeddings read one row)."""
        return sum(L.qkv.nbytes + L.wo.nbytes + L.up.nbytes + L.down.nbytes for L in self.layers) + self.head.nbytes


# ---- loading the kernels before the weights ---------------------------------------------------------------
TWIN_WIDTH = 256          # a multiple of every block format's row length (32, and 256 for the K-quants)
TWIN_MIN_BYTES = 32 << 20  # smaller checkpoints gain nothing worth a second model


def kernel_twin(ck: Checkpoint) -> Checkpoint | None:
    """A checkpoint of ck's architecture, layer count, heads and per-matrix formats at width, FFN width and
    vocabulary TWIN_WIDTH, every weight zero: running it loads from Numba's cache the kernels the real model
    calls (same array types), at a time when no weight is resident. None for small or low-rank checkpoints."""
    from .readers.validate import expected_shapes, tensor_nbytes
    if any(".lr_" in k for k in ck.tensors) or sum(getattr(t.data, "nbytes", 0) for t in ck.tensors.values()) \
            < TWIN_MIN_BYTES:
        return None
    import dataclasses
    w = TWIN_WIDTH
    cfg = dataclasses.replace(ck.config, dim=w, hidden_dim=w, vocab_size=w)
    req, opt = expected_shapes(cfg, {k: tuple(t.shape) for k, t in ck.tensors.items()})
    floats = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}
    tensors = {}
    for name, t in ck.tensors.items():
        shape = req.get(name, opt.get(name))
        if shape is None:
            continue
        if t.qtype in floats:
            data = np.zeros(shape, floats[t.qtype])
        else:
            rows = math.prod(shape[:-1])
            data = np.zeros((rows, tensor_nbytes(t.qtype, shape) // rows) if len(shape) > 1 else tensor_nbytes(t.qtype, shape),
                            np.uint8)
        if isinstance(t.data, np.ndarray) and not t.data.flags.writeable:
            data.flags.writeable = False  # a matrix mapped from the file: the kernels' read-only array types
        tensors[name] = Tensor(data, t.qtype, shape)
    from .readers.base import TokenizerSpec
    from .readers.validate import validate
    # heads × head_dim need not be the twin's width (as a file's explicit key_length allows)
    return validate(Checkpoint(cfg, tensors, TokenizerSpec("none"), None), explicit_head_dim=True)


def warm_kernels(ck: Checkpoint, dequantize: bool = False, exact: bool = False, kv_type: str = "f32") -> float:
    """Load the kernels ck's model will call by running its zero-weight twin (kernel_twin), then release the
    compiler's pages: Numba touches ~60 MB of LLVM's code for every kernel it loads, which otherwise stays
    resident beside the weights (peak RSS). Returns the seconds it took (compiling, on a first run), 0.0 where
    no twin ran (the model's own warmup() then loads the kernels)."""
    import time
    t0 = time.perf_counter()
    try:
        twin = kernel_twin(ck)
    except MinirtError:  # a config the shrunk widths do not fit: the kernels then load with the model
        return 0.0
    if twin is None:
        return 0.0
    Model.from_checkpoint(twin, dequantize=dequantize, exact=exact, kv_type=kv_type).warmup()
    return time.perf_counter() - t0


# ---- the compiled decode step's table (cpu/step.py) ----------------------------------------------------------
# The step covers what it knows: the traits below, the Linears Dense and Quant (float32 activations of
# exact=True and every other Linear, e.g. modes' low-rank or pinv ones, go per operation), norms of the
# trait's kind. A trait or config field added later that the step does not know takes the per-operation
# path unless it has its default value (a feature that is off). tests/test_step.py holds both paths equal.
STEP_TRAITS = {"norm", "ffn", "rope", "qk_norm", "post_norms", "embed_scale", "fused_qkv", "swa_pattern",
               "fused_up", "gguf_pairs"}  # the last two only change how matrices are read, not the step
STEP_CONFIG = {"arch", "vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "hidden_dim", "max_ctx",
               "norm_eps", "rope_theta", "tied_head", "attn_scale", "sliding_window", "rope_local_theta",
               # windows and RoPE frequencies reach the step through layer_window(i) and the RoPE tables
               "swa_layers", "rope_scaling", "rope_factor", "rope_llama3", "rope_freq_factors"}


def _unknown_fields(obj, known: set[str]) -> list[str]:
    import dataclasses
    return [f.name for f in dataclasses.fields(obj) if f.name not in known
            and (f.default is dataclasses.MISSING or getattr(obj, f.name) != f.default)]


def step_key(model: Model) -> tuple:
    """What the table is built from: the Layer, Linear and Norm objects (a mode that swaps one invalidates it)."""
    return (id(model.layers), len(model.layers)) + tuple(
        id(o) for L in model.layers for o in (L, L.qkv, L.wo, L.up, L.down, L.attn_norm, L.ffn_norm))


def step_fallback_reason(model: Model) -> str | None:
    """Why the compiled step does not run this model (None: it does)."""
    c = model.cfg
    tr = c.traits
    if type(model)._layers is not Model._layers or type(model)._embed is not Model._embed:
        return "the model class has its own layer loop"
    if (bad := _unknown_fields(tr, STEP_TRAITS)) or (bad := _unknown_fields(c, STEP_CONFIG)):
        return f"trait or config field the step does not know: {', '.join(bad)}"
    if tr.ffn not in step.FFNS or tr.norm not in ("rms", "layer"):
        return f"ffn {tr.ffn!r} / norm {tr.norm!r}"
    want_bias = tr.norm == "layer"
    for i, L in enumerate(model.layers):
        for name in ("qkv", "wo", "up", "down"):
            for lin in _leaves(getattr(L, name)):
                if type(lin) is Dense:
                    continue
                if type(lin) is not Quant or lin.qtype not in step.FORMATS or lin.exact or lin.bias is not None \
                        and lin is not getattr(L, name):
                    return (f"layer {i} {name}: {type(lin).__name__}"
                            f"{' (exact)' if getattr(lin, 'exact', False) else ''}")
        norms = [L.attn_norm, L.ffn_norm] + ([L.post_attn_norm, L.post_ffn_norm] if tr.post_norms else [])
        if any(type(n) is not Norm or (n.bias is not None) != want_bias for n in norms):
            return f"layer {i}: a norm of another kind"
        if tr.qk_norm and (L.q_norm is None or L.k_norm is None):
            return f"layer {i}: q/k norms missing"
        if not tr.post_norms and (L.post_attn_norm is not None or L.post_ffn_norm is not None):
            return f"layer {i}: post norms the traits do not name"
        if not tr.qk_norm and L.q_norm is not None:
            return f"layer {i}: q/k norms the traits do not name"
    return None


def _leaves(lin) -> list:
    """The stored matrices a Linear runs: itself, or a low-rank matrix's two factors (V, U); the caller checks
    that each is a kind the step runs."""
    return [lin.v, lin.u] if type(lin) is LowRank else [lin]


def _one_type(arrays: list[np.ndarray]) -> tuple:
    """The arrays as one Numba type: all read-only views if any is read-only (a matrix mapped from the file)."""
    if all(a.flags.writeable for a in arrays):
        return tuple(arrays)
    out = []
    for a in arrays:
        v = a.view()
        v.flags.writeable = False
        out.append(v)
    return tuple(out)


class StepTable:
    """The model's matrices and other weights as the arrays cpu/step.layers reads (views: nothing copied but
    the small norm weights)."""

    def __init__(self, model: Model):
        c, tr = model.cfg, model.cfg.traits
        ph8, ph16, phf = np.zeros((1, 1), np.uint8), np.zeros((1, 1), np.uint16), np.zeros((1, 1), np.float32)
        fmt, sub = [], []
        self.qs, self.hs, self.ms, self.fs, self.bs = ([] for _ in range(5))
        self.max_k = self.max_rank = 32
        self.dense = False

        def add(lin, i=None):  # matrix lin as entry i of the table (default: the next one)
            if i is None:
                i = len(fmt)
                fmt.append(0), sub.append((0, 0, 0))
                for v in (self.qs, self.hs, self.ms, self.fs, self.bs):
                    v.append(None)
            self.qs[i], self.hs[i], self.fs[i] = ph8, ph16, phf
            self.max_k = max(self.max_k, lin.in_features)
            self.bs[i] = lin.bias if lin.bias is not None else np.zeros(0, np.float32)
            self.ms[i] = np.zeros((lin.out_features, 0), np.uint16)
            if type(lin) is LowRank:
                fmt[i] = step.LOWRANK
                sub[i] = (add(lin.v), add(lin.u), lin.rank)
                self.max_rank = max(self.max_rank, lin.rank)
            elif type(lin) is Dense:
                self.dense = True
                fmt[i], self.fs[i] = 0, lin.w
            else:
                fmt[i] = step.FORMATS[lin.qtype]
                self.qs[i] = lin.qi.view(np.uint8) if lin.nb else ph8  # the interleaved layout
                self.hs[i] = lin.di if lin.nb else lin.qn
                if lin.nb and lin.mi.shape[1]:
                    self.ms[i] = lin.mi
            return i
        n_main = 4 * c.n_layers  # entries 4·layer + (qkv, wo, up, down); low-rank factors come after them
        fmt += [0] * n_main
        sub += [(0, 0, 0)] * n_main
        for v in (self.qs, self.hs, self.ms, self.fs, self.bs):
            v += [None] * n_main
        for i, L in enumerate(model.layers):
            for j, lin in enumerate((L.qkv, L.wo, L.up, L.down)):
                add(lin, 4 * i + j)
        self.fmt, self.sub = np.array(fmt, np.int64), np.array(sub, np.int64).reshape(-1, 3)
        self.qs, self.hs, self.ms, self.fs, self.bs = (step.as_list(_one_type(v)) for v in (self.qs, self.hs, self.ms,
                                                                                         self.fs, self.bs))
        L0 = model.layers
        zero = np.zeros(c.dim, np.float32)

        def nrm(n, what):
            return (n.weight, n.bias if n.bias is not None else zero) if n is not None else (zero, zero)
        ns = [[nrm(L.attn_norm, 0), nrm(L.ffn_norm, 1), nrm(L.post_attn_norm, 2), nrm(L.post_ffn_norm, 3)] for L in L0]
        self.nw = np.array([[w for w, _ in row] for row in ns], np.float32)
        self.nb = np.array([[b for _, b in row] for row in ns], np.float32)
        hz = np.zeros(c.head_dim, np.float32)
        self.qkn = np.array([[L.q_norm if L.q_norm is not None else hz, L.k_norm if L.k_norm is not None else hz]
                             for L in L0], np.float32)
        self.win = np.array([c.layer_window(i) for i in range(c.n_layers)], np.int64)
        self.rope_i = np.array([model.thetas.index(c.layer_theta(i)) if tr.rope else 0 for i in range(c.n_layers)],
                               np.int64)
        self.eps = float(model.layers[0].attn_norm.eps) if model.layers else c.norm_eps
        leaves = [lin for L in L0 for m in (L.qkv, L.wo, L.up, L.down) for lin in _leaves(m)]
        odd = any(lin.nb % 2 for lin in leaves if type(lin) is Quant)
        self.tags = (isa.tag(), isa.tag("avxvnni") if odd and isa.SELECTED == "avx512vnni" else None)
        codes = set(self.fmt.tolist())
        self.has = tuple(isa.tag() if c in codes else None for c in range(len(step.FORMATS)))
        self._rope = (None, None, None)
        self._act: dict[int, tuple] = {}

    def covers(self, T: int) -> bool:
        """Positions the step runs with the per-operation path's kernels (Dense switches to BLAS at BLAS_MIN_ROWS)."""
        from .linear import BLAS_MIN_ROWS
        return T <= step.MAX_T and not (self.dense and T >= BLAS_MIN_ROWS)

    def _tables(self, model: Model):
        """cos/sin of every RoPE base stacked (n_bases, n, hd/2), rebuilt when Model.rope grows them."""
        tabs = [model.rope_tables[th] for th in model.thetas]
        ids = tuple(id(t[0]) for t in tabs)
        if self._rope[0] != ids:
            self._rope = (ids, np.stack([t[0] for t in tabs]), np.stack([t[1] for t in tabs]))
        return self._rope[1], self._rope[2]

    def run(self, model: Model, tokens: np.ndarray, cache: KVCache, scores: np.ndarray) -> np.ndarray:
        """The residual stream after every layer for T positions of one sequence, from cache.pos on."""
        T = len(tokens)
        positions = np.arange(cache.pos, cache.pos + T, dtype=np.int64)
        if cache.pool is not None:  # a slot of a pool (the server's): the pool, addressed by the slot
            x = self.run_rows(model, tokens, *cache.pool, np.full(T, cache.slot, np.int64), positions, scores)
        else:
            x = self.run_rows(model, tokens, cache.k[:, None], cache.v[:, None], np.zeros(T, np.int64), positions,
                              scores)
        cache.pos += T
        return x

    def run_rows(self, model: Model, tokens: np.ndarray, kc: np.ndarray, vc: np.ndarray, slots: np.ndarray,
                 positions: np.ndarray, scores: np.ndarray) -> np.ndarray:
        """As run, for rows that each carry their own cache and position: token t goes to position
        positions[t] of cache slot slots[t] of kc/vc (L, S, Hkv, ctx, hd). Positions are not advanced."""
        x = np.ascontiguousarray(model._embed(tokens, positions), dtype=np.float32)
        self.run_layers(model, x, kc, vc, slots, positions, scores)
        return x

    NO_STOP = np.zeros(1, np.int64)

    def run_layers(self, model: Model, x: np.ndarray, kc: np.ndarray, vc: np.ndarray, slots: np.ndarray,
                   positions: np.ndarray, scores: np.ndarray, start: int = 0, end: int | None = None,
                   stop: np.ndarray = NO_STOP) -> int:
        """Layers start … end−1 (default: to the last) for the residual stream x (T, dim) of rows as run_rows,
        in place. Another thread setting stop[0] non-zero ends the call at the next layer boundary: returns
        the layer it stopped before (end when it ran them all)."""
        c, tr = model.cfg, model.cfg.traits
        T = len(x)
        s = model._buffers(T)
        cos, sin = self._tables(model)
        if T not in self._act:
            nb = self.max_k // 32
            self._act[T] = (np.empty(T * self.max_rank, np.float32), np.empty(T * self.max_k, np.int8),
                            np.empty(T * nb * 8, np.float32), np.empty(T * nb, np.float32), np.empty(T * nb, np.float32))
        mid, xqb, xdeb, xsb, xkb = self._act[T]
        return step.layers(self.tags[0], self.tags[1], self.has, self.fmt, self.sub, self.qs, self.hs, self.ms,
                           self.fs, self.bs, self.nw, self.nb, self.qkn, self.win, self.rope_i, cos, sin,
                           tr.norm == "layer", step.FFNS[tr.ffn], tr.rope, tr.qk_norm, tr.post_norms, self.eps, c.scale,
                           x, slots, positions, kc, vc, s["h"], s["o"], s["qkv"], s["q"], s["att"], s["up"],
                           s["act"], scores, mid, xqb, xdeb, xsb, xkb, numba.get_num_threads(),
                           start, len(self.win) if end is None else end, stop)
