"""One decode step for several sequences at once: the next position of each, each with its own KV cache.

The rows of a step belong to different sequences, so the matrices (embedding rows, norms, every Linear, the
head) run once on the stacked rows — each weight read once per step for all of them, which is what makes
batching cheap when decoding is memory-bound — while RoPE, the KV store and attention run per sequence, at
that sequence's own position, against its own cache:
    x = embed[tokens]                         (n, dim): one row per sequence
    per layer:  q,k,v = norm(x)·Wqkv          all rows at once
                for each sequence i: RoPE at pos_i; cache_i ← k_i, v_i; att_i = attention(q_i, cache_i)
                x += att·Wo;  x += ffn(norm(x))   all rows at once
    logits = norm(x)·Headᵀ

Every kernel computes a row from that row (and its own cache) alone as long as a step has fewer rows than the
Linears' batched (BLAS/GEMM) threshold, so a sequence's logits are the same bits whether it runs alone or
beside others: step() runs larger batches in groups of at most MAX_ROWS.
"""
from __future__ import annotations

import math

import numpy as np

from .cpu import kernels
from .errors import MinirtError
from .kvcache import KVCache
from .linear import BLAS_MIN_ROWS, KQuant, Quant, Stacked

# Rows per pass: below both batched thresholds (Dense: BLAS from BLAS_MIN_ROWS rows; Quant: dequantized
# tiles + BLAS from GEMM_MIN_ROWS), where every matrix kernel computes each row on its own.
MAX_ROWS = min(BLAS_MIN_ROWS, Quant.GEMM_MIN_ROWS) - 1


class BatchStep:
    """step(tokens, caches) → logits (n, vocab): position caches[i].pos of sequence i takes tokens[i]; every
    cache advances by one. Activation buffers are allocated once, for MAX_ROWS rows."""

    def __init__(self, model):
        if not hasattr(model, "layers") or getattr(model, "device", "cpu") != "cpu":
            raise MinirtError("batched decoding runs on the CPU model only (load it with device='cpu')")
        self.model = model
        c = model.cfg
        n = MAX_ROWS
        up_rows = model.layers[0].up.out_features
        self.buf = dict(h=np.empty((n, c.dim), np.float32), o=np.empty((n, c.dim), np.float32),
                        qkv=np.empty((n, c.q_dim + 2 * c.kv_dim), np.float32),
                        q=np.empty((n, c.n_heads, c.head_dim), np.float32),
                        att=np.empty((n, c.n_heads, c.head_dim), np.float32),
                        up=np.empty((n, up_rows), np.float32), act=np.empty((n, c.hidden_dim), np.float32))
        self.act = {"swiglu": kernels.swiglu, "geglu": kernels.geglu, "gelu": kernels.gelu_new}[c.traits.ffn]

    def __call__(self, tokens, caches: list[KVCache]) -> np.ndarray:
        tokens = np.asarray(tokens, dtype=np.int64).reshape(-1)
        if len(tokens) != len(caches):
            raise ValueError(f"{len(tokens)} tokens for {len(caches)} caches")
        if len({id(c) for c in caches}) != len(caches):
            raise ValueError("a cache appears twice in one step")
        vocab = self.model.cfg.vocab_size
        if len(tokens) and (tokens.min() < 0 or tokens.max() >= vocab):
            raise MinirtError(f"token id out of range 0..{vocab - 1}")
        for c in caches:
            c.reserve(1)
        if len(tokens) <= MAX_ROWS:  # one pass: its logits as they are (a second (n, vocab) array and a copy
            return self._rows(tokens, caches)  # cost ~1 ms a step at n = 8: glibc maps fresh pages for each)
        out = np.empty((len(tokens), vocab), np.float32)
        for a in range(0, len(tokens), MAX_ROWS):
            b = min(a + MAX_ROWS, len(tokens))
            out[a:b] = self._rows(tokens[a:b], caches[a:b])
        return out

    def _compiled(self, tokens: np.ndarray, caches: list[KVCache]) -> np.ndarray | None:
        """The rows through the compiled step (cpu/step.py) in one call, where the model has a step table and
        the caches are slots of one pool (KVCache.pooled); None otherwise."""
        m = self.model
        pool = caches[0].pool
        if pool is None or any(c.pool is not pool for c in caches) or not m.compiled_step:
            return None
        table = m._step_table()
        if table is None or not table.covers(len(tokens)):
            return None
        positions = np.array([c.pos for c in caches], np.int64)
        slots = np.array([c.slot for c in caches], np.int64)
        scores = kernels.attention_scratch(m.cfg, int(positions.max()) + 1)
        return table.run_rows(m, tokens, pool[0], pool[1], slots, positions, scores)

    def _rows(self, tokens: np.ndarray, caches: list[KVCache]) -> np.ndarray:
        m, c = self.model, self.model.cfg
        n = len(tokens)
        m.rope(max(cache.capacity for cache in caches))
        x = self._compiled(tokens, caches)
        if x is not None:
            for cache in caches:
                cache.pos += 1
            h = m.norm(x, np.empty_like(x))
            return m.head.forward(h, np.empty((n, c.vocab_size), np.float32))
        s = {k: v[:n] for k, v in self.buf.items()}
        positions = [np.array([cache.pos], np.int64) for cache in caches]
        scores = kernels.attention_scratch(c, max(cache.pos for cache in caches) + 1)
        x = m.embed[tokens]
        if m.pos_embed is not None:
            x += m.pos_embed[np.concatenate(positions)]
        tr = c.traits
        if tr.embed_scale:
            x *= np.float32(math.sqrt(c.dim))
        qd = c.q_dim
        for li, L in enumerate(m.layers):
            L.attn_norm(x, s["h"])
            L.qkv.forward(s["h"], s["qkv"])
            if L.q_norm is not None:
                kernels.head_rmsnorm(s["qkv"], 0, c.n_heads, c.head_dim, L.q_norm, c.norm_eps)
                kernels.head_rmsnorm(s["qkv"], qd, c.n_kv_heads, c.head_dim, L.k_norm, c.norm_eps)
            cos, sin = m.rope(0, c.layer_theta(li))
            window = c.layer_window(li)
            for i, cache in enumerate(caches):  # per sequence: its position, its cache
                kernels.qkv_rope_store(s["qkv"][i:i + 1], positions[i], cos, sin, tr.rope, s["q"][i:i + 1],
                                       cache.k[li], cache.v[li])
                kernels.attention(s["q"][i:i + 1], cache.k[li], cache.v[li], cache.pos, c.scale, window, scores,
                                  s["att"][i:i + 1])
            o = L.wo.forward(s["att"].reshape(n, qd), s["o"])
            x += o if L.post_attn_norm is None else L.post_attn_norm(o, o)
            L.ffn_norm(x, s["h"])
            L.up.forward(s["h"], s["up"])
            self.act(s["up"], s["act"])
            o = L.down.forward(s["act"], s["o"])
            x += o if L.post_ffn_norm is None else L.post_ffn_norm(o, o)
        for cache in caches:
            cache.pos += 1
        h = m.norm(x, np.empty_like(x))
        return m.head.forward(h, np.empty((n, c.vocab_size), np.float32))


class Pass:
    """One compiled call over rows of several sequences, each part a run of positions of one sequence: the
    next token of a decoding sequence, or a chunk of a prompt (chunked prefill mixed into the decode step, as
    vLLM and llama-server schedule it). Every kernel computes a row from that row and its own cache alone, so
    each part gives the bits it gives alone (for prompts: where positions_independent(model) holds). Parts can
    join while the pass runs: the pass stops at a layer boundary when the stop flag is set (run), and a part
    added then (add) first runs the layers before that boundary on its own rows, then goes on with the rest.
        p = Pass(model, caches[0].pool); p.add(cache, [tok]); p.add(cache2, prompt)
        while not p.run(stop): p.add(...)           # a part that arrived while the pass ran
        rows = p.logits()                           # the last position's logits of each part (None: want=False)
    At most MAX_ROWS rows in all; caches are slots of one pool (KVCache.pooled) and advance in logits().
    (The server's batcher stops a pass to run a new request's prompt on its own, then resumes it: a part
    joining mid-way makes its first token wait for the whole, wider rest of the pass.)"""

    def __init__(self, model, pool):
        self.model, self.pool = model, pool
        self.table = model._step_table()
        if pool is None or self.table is None or not self.table.covers(MAX_ROWS):
            raise ValueError("a pass needs pooled caches and the compiled step")
        self.parts: list[tuple[KVCache, int, bool]] = []  # (cache, rows, want) in the order of the rows
        self.new: list[tuple[KVCache, np.ndarray]] = []   # parts added since the last run (not in x yet)
        self.rows = 0
        self.x = np.empty((0, model.cfg.dim), np.float32)
        self.slots = self.positions = np.empty(0, np.int64)
        self.layer = 0  # the layers before this one have run for every row of x

    def _scores(self, positions):
        return kernels.attention_scratch(self.model.cfg, int(positions.max()) + 1)

    def add(self, cache: KVCache, tokens, want: bool = True) -> None:
        """Positions cache.pos … of tokens join the pass (at its next run()); want: return the last one's logits."""
        m = self.model
        tokens = np.asarray(tokens, dtype=np.int64).reshape(-1)
        if not len(tokens) or self.rows + len(tokens) > MAX_ROWS:
            raise ValueError(f"{len(tokens)} rows do not fit in a pass of {self.rows} (at most {MAX_ROWS})")
        if cache.pool is not self.pool or any(c is cache for c, _, _ in self.parts):
            raise ValueError("a part's cache must be a slot of the pass's pool, and in the pass once")
        if tokens.min() < 0 or tokens.max() >= m.cfg.vocab_size:
            raise MinirtError(f"token id out of range 0..{m.cfg.vocab_size - 1}")
        cache.reserve(len(tokens))
        self.parts.append((cache, len(tokens), want))
        self.new.append((cache, tokens))
        self.rows += len(tokens)

    def _take_new(self) -> None:
        """The rows added since the last run into x (embedded; the layers before self.layer run on them alone)."""
        m = self.model
        tokens = np.concatenate([t for _, t in self.new])
        positions = np.concatenate([np.arange(c.pos, c.pos + len(t), dtype=np.int64) for c, t in self.new])
        slots = np.concatenate([np.full(len(t), c.slot, np.int64) for c, t in self.new])
        m.rope(max(c.capacity for c, _ in self.new))
        self.new = []
        x = np.ascontiguousarray(m._embed(tokens, positions), dtype=np.float32)
        if self.layer:  # catch up with the rows already in the pass
            self.table.run_layers(m, x, *self.pool, slots, positions, self._scores(positions), 0, self.layer)
        if len(self.x):
            x, slots, positions = (np.concatenate(p) for p in ((self.x, x), (self.slots, slots),
                                                                (self.positions, positions)))
        self.x, self.slots, self.positions = x, slots, positions

    def run(self, stop: np.ndarray = None) -> bool:
        """Run the remaining layers; True when done, False when stop[0] was set (at a layer boundary)."""
        if self.new:
            self._take_new()
        stop = self.table.NO_STOP if stop is None else stop
        self.layer = self.table.run_layers(self.model, self.x, *self.pool, self.slots, self.positions,
                                           self._scores(self.positions), self.layer, None, stop)
        return self.layer == len(self.table.win)

    def logits(self) -> list:
        """Each part's last-position logits (vocab,) (None where not wanted); every cache advances."""
        m = self.model
        if self.new or self.layer < len(self.table.win):
            raise ValueError("the pass has rows that have not run: run() it to the end first")
        ends = np.cumsum([n for _, n, _ in self.parts]) - 1
        want = [e for e, (_, _, w) in zip(ends, self.parts) if w]
        out = [None] * len(self.parts)
        if want:
            x = self.x[want]
            rows = m.head.forward(m.norm(x, np.empty_like(x)), np.empty((len(want), m.cfg.vocab_size), np.float32))
            it = iter(rows)
            out = [next(it) if w else None for _, _, w in self.parts]
        for cache, n, _ in self.parts:
            cache.pos += n
        return out


def positions_independent(model) -> bool:
    """Whether a position's result has the same bits however positions are grouped into calls (so that KV rows
    of a prefix computed in one request serve another): every matrix of the layers is a block format or a
    K-quant on its integer kernels, which take any number of positions row by row. F16/F32 matrices (from 16
    positions the prompt GEMM or BLAS, which sum in another order) and exact=True (float tiles from 17) are not."""
    def ok(m):
        if isinstance(m, Stacked):
            return all(ok(p) for p in m.parts)
        return (isinstance(m, Quant) and m.nb > 0 or isinstance(m, KQuant)) and not m.exact
    return hasattr(model, "layers") and all(ok(m) for L in model.layers for m in (L.qkv, L.wo, L.up, L.down))
