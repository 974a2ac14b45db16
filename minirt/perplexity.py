"""Perplexity the way llama.cpp's llama-perplexity computes it.

The text is tokenized whole and cut into non-overlapping windows of ctx tokens (the first token of each
replaced by BOS where the model adds one); each window is evaluated from an empty cache and only its
second half is scored: logits at positions ctx/2 … ctx−2 predict the tokens that follow them.
PPL = exp(mean NLL), and its standard error is PPL · sqrt(var(NLL) / (N − 1)).
Given the log-probabilities of a base model on the same windows (keep=True on its run), it also reports
the mean KL divergence KL(base ‖ model) and how often both put the same token first, as llama-perplexity's
--kl-divergence does.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np

from .errors import MinirtError
from .progress import Progress


@dataclass
class PerplexityResult:
    ppl: float
    stderr: float
    n_scored: int
    chunks: int
    n_tokens: int
    seconds: float
    nll: np.ndarray  # per scored token
    logprobs: list | None = None   # per window (scored positions × vocab, float32), with keep=True
    kl: float | None = None        # mean KL(base ‖ model) per scored position, given a base
    top1: float | None = None      # share of positions where base and model agree on the most likely token

    def __str__(self) -> str:
        return f"PPL = {self.ppl:.4f} +/- {self.stderr:.5f} ({self.chunks} chunks of {self.n_scored // self.chunks + 1} scored positions)"


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def perplexity(model, text: str, ctx: int = 512, chunks: int | None = None, progress: bool = True,
               keep: bool = False, base: list | None = None) -> PerplexityResult:
    if ctx < 4 or ctx > model.cfg.max_ctx:
        raise MinirtError(f"ctx must be between 4 and the model's context {model.cfg.max_ctx}, got {ctx}")
    tok = model.tokenizer
    tokens = np.asarray(tok.encode(text, add_bos=False), dtype=np.int64)
    n_chunks = len(tokens) // ctx
    if chunks is not None:
        if chunks < 1:
            raise MinirtError(f"chunks must be ≥ 1, got {chunks}")
        n_chunks = min(n_chunks, chunks)
    if n_chunks == 0:
        raise MinirtError(f"the text has {len(tokens)} tokens, fewer than one window of {ctx}")
    first = ctx // 2
    cache = model.new_cache(ctx)
    nll, t0 = [], time.perf_counter()
    bar = Progress("perplexity", n_chunks, "windows") if progress else None
    kept, kl, agree = [], [], []
    for i in range(n_chunks):
        window = tokens[i * ctx:(i + 1) * ctx].copy()
        if tok.add_bos and tok.bos_id is not None:
            window[0] = tok.bos_id
        cache.truncate(0)
        logits = model.forward(window, cache, logits=slice(first, ctx - 1))
        lp = log_softmax(logits)
        targets = tokens[i * ctx + first + 1:(i + 1) * ctx]
        nll.append(-lp[np.arange(len(targets)), targets])
        if keep:
            kept.append(lp.astype(np.float32))
        if base is not None:
            b = base[i].astype(np.float64)
            kl.append((np.exp(b) * (b - lp)).sum(axis=-1))
            agree.append(b.argmax(-1) == lp.argmax(-1))
        if bar:
            bar.update(1, note=f"PPL {math.exp(np.concatenate(nll).mean()):.4f}")
    if bar:
        bar.close()
    x = np.concatenate(nll)
    mean = x.mean()
    ppl = math.exp(mean)
    var = x.var()
    stderr = ppl * math.sqrt(var / (len(x) - 1)) if len(x) > 1 else float("nan")
    return PerplexityResult(ppl, stderr, len(x), n_chunks, len(tokens), time.perf_counter() - t0, x,
                            kept if keep else None, float(np.concatenate(kl).mean()) if kl else None,
                            float(np.concatenate(agree).mean()) if agree else None)
