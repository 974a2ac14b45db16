"""Jacobi (block-refinement) decoding: the autoregressive analogue of a diffusion model's step loop.

A block of n positions [last, g_1 … g_{n−1}] (last: the newest emitted token, g: guesses of the tokens that
follow it) is run in one forward call; the greedy predictions at its n positions become the next guesses,
and the call is repeated until the guesses stop changing (a fixed point, which with exact arithmetic is
the greedy continuation) or after max_iter iterations. With a PinvModel (minirt.modes.pinv.with_pinv) the
iterations run with the pinv transition on: each FFN input row is predicted from the exactly computed rows
of the previous iterations (the window) when its residual is within the tolerance. An exact pass then
verifies the block like speculative decoding's greedy rule: guesses are accepted while they equal the
exact argmax, and the exact token at the first mismatch (or after the whole block) is emitted too, so the
output is token-identical to greedy dense decoding. n ≤ BLOCK_MAX keeps every pass below the batched-GEMM
thresholds: each position is computed with exactly the arithmetic of one decode step.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

from ..errors import MinirtError

BLOCK_MAX = 7  # positions per pass: below Quant.GEMM_MIN_ROWS (17) and BLAS_MIN_ROWS (16): the single-pass kernels


@dataclass
class JacobiStats:
    blocks: int = 0        # exact (verification) passes
    iterations: int = 0    # Jacobi iterations (forward calls before the exact pass)
    converged: int = 0     # blocks whose iterations reached a fixed point
    emitted: int = 0       # tokens emitted by verification passes (accepted guesses + the exact token)

    @property
    def iterations_per_block(self) -> float:
        return self.iterations / self.blocks if self.blocks else 0.0

    @property
    def tokens_per_pass(self) -> float:
        return self.emitted / self.blocks if self.blocks else 0.0

    def summary(self) -> str:
        return (f"jacobi: {self.blocks} exact passes, {self.iterations_per_block:.2f} iterations per block "
                f"({self.converged} of {self.blocks} converged), {self.tokens_per_pass:.2f} tokens per exact pass")


def _set_transition(model, on: bool) -> None:
    pinv = getattr(model, "pinv", None)
    if pinv is not None:
        pinv.enabled = on


def jacobi_tokens(model, cache, prompt: list[int], sampler, block: int, max_tokens: int, stats: JacobiStats,
                  max_iter: int | None = None, progress=None):
    """Yield greedily decoded token ids (an end-of-generation token included, so the caller can stop on it)."""
    if not sampler.params.greedy:
        raise MinirtError("jacobi mode decodes greedily: use --temperature 0")
    check_block(block)
    max_iter = block if max_iter is None else max_iter
    context = list(prompt)
    _set_transition(model, False)   # the prompt and every verification pass are exact
    first = sampler(model.forward(prompt, cache, progress=progress)[0], context)
    yield first
    context.append(first)
    produced = 1
    guess: list[int] = []
    while produced < max_tokens:
        n = min(block, cache.capacity - cache.pos, max_tokens - produced)
        if n < 1:
            return
        p0, last = cache.pos, context[-1]
        guess = (guess + [guess[-1] if guess else last] * n)[:n - 1]
        _set_transition(model, True)
        for _ in range(max_iter if n > 1 else 0):
            logits = model.forward([last] + guess, cache, logits="all")
            cache.truncate(p0)
            stats.iterations += 1
            hist = context + guess
            new = [sampler(logits[i], hist[:len(context) + i]) for i in range(n - 1)]
            if new == guess:
                stats.converged += 1
                break
            guess = new
        _set_transition(model, False)
        logits = model.forward([last] + guess, cache, logits="all")
        out: list[int] = []
        hist = list(context)
        for i in range(n):
            tok = sampler(logits[i], hist)
            out.append(tok)
            hist.append(tok)
            if i == n - 1 or tok != guess[i]:
                break
        n_ok = len(out) - 1
        cache.truncate(p0 + 1 + n_ok)   # keep last and the accepted guesses; out[-1] becomes the new last
        # the exact pass's predictions past the mismatch seed the next block's guesses
        guess = [sampler(logits[i], hist) for i in range(len(out), n)]
        stats.blocks += 1
        stats.emitted += len(out)
        for tok in out:
            context.append(tok)
            produced += 1
            yield tok
            if produced >= max_tokens:
                return


def check_block(block) -> None:
    if not 1 <= block <= BLOCK_MAX:
        raise MinirtError(f"jacobi block size (--block) must be between 1 and {BLOCK_MAX}, got {block}")


def start(gen, block: int = 4) -> JacobiStats:
    """generate(mode="jacobi"): checks (greedy, block size) and the statistics (gen.jacobi)."""
    if not gen.sampler.params.greedy:
        raise MinirtError("mode 'jacobi' decodes greedily: use temperature 0 (--temperature 0)")
    check_block(block)
    gen.block = block
    gen.jacobi = JacobiStats()
    return gen.jacobi


def tokens(gen):
    """generate(mode="jacobi"): the token ids."""
    return jacobi_tokens(gen.model, gen.cache, gen.prompt_ids, gen.sampler, gen.block, gen.max_tokens, gen.jacobi,
                         progress=gen.progress)


# ---- measurement: dense, plain Jacobi and Jacobi with the transition, timed in the same run -------------

@dataclass
class JacobiBench:
    label: str
    tps: list[float]
    stats: JacobiStats
    shortcut: float
    repeats: float
    identical: bool


def run_bench(model, prompts: list[str], n: int, block: int, window: int, tols: list[float]) -> list[JacobiBench]:
    """Greedy generation of n tokens per prompt: dense, then Jacobi with each tolerance (0: plain Jacobi,
    exact iterations, no transition). Returns one row per setting; identical compares with dense."""
    from .pinv import with_pinv
    setups = [("dense", model, None)]
    for tol in tols:
        m = with_pinv(model, window, tol) if tol > 0 else model
        setups.append((f"jacobi, tol {tol:g}" if tol > 0 else "jacobi, exact iterations", m, tol))
    rows = []
    dense_tokens = []
    for label, m, tol in setups:
        opts = dict(mode="dense") if tol is None else dict(mode="jacobi", block=block)
        m.generate(prompts[0], max_tokens=4, temperature=0, **opts).text()   # warm kernels
        if getattr(m, "pinv", None) is not None:
            m.pinv.stats.clear()
        tps, st, same = [], JacobiStats(), True
        for i, p in enumerate(prompts):
            g = m.generate(p, max_tokens=n, temperature=0, **opts)
            g.text()
            if g.stats.decode_tokens >= 8:  # decode speed, the prompt pass not counted (as Stats.summary)
                tps.append((g.stats.decode_tokens - 1) / g.stats.decode_seconds)
            if tol is None:
                dense_tokens.append(g.stats.tokens)
            else:
                same &= g.stats.tokens == dense_tokens[i]
                js = g.jacobi
                st.blocks, st.iterations = st.blocks + js.blocks, st.iterations + js.iterations
                st.converged, st.emitted = st.converged + js.converged, st.emitted + js.emitted
        pinv = getattr(m, "pinv", None)
        rows.append(JacobiBench(label, tps, st, pinv.stats.fraction if pinv is not None else 0.0,
                                pinv.stats.repeat_fraction if pinv is not None else 0.0, same))
    return rows


def pass_costs(model, n: int, context: int = 64, reps: int = 20) -> tuple[float, float, float]:
    """Median seconds of one decode step, of an n-position pass (as a Jacobi iteration or verification runs
    it, after `context` positions), and of the gate/up (fc) products inside that n-position pass."""
    import numpy as np
    rng = np.random.default_rng(0)
    cache = model.new_cache(context + n + 1)
    model.forward(rng.integers(0, model.cfg.vocab_size, context), cache)

    def med(f):
        ts = []
        for _ in range(reps):
            t = time.perf_counter()
            f()
            ts.append(time.perf_counter() - t)
        return statistics.median(ts)

    def run(k):
        model.forward(rng.integers(0, model.cfg.vocab_size, k), cache, logits="all")
        cache.truncate(context)
    step, block = med(lambda: run(1)), med(lambda: run(n))
    h = rng.standard_normal((n, model.cfg.dim)).astype(np.float32)
    out = np.empty((n, model.layers[0].up.out_features), np.float32)
    up = med(lambda: [L.up.forward(h, out) for L in model.layers])
    return step, block, up


def report_costs(step: float, block: float, up: float, n: int, rows: list[JacobiBench]) -> str:
    """Where the time goes, and the best Jacobi could do: iterations whose gate/up products are free."""
    c, u = block / step, up / block
    lines = [f"costs: one decode step {step * 1e3:.2f} ms; a {n}-position pass {block * 1e3:.2f} ms = {c:.2f} steps, "
             f"of which gate/up {up * 1e3:.2f} ms ({u:.0%})"]
    for r in rows[1:]:
        s = r.stats
        if s.blocks:
            bound = s.tokens_per_pass / (s.iterations_per_block * c * (1 - u) + c)
            lines.append(f"{r.label}: even with free gate/up in every iteration, at most {bound:.2f}x dense "
                         f"({s.tokens_per_pass:.2f} tokens per {s.iterations_per_block:.2f} iterations + 1 exact pass)")
    return "\n".join(lines)


def report_bench(rows: list[JacobiBench], block: int, window: int) -> str:
    def ms(xs):
        return f"{statistics.mean(xs):.1f} ± {statistics.stdev(xs) if len(xs) > 1 else 0.0:.1f}"
    base = statistics.mean(rows[0].tps)
    lines = ["| setting | block | window | iterations per block | converged | tokens per exact pass | "
             "FFN rows by transition in iterations (of them repeats) | tok/s | vs dense | identical to dense |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        s = r.stats
        jac = r.label != "dense"
        lines.append(f"| {r.label} | {block if jac else ''} | {window if 'tol' in r.label else ''} | "
                     f"{s.iterations_per_block:.2f} | {s.converged}/{s.blocks} | {s.tokens_per_pass:.2f} | "
                     f"{r.shortcut:.1%} ({r.repeats:.1%}) | {ms(r.tps)} | {statistics.mean(r.tps) / base:.2f}x | "
                     f"{'yes' if r.identical else 'NO'} |" if jac else
                     f"| dense | | | | | 1.00 | | {ms(r.tps)} | 1.00x | |")
    return "\n".join(lines)
