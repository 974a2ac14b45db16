"""Speculative decoding: a cheap drafter proposes K tokens, the model scores them in one forward call over
K+1 positions, and the longest acceptable prefix is kept (KV caches rolled back past it).

Acceptance rule (Leviathan et al. / Chen et al.), with p the model's and q the drafter's distribution after
the same sampling transforms (temperature, top-k/p, min-p, repetition penalty):
    greedy   — accept draft x_i while x_i = argmax p_i; then emit argmax p_n (correction or bonus token)
    sampling — accept x_i with probability min(1, p_i(x_i) / q_i(x_i)); on the first rejection emit a token
               drawn from norm(max(0, p_i − q_i)); if all K are accepted, emit a bonus token from p_K.
Greedy output is token-identical to plain greedy decoding; sampled output follows the model's distribution.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..errors import MinirtError
from ..sampling import Sampler

MISSES = 3       # drafting stops after this many verify calls in a row accepted nothing …
PROBE = 16      # … and is retried after 2·PROBE steps, the wait doubling while retries fail …
PROBE_MAX = 128  # … up to this: when acceptance collapses, probes cost well under 5% of plain decoding
K_MAX = 6  # K+1 = 7 positions: below Quant.GEMM_MIN_ROWS (17) and BLAS_MIN_ROWS (16): the single-pass kernels


@dataclass
class SpecStats:
    steps: int = 0          # verification calls
    proposed: int = 0       # draft tokens proposed
    accepted: int = 0       # draft tokens accepted
    ks: list[int] = field(default_factory=list)

    def record(self, n_draft: int, n_ok: int) -> None:
        """One verify call: n_draft tokens proposed, n_ok accepted."""
        self.steps += 1
        self.proposed += n_draft
        self.accepted += n_ok
        self.ks.append(n_draft)

    @property
    def acceptance(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0

    @property
    def mean_accepted(self) -> float:
        """Tokens emitted per verification call (accepted drafts + the model's own token)."""
        return (self.accepted + self.steps) / self.steps if self.steps else 0.0

    def summary(self) -> str:
        return (f"speculative: {self.steps} verify calls, acceptance {self.acceptance:.0%}, "
                f"{self.mean_accepted:.2f} tokens per call")


class NGramDrafter:
    """Prompt lookup: propose what followed the most recent earlier occurrence of the longest suffix n-gram
    of the context (n = max_n … min_n). Deterministic, so its q is one-hot."""

    def __init__(self, max_n: int = 4, min_n: int = 2):
        self.max_n, self.min_n = max_n, min(min_n, max_n)  # a single matching token is too weak a cue

    def start(self, context: list[int], cache) -> None:
        pass

    def propose(self, context: list[int], k: int, sampler: Sampler) -> tuple[list[int], list[np.ndarray] | None]:
        ctx = np.asarray(context)
        L = len(ctx)
        for n in range(min(self.max_n, L - 1), self.min_n - 1, -1):
            suffix = ctx[L - n:]
            # candidate starts s with ctx[s:s+n] == suffix and s + n < L (something follows)
            windows = np.lib.stride_tricks.sliding_window_view(ctx[:L - 1], n)
            hits = np.flatnonzero((windows == suffix).all(axis=1))
            if len(hits):
                s = int(hits[-1]) + n
                return [int(t) for t in ctx[s:s + k]], None
        return [], None

    def rollback(self, context: list[int]) -> None:
        pass


class ModelDrafter:
    """A smaller model proposing tokens with its own KV cache, or the model's own first layers (early exit)
    sharing the model's cache: their keys and values for the context are the model's first layers' own, so
    the drafter needs no prefill and no catch-up; its draft positions are overwritten by verification."""

    def __init__(self, model, capacity: int, shares_cache: bool = False):
        self.model = model
        self.shares_cache = shares_cache
        self.cache = None if shares_cache else model.new_cache(capacity)
        self.pending: list[int] = []  # context tokens not yet in the drafter's cache

    def start(self, context: list[int], cache) -> None:
        if self.shares_cache:  # a view on the model's cache: its first n_layers
            self.cache, self.model_cache = cache.first_layers(self.model.cfg.n_layers), cache
            self.pending = [context[-1]]
            return
        self.cache.truncate(0)
        self.pending = list(context)

    def propose(self, context: list[int], k: int, sampler: Sampler):
        tokens, qs = [], []
        hist = list(context)
        feed = self.pending
        for _ in range(k):
            if self.cache.pos + len(feed) >= self.cache.capacity:
                break
            logits = self.model.forward(feed, self.cache)[0]
            q = sampler.distribution(logits, hist)
            tok = sampler.draw(q)
            tokens.append(tok)
            qs.append(q)
            hist.append(tok)
            feed = [tok]
        self.pending = feed if tokens else self.pending
        return tokens, qs

    def rollback(self, context: list[int]) -> None:
        """The context has grown (accepted drafts and one token of the model's): keep what the cache holds
        of it, and feed the rest (at least the last token) before the next proposal."""
        if self.shares_cache:
            self.cache.pos = self.model_cache.pos  # the model's cache holds all but the last token
        else:
            self.cache.truncate(min(self.cache.pos, len(context) - 1))
        self.pending = list(context[self.cache.pos:])


def lowrank_twin(model, arg: str = ""):
    """The model with its matrices factored (plain SVD, on the fly): lowrank[:E] keeps energy E (default 0.9),
    lowrank:pP keeps a share P of each matrix's parameters. It shares embeddings, norms, head and every matrix
    left dense with the model; the factors are Q8_0 when the model is quantized, float32 otherwise."""
    from ..linear import Quant
    from .lowrank import with_lowrank
    try:
        kw = dict(params=float(arg[1:])) if arg.startswith("p") else dict(energy=float(arg) if arg else 0.9)
    except ValueError:
        raise MinirtError(f"--draft lowrank[:E] needs an energy (0.9) or a parameter share (p0.5), got {arg!r}") from None
    storage = "Q8_0" if isinstance(model.layers[0].up, Quant) and model.layers[0].up.nb else "F32"
    return with_lowrank(model, storage=storage, progress=True, **kw)


def check_draft(spec: str) -> tuple[str, str]:
    """(kind, argument) of a --draft value whose form is right (before any model is loaded): ngram[:N] needs
    N ≥ 1, layers:N a whole number; lowrank[:E | :pP] is checked when the twin is made; anything else names a
    model."""
    if not isinstance(spec, str) or not spec:
        raise MinirtError(f"--draft needs ngram[:N], layers:N, lowrank[:E|:pP] or a model, got {spec!r}")
    kind, _, arg = spec.partition(":")
    if kind == "ngram":
        try:
            n = int(arg) if arg else 4
        except ValueError:
            n = 0
        if n < 1:
            raise MinirtError(f"--draft ngram[:N] needs a longest n-gram N ≥ 1, got {spec!r}")
    elif kind == "layers":
        try:
            int(arg)
        except ValueError:
            raise MinirtError(f"--draft layers:N needs a number of layers, got {spec!r}") from None
    return kind, arg


def make_drafter(model, spec: str, capacity: int):
    """--draft values: ngram[:N] · layers:N · lowrank[:E | :pP] · PATH-or-NAME of a model with the same
    tokenizer (a low-rank export of the model, made with minirt svd, is one)."""
    kind, arg = check_draft(spec)
    if kind == "ngram":
        return NGramDrafter(int(arg) if arg else 4)
    if kind == "layers":
        n = int(arg)
        if not 1 <= n < model.cfg.n_layers:
            raise MinirtError(f"--draft layers:N needs 1 ≤ N < {model.cfg.n_layers}, got {n}")
        return ModelDrafter(model.truncated(n), capacity, shares_cache=True)
    if kind == "lowrank":  # factored once per model and setting, then reused by every generation
        if hasattr(model, "lowrank_twin"):  # a GPU model makes (and keeps) its twin on the device
            return ModelDrafter(model.lowrank_twin(arg), capacity)
        twins = model.__dict__.setdefault("_lowrank_twins", {})
        if arg not in twins:
            twins[arg] = lowrank_twin(model, arg)
        return ModelDrafter(twins[arg], capacity)
    from ..model import Model
    from ..readers import read_checkpoint
    from ..registry import resolve
    draft = Model.from_checkpoint(read_checkpoint(resolve(spec)))
    a, b = model.tokenizer, draft.tokenizer
    same = (a.vocab_size == b.vocab_size and getattr(a, "id_bytes", None) == getattr(b, "id_bytes", None))
    if not same:
        raise MinirtError(f"draft model {spec} has a different tokenizer than the model; they must match")
    return ModelDrafter(draft, capacity)


def check_draft_k(draft_k) -> None:
    if draft_k < 1:
        raise MinirtError(f"draft length (--draft-k) must be ≥ 1, got {draft_k}")


def start(gen, draft: str = "ngram", draft_k: int = 4) -> SpecStats:
    """generate(mode="speculative"): the drafter for this generation, and its statistics (gen.spec)."""
    check_draft_k(draft_k)
    gen.drafter = make_drafter(gen.model, draft, gen.cache.capacity)
    gen.draft_k = draft_k
    gen.spec = SpecStats()
    return gen.spec


def tokens(gen):
    """generate(mode="speculative"): the token ids."""
    return speculative_tokens(gen.model, gen.cache, gen.prompt_ids, gen.sampler, gen.drafter, gen.draft_k,
                              gen.max_tokens, gen.spec, progress=gen.progress)


class DraftLength:
    """Adaptive K: start at one draft token, grow by one on every fully accepted draft (up to 2K, at most
    K_MAX), halve on a rejection of the first token, and stop drafting after MISSES calls in a row accepted
    nothing; then retry after 2·PROBE steps, doubling the wait while retries fail (up to PROBE_MAX).
    adaptive=False keeps K fixed."""

    def __init__(self, k: int, adaptive: bool = True):
        self.k_max, self.adaptive = min(2 * k, K_MAX), adaptive
        self.k = 1 if adaptive else k
        self.idle, self.probe, self.misses = 0, PROBE, 0

    def next(self) -> int:
        """The draft length for this step (0: a plain decode step)."""
        if self.k == 0:
            self.idle += 1
            if self.idle >= self.probe:
                self.k, self.idle = 1, 0
        return min(self.k, self.k_max)

    def update(self, n_draft: int, n_ok: int) -> None:
        if not self.adaptive or not n_draft:
            return
        self.misses = 0 if n_ok else self.misses + 1
        if n_ok == n_draft:
            self.k = min(self.k_max, self.k + 1)
        elif n_ok == 0:
            stop = self.misses >= MISSES or (self.k == 1 and self.misses > 1)
            self.k = 0 if stop else max(1, self.k // 2)
        self.probe = PROBE if n_ok else min(PROBE_MAX, 2 * self.probe) if self.k == 0 else self.probe


def speculative_tokens(model, cache, prompt: list[int], sampler: Sampler, drafter, k: int, max_tokens: int,
                       stats: SpecStats, adaptive: bool = True, progress=None):
    """Yield generated token ids (the end-of-generation token included, so the caller can stop on it).

    Verification batches stay below the model's batched-GEMM threshold (K ≤ K_MAX), so every position is
    computed with exactly the arithmetic of a single decode step: greedy output is token-identical."""
    length = DraftLength(k, adaptive)
    # The prompt is prefilled in one call and the first token drawn from it, exactly as plain decoding
    # does; from then on the cache holds everything but the last emitted token.
    context = list(prompt)
    first = sampler(model.forward(prompt, cache, progress=progress)[0], context)
    yield first
    context.append(first)
    drafter.start(context, cache)
    last = first
    produced = 1
    while produced < max_tokens:
        room = cache.capacity - cache.pos - 1
        if room < 1:
            return
        n = max(0, min(length.next(), room, max_tokens - produced - 1))
        draft, qs = drafter.propose(context, n, sampler) if n else ([], None)
        n_draft = len(draft)
        logits = model.forward([last] + draft, cache, logits="all")  # K+1 positions, one call
        hist = list(context)
        n_ok = 0
        out: list[int] = []
        for i in range(n_draft + 1):
            p = sampler.distribution(logits[i], hist)
            if i == n_draft:  # every draft accepted: bonus token from p
                out.append(sampler.draw(p))
                break
            x = draft[i]
            if sampler.params.greedy:
                if int(np.argmax(p)) == x:
                    out.append(x)
                    hist.append(x)
                    n_ok += 1
                    continue
                out.append(int(np.argmax(p)))
                break
            q = qs[i] if qs is not None else None
            qx = 1.0 if q is None else q[x]
            if sampler.rng.random() < min(1.0, p[x] / qx if qx > 0 else 1.0):
                out.append(x)
                hist.append(x)
                n_ok += 1
                continue
            resid = p.copy()
            if q is None:
                resid[x] = 0.0
            else:
                resid = np.maximum(0.0, p - q)
            total = resid.sum()
            resid = resid / total if total > 0 else p
            out.append(sampler.draw(resid))
            break
        # keep in the cache: last + accepted drafts; the emitted final token becomes the new `last`
        cache.truncate(cache.pos - (n_draft - n_ok))
        stats.record(n_draft, n_ok)
        length.update(n_draft, n_ok)
        for tok in out:
            context.append(tok)
            produced += 1
            yield tok
            if produced >= max_tokens:
                return
        last = context[-1]
        drafter.rollback(context)
