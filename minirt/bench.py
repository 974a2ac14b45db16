"""minirt bench: prompt processing (pp) and token generation (tg) speed, reported like llama-bench, with
the weight bytes read per generated token and the bandwidth that implies, against the memory bandwidth
measured by the same command."""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import numpy as np
from numba import njit, prange

from .progress import Progress


@njit(parallel=True, cache=True, fastmath=True)
def _stream_sum(a):
    n = a.shape[0]
    chunks = 64
    step = (n + chunks - 1) // chunks
    part = np.zeros(chunks, np.float32)
    for c in prange(chunks):
        chunk = a[c * step:min(n, (c + 1) * step)]
        s = np.float32(0.0)
        for i in range(chunk.shape[0]):
            s += chunk[i]
        part[c] = s
    return part.sum()


def memory_bandwidth(gib: float = 0.25, repeats: int = 9) -> float:
    """Read bandwidth in bytes/s: the median of several parallel streaming sums over an array 8× the size of
    a 32 MB L3 (256 MiB: big enough to stream from memory, small enough not to weigh on a laptop's RAM)."""
    a = np.ones(int(gib * (1 << 30)) // 4, np.float32)
    _stream_sum(a[:1024])
    rates = []
    for _ in range(repeats):
        t = time.perf_counter()
        _stream_sum(a)
        rates.append(a.nbytes / (time.perf_counter() - t))
    return statistics.median(rates)


@dataclass
class BenchResult:
    pp: list[float]
    tg: list[float]
    weight_bytes: int
    bandwidth: float
    device: str = "cpu"
    weight_type: str | None = None  # on a GPU: the types the matrices have there

    @staticmethod
    def _ms(xs: list[float]) -> str:
        return f"{statistics.mean(xs):8.2f} ± {statistics.stdev(xs) if len(xs) > 1 else 0.0:6.2f}"


def run(model, p: int = 128, n: int = 128, r: int = 5, seed: int = 0, bandwidth: bool = True,
        depth: int = 0) -> BenchResult:
    """pp: p prompt tokens in one call; tg: n greedy steps. With depth (llama-bench's -d), both start after
    `depth` tokens already in the cache (prefilled untimed), where attention reads a longer context."""
    rng = np.random.default_rng(seed)
    vocab = model.cfg.vocab_size
    warm = model.new_cache(16)  # compile / load kernels for every shape used below
    model.forward(rng.integers(0, vocab, max(p, 1)), model.new_cache(max(p, 1)))
    model.forward([1], warm)
    pp, tg = [], []
    device = getattr(model, "device", "cpu")
    if n and device == "cuda":  # ---- GPU (gpu18): one cache, its decode graph captured before timing
        gcache = model.new_cache(n)
        _tg_cuda(model, gcache, 1, min(n, 3))
    bar = Progress("bench", r, "runs", every=2.0)
    context = rng.integers(0, vocab, depth)

    def new_cache(size):
        cache = model.new_cache(depth + size)
        if depth:
            model.forward(context, cache)
        return cache
    for _ in range(r):
        if p:
            cache = new_cache(p)
            prompt = rng.integers(0, vocab, p)
            t = time.perf_counter()
            model.forward(prompt, cache)
            pp.append(p / (time.perf_counter() - t))
        if n and device == "cuda":
            tg.append(_tg_cuda(model, gcache, int(rng.integers(0, vocab)), n))
        elif n:
            cache = new_cache(n)
            tok = int(rng.integers(0, vocab))
            t = time.perf_counter()
            for _ in range(n):
                tok = int(np.argmax(model.forward([tok], cache)[0]))
            tg.append(n / (time.perf_counter() - t))
        bar.update(1, note=(f"pp{p} {pp[-1]:.1f} t/s " if p else "") + (f"tg{n} {tg[-1]:.1f} t/s" if n else ""))
    bar.close()
    bw = getattr(model, "memory_bandwidth", memory_bandwidth)  # a GPU model measures its own device memory
    return BenchResult(pp, tg, model.weight_bytes, bw() if bandwidth else float("nan"), device,
                       getattr(model, "weight_type", None))


def _tg_cuda(model, cache, tok: int, n: int) -> float:
    """GPU tg: n greedy steps with the argmax on the device, each one graph replay and a 4-byte token read
    (the host syncs every token, as generation does); tokens/s."""
    cache.truncate(0)
    t = time.perf_counter()
    model.prefill_greedy([tok], cache)
    model.read_token()
    for _ in range(n - 1):
        model.step_greedy(cache)
        model.read_token()
    return n / (time.perf_counter() - t)


def report(res: BenchResult, name: str, file_type: str, threads: int, p: int, n: int, mode: str = "dense",
           depth: int = 0) -> str:
    gb = res.weight_bytes / 1e9
    bw = f"streaming read, {threads} threads"
    if res.device == "cuda":  # gpu18: the device's own figures, no CPU threads
        file_type, threads, bw = res.weight_type or file_type, "CUDA", "device-to-device copy, read + written"
    at = f" @ d{depth}" if depth else ""  # llama-bench's name for a test after `depth` tokens of context
    lines = [f"memory bandwidth ({bw}): {res.bandwidth / 1e9:.1f} GB/s",
             f"weights read per token: {res.weight_bytes / 2**20:.1f} MiB",
             "| model | type | mode | threads | test | t/s | GB/s | % of bandwidth |",
             "|---|---|---|---|---|---|---|---|"]
    if res.pp:
        lines.append(f"| {name} | {file_type} | {mode} | {threads} | pp{p}{at} | {BenchResult._ms(res.pp)} | | |")
    if res.tg:
        mean = statistics.mean(res.tg)
        lines.append(f"| {name} | {file_type} | {mode} | {threads} | tg{n}{at} | {BenchResult._ms(res.tg)} | "
                     f"{mean * gb:.1f} | {100 * mean * res.weight_bytes / res.bandwidth:.0f}% |")
    return "\n".join(lines)


COST_POSITIONS = (1, 2, 4, 6, 8, 16)


def cost_table(model, positions=COST_POSITIONS, context: int = 64, r: int = 7, seed: int = 0) -> dict[int, float]:
    """Seconds per forward call of T positions (logits for all of them, as draft verification needs) after a
    context of `context` tokens: the median of r rounds, the T values interleaved within each round."""
    rng = np.random.default_rng(seed)
    vocab = model.cfg.vocab_size
    cache = model.new_cache(context + max(positions))
    model.forward(rng.integers(0, vocab, context), cache)
    times: dict[int, list[float]] = {T: [] for T in positions}
    for T in positions:  # compile / load the kernels for every T
        model.forward(rng.integers(0, vocab, T), cache, logits="all")
        cache.truncate(context)
    bar = Progress("cost table", r, "rounds", every=2.0)
    for _ in range(r):
        for T in positions:
            toks = rng.integers(0, vocab, T)
            t = time.perf_counter()
            model.forward(toks, cache, logits="all")
            times[T].append(time.perf_counter() - t)
            cache.truncate(context)
        bar.update(1)
    bar.close()
    return {T: statistics.median(v) for T, v in times.items()}


def report_cost_table(costs: dict[int, float], name: str, file_type: str, threads: int, isa: str) -> str:
    Ts = list(costs)
    one = costs[Ts[0]]
    return "\n".join([
        f"cost of scoring T positions at once: {name} {file_type}, {threads} threads, ISA path {isa}, "
        "after a 64-token context, median of interleaved rounds",
        "| T | " + " | ".join(map(str, Ts)) + " |",
        "|---" * (len(Ts) + 1) + "|",
        "| ms per call | " + " | ".join(f"{costs[T] * 1e3:.2f}" for T in Ts) + " |",
        "| × one step | " + " | ".join(f"{costs[T] / one:.2f}" for T in Ts) + " |"])


FREE_WRITING = [
    "Once upon a time, in a village at the edge of a great forest,",
    "Write a short story about a robot who learns to paint.",
    "The most important invention of the last century was",
    "Describe a busy market on a summer morning.",
]


def grounded_prompts(passages: list[str]) -> list[str]:
    """Input-grounded prompts: rewrite or summarise a given passage (the answer copies from the input)."""
    asks = ["Rewrite the following passage in plain modern English:\n\n{}\n\nRewritten passage:\n",
            "Summarize the following passage:\n\n{}\n\nSummary:\n"]
    return [asks[i % 2].format(p) for i, p in enumerate(passages)]


@dataclass
class SpecResult:
    dense_tps: list[float]
    spec_tps: list[float]
    proposed: int
    accepted: int
    steps: int
    identical: bool
    dense_s: list[float]   # seconds per prompt, the prompt's prefill included
    spec_s: list[float]
    dense_decode_s: list[float]  # seconds per prompt after the first token (Stats.decode_seconds)
    spec_decode_s: list[float]


def run_speculative(model, prompts: list[str], n: int, draft: str | None = None, k: int | None = None,
                    r: int = 1) -> SpecResult:
    """Greedy generation of n tokens per prompt, plain and speculative in turn, timed in the same run;
    the prompt set is run r times. draft, k: default, the model's (minirt.load(mode="speculative", …))."""
    opts = model.mode_options if model.mode == "speculative" else {}
    draft = opts.get("draft", "ngram") if draft is None else draft
    k = opts.get("draft_k", 4) if k is None else k
    dense, spec, dense_s, spec_s, dense_dec, spec_dec = [], [], [], [], [], []
    proposed = accepted = steps = 0
    identical = True
    model.generate(prompts[0], max_tokens=4, temperature=0, mode="speculative", draft=draft, draft_k=k).text()
    for p in prompts * r:
        t = time.perf_counter()
        g = model.generate(p, max_tokens=n, temperature=0, mode="dense")
        g.text()
        dense_s.append(time.perf_counter() - t)
        dense.append(len(g.stats.tokens) / dense_s[-1])
        dense_dec.append(g.stats.decode_seconds)
        t = time.perf_counter()
        s = model.generate(p, max_tokens=n, temperature=0, mode="speculative", draft=draft, draft_k=k)
        s.text()
        spec_s.append(time.perf_counter() - t)
        spec.append(len(s.stats.tokens) / spec_s[-1])
        spec_dec.append(s.stats.decode_seconds)
        identical &= s.stats.tokens == g.stats.tokens
        proposed, accepted, steps = proposed + s.spec.proposed, accepted + s.spec.accepted, steps + s.spec.steps
    return SpecResult(dense, spec, proposed, accepted, steps, identical, dense_s, spec_s, dense_dec, spec_dec)


def report_speculative(name: str, res: SpecResult, draft: str, k: int) -> str:
    # the same tokens either way (greedy, identical output): the speedup is the ratio of total times
    speed = sum(res.dense_s) / sum(res.spec_s)
    decode = sum(res.dense_decode_s) / sum(res.spec_decode_s)  # the same prefill either way: decoding alone
    per_call = (res.accepted + res.steps) / res.steps if res.steps else 0.0
    return (f"| {name} | {draft} | {k} | {res.accepted / max(res.proposed, 1):.0%} | {per_call:.2f} | "
            f"{BenchResult._ms(res.dense_tps)} | {BenchResult._ms(res.spec_tps)} | {speed:.2f}x | {decode:.2f}x | "
            f"{'yes' if res.identical else 'NO'} |")
