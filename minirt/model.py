"""Model: a ModelConfig, one Linear per weight matrix, norms and embeddings, and the forward pass.

forward(tokens, cache) runs T new positions (the whole prompt at once, or one token per decode step)
against the KV cache and returns logits for the rows asked for. GPT-2 and LLaMA share the pass:
    x = embed[tokens] (+ pos_embed[positions])                          GPT-2: learned positions
    per layer:  h = norm(x);  q,k,v = h·Wqkv;  RoPE(q,k) (LLaMA);  cache ← k,v
                x += attention(q, cache)·Wo
                h = norm(x);  x += act(h·Wup)·Wdown                     LLaMA: silu(h·Wg)·(h·Wu), fused as one Linear
    logits = norm(x)·Headᵀ
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

import numpy as np

from . import kernels
from .config import ModelConfig
from .errors import MinirtError
from .kvcache import KVCache
from .linear import Dense, Linear, Quant, make_linear
from .readers import Checkpoint, Tensor
from .threads import blas_single_threaded
from .tokenizer import Tokenizer, build_tokenizer


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
    up: Linear      # LLaMA: gate | up (2·hidden rows); GPT-2: fc (hidden rows)
    down: Linear


class Model:
    mode = "dense"                           # what generate() decodes with by default: minirt.load(mode=…)
    mode_options = MappingProxyType({})      # … and that mode's options (minirt.modes.remember sets both)

    def __init__(self, cfg: ModelConfig, layers: list[Layer], embed: Embedding, pos_embed: np.ndarray | None,
                 norm: Norm, head: Linear, tokenizer: Tokenizer, source: Path | None = None, file_type: str = ""):
        self.cfg, self.layers, self.embed, self.pos_embed = cfg, layers, embed, pos_embed
        self.norm, self.head, self.tokenizer = norm, head, tokenizer
        self.source, self.file_type = source, file_type
        if cfg.arch == "llama":
            self.rope_cos, self.rope_sin = kernels.rope_tables(cfg.max_ctx, cfg.head_dim, cfg.rope_theta)
        else:  # no rotary embedding: empty tables keep one kernel signature
            self.rope_cos = self.rope_sin = np.zeros((1, 1), np.float32)
        self._scratch: dict[int, dict[str, np.ndarray]] = {}

    @classmethod
    def from_checkpoint(cls, ck: Checkpoint, dequantize: bool = False, exact: bool = False) -> "Model":
        """Build the model. Matrices stay in their stored format (Quant) unless dequantize=True (float32).
        Decode steps on block formats round activations to int8 per block, as llama.cpp does;
        exact=True keeps them float32 (slower; what the float reference tests use)."""
        cfg, t = ck.config, ck.tensors

        def linear(ws, bs=None):
            return make_linear(ws, bs, dequantize, exact)

        def matrix(name: str, ws: list[str], bs: list[str]) -> Linear:
            """The Linear for canonical matrices ws stacked (biases bs), or its factors in a low-rank export."""
            if name + ".lr_u" in t:
                from .lowrank import lowrank_from_tensors
                b = t.get(name + ".lr_b")
                return lowrank_from_tensors(t[name + ".lr_u"], t[name + ".lr_v"], None if b is None else b.float32(),
                                            exact)
            return linear([t[w] for w in ws], [t.get(b) for b in bs])
        eps = cfg.norm_eps

        def norm(prefix: str) -> Norm:
            b = t.get(prefix + ".bias")
            # copies: once loading is done nothing refers to the mapped file, which is then unmapped
            return Norm(np.array(t[prefix + ".weight"].float32()), None if b is None else np.array(b.float32()), eps)

        layers = []
        for i in range(cfg.n_layers):
            p = f"layers.{i}."
            if cfg.arch == "llama":
                qkv = matrix(p + "qkv", [p + "wq", p + "wk", p + "wv"], [p + "bq", p + "bk", p + "bv"])
                up = matrix(p + "up", [p + "w_gate", p + "w_up"], [p + "b_gate", p + "b_up"])
            else:
                qkv = matrix(p + "qkv", [p + "wqkv"], [p + "bqkv"])
                up = matrix(p + "up", [p + "w_up"], [p + "b_up"])
            layers.append(Layer(norm(p + "attn_norm"), qkv, matrix(p + "wo", [p + "wo"], [p + "bo"]),
                                norm(p + "ffn_norm"), up, matrix(p + "down", [p + "w_down"], [p + "b_down"])))
            ck.release_pages()
        head = matrix("head", ["embed" if cfg.tied_head else "head"], [])
        table = head if cfg.tied_head else (linear([t["embed"]]) if "head.lr_u" in t else None)
        embed = Embedding(t["embed"], table)  # a tied head (or a copy, if the head is factored) is the table
        pos = np.array(t["pos_embed"].float32()) if "pos_embed" in t else None
        ck.release_pages()
        tok = build_tokenizer(ck.tokenizer, cfg.vocab_size)
        model = cls(cfg, layers, embed, pos, norm("norm"), head, tok, ck.source, ck.file_type)
        if "minirt.lowrank.manifest" in ck.metadata:
            from .lowrank import describe_export
            describe_export(model, ck.metadata["minirt.lowrank.manifest"])
        return model

    # ---- the forward pass -------------------------------------------------------------------------
    def new_cache(self, capacity: int | None = None) -> KVCache:
        return KVCache(self.cfg, min(capacity or self.cfg.max_ctx, self.cfg.max_ctx))

    def _buffers(self, T: int) -> dict[str, np.ndarray]:
        """Activation buffers for T positions, allocated once per distinct T and reused."""
        s = self._scratch.get(T)
        if s is None:
            c = self.cfg
            up_rows = self.layers[0].up.out_features
            s = dict(h=np.empty((T, c.dim), np.float32), o=np.empty((T, c.dim), np.float32),
                     qkv=np.empty((T, c.q_dim + 2 * c.kv_dim), np.float32),
                     q=np.empty((T, c.n_heads, c.head_dim), np.float32),
                     att=np.empty((T, c.n_heads, c.head_dim), np.float32),
                     up=np.empty((T, up_rows), np.float32), act=np.empty((T, c.hidden_dim), np.float32))
            if len(self._scratch) > 8:
                self._scratch.clear()
            self._scratch[T] = s
        return s

    def forward(self, tokens, cache: KVCache, logits="last") -> np.ndarray:
        """Run positions cache.pos … cache.pos+T−1 and return logits (rows, vocab) as float32.

        logits: "last" (one row), "all", or anything that indexes the T rows (a slice, an index array)."""
        if len(np.atleast_1d(tokens)) < 4:
            return self._forward(tokens, cache, logits)
        with blas_single_threaded():
            return self._forward(tokens, cache, logits)

    def _forward(self, tokens, cache: KVCache, logits) -> np.ndarray:
        c = self.cfg
        tokens = np.asarray(tokens, dtype=np.int64).reshape(-1)
        T = len(tokens)
        if T == 0:
            raise MinirtError("no tokens to run")
        if tokens.min() < 0 or tokens.max() >= c.vocab_size:
            raise MinirtError(f"token id out of range 0..{c.vocab_size - 1}")
        cache.reserve(T)
        pos0 = cache.pos
        positions = np.arange(pos0, pos0 + T, dtype=np.int64)
        s = self._buffers(T)
        x = self.embed[tokens]
        if self.pos_embed is not None:
            x += self.pos_embed[positions]
        scores = np.empty((T * c.n_heads, pos0 + T), np.float32)
        scale = 1.0 / math.sqrt(c.head_dim)
        qd = c.q_dim
        for li, L in enumerate(self.layers):
            L.attn_norm(x, s["h"])
            L.qkv.forward(s["h"], s["qkv"])
            kernels.qkv_rope_store(s["qkv"], positions, self.rope_cos, self.rope_sin, c.arch == "llama",
                                   s["q"], cache.k[li], cache.v[li])
            kernels.attention(s["q"], cache.k[li], cache.v[li], pos0, scale, scores, s["att"])
            x += L.wo.forward(s["att"].reshape(T, qd), s["o"])
            L.ffn_norm(x, s["h"])
            L.up.forward(s["h"], s["up"])
            if c.arch == "llama":
                kernels.swiglu(s["up"], s["act"])
            else:
                kernels.gelu_new(s["up"], s["act"])
            x += L.down.forward(s["act"], s["o"])
        cache.pos = pos0 + T
        if isinstance(logits, str):
            if logits not in ("last", "all"):
                raise ValueError(f"logits must be 'last', 'all' or an index, not {logits!r}")
            rows = x[-1:] if logits == "last" else x
        else:
            rows = x[logits]
        rows = np.ascontiguousarray(rows)
        h = self.norm(rows, np.empty_like(rows))
        return self.head.forward(h, np.empty((len(h), c.vocab_size), np.float32))

    def logits(self, token_ids) -> np.ndarray:
        """Logits (T, vocab) for every position of a token sequence, from a fresh cache."""
        ids = list(token_ids)
        return self.forward(ids, self.new_cache(len(ids)), logits="all")

    def truncated(self, n_layers: int) -> "Model":
        """The first n_layers with the final norm and head (early exit): a drafter sharing every weight."""
        from dataclasses import replace
        m = Model(replace(self.cfg, n_layers=n_layers), self.layers[:n_layers], self.embed, self.pos_embed,
                  self.norm, self.head, self.tokenizer, self.source, self.file_type)
        return m

    # ---- conveniences -------------------------------------------------------------------------
    def generate(self, prompt, **kwargs):
        """Stream generated text pieces for a prompt (str or token ids), in the model's mode unless mode= is
        given; see minirt.generate.Generation."""
        from .generate import Generation
        return Generation(self, prompt, **kwargs)

    @property
    def weight_bytes(self) -> int:
        """Bytes of weights read per decode step (all matrices plus the head; embeddings read one row)."""
        return sum(L.qkv.nbytes + L.wo.nbytes + L.up.nbytes + L.down.nbytes for L in self.layers) + self.head.nbytes
