"""The decode step (T = 1) by phase: where a token's time goes.

    python tools/step_profile.py MODEL [-t THREADS] [-d DEPTH] [-r REPS] [--bandwidth GB/s] [--rows N] [--kv-type f16]

(The wrappers below are not cached: a test imports this file by path, a script runs it as __main__, and
Numba's cache cannot tell the two apart.)
Each phase runs alone, over every layer, in one compiled call (no Python between layers), with the caches
flushed before each repetition (a 64 MiB read: in the real step the weights of the other matrices pass through
the L3 in between); the figure is the median of the repetitions. Phases:
    qkv, wo, gate/up, down   the matrix kernels (step._matrix, as the step calls them), less the activation
                             quantization, which is a phase of its own (act quant: quantize_x, block formats)
    head                     the output matrix (Python: one call per token, as Model.forward makes it)
    attention                kernels.attention_rows at position DEPTH
    norms+rope+act           the two norms, RoPE and the K/V store, the FFN activation (and q/k norms)
    fork/join                parallel regions per token × the cost of entering an empty one (measured in a
                             compiled loop; included in the phases above: shown to size it, not added)
The step is Model.forward([token]) as generation calls it; 'layers' is step.layers alone. Overhead = step − Σ
phases (embedding, final norm, Python, and whatever the phases do not see). GB/s: the matrix bytes over the time;
floor: the bytes over the bandwidth (bench.memory_bandwidth at the same thread count, or --bandwidth).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import numba
import numpy as np
from numba import njit, prange

import minirt
import minirt.model
from minirt import bench
from minirt.cpu import kernels, step
from minirt.batch import BatchStep
from minirt.cpu.qmatmul import quantize_x
from minirt.kvcache import KVCache

MATRICES = ("qkv", "wo", "gate/up", "down")


@njit
def _mats(j, L, tag, tag_odd, has, fmt, sub, qs, hs, ms, fs, bs, x, out, mid, xqb, xdeb, xsb, xkb, n):
    for li in range(L):
        step._matrix(tag, tag_odd, has, fmt, sub, qs, hs, ms, fs, bs, 4 * li + j, x, out, mid, xqb, xdeb, xsb, xkb,
                     n)


@njit
def _quant(L, fmt, xs_in, xqb, xdeb, xsb):
    """quantize_x of each block-format matrix's input, as _linear runs it (xs_in: the 4 inputs)."""
    for li in range(L):
        for j in range(4):
            c = fmt[4 * li + j]
            if 1 <= c <= 3:
                x = xs_in[j]
                T, K = x.shape
                nb = K // 32
                quantize_x(x, xqb[:T * K].reshape(T, K), xdeb[:T * nb * 8].reshape(T, nb * 8),
                           xsb[:T * nb].reshape(T, nb))


@njit
def _attention(L, q, kc, vc, slots, positions, scale, win, scores, att):
    for li in range(L):
        kernels.attention_rows(q, kc[li], vc[li], slots, positions, scale, win[li], scores, att)


@njit
def _small(L, x, h, qkv, q, kc, vc, slots, positions, cr, sr, nw, nbias, qkn, layer_norm, ffn, use_rope, qk_norm,
           post_norms, eps, up, act, o):
    """The step's work between the matrices, in its order (see step.layers)."""
    T = x.shape[0]
    H, hd = q.shape[1], q.shape[2]
    Hkv = kc.shape[2]
    qd = H * hd
    for li in range(L):
        step._norm(x, nw[li, 0], nbias[li, 0], layer_norm, eps, h)
        if qk_norm:
            for task in range(T * H):
                kernels.head_rmsnorm_task(qkv, 0, H, hd, qkn[li, 0], eps, task)
            for task in range(T * Hkv):
                kernels.head_rmsnorm_task(qkv, qd, Hkv, hd, qkn[li, 1], eps, task)
        kernels.qkv_rope_rows(qkv, positions, slots, cr, sr, use_rope, q, kc[li], vc[li])
        if post_norms:
            step._norm(o, nw[li, 2], nbias[li, 2], layer_norm, eps, o)
        step._norm(x, nw[li, 1], nbias[li, 1], layer_norm, eps, h)
        if ffn == 0:
            kernels.swiglu(up, act)
        elif ffn == 1:
            kernels.geglu(up, act)
        else:
            kernels.gelu_new(up, act)
        if post_norms:
            step._norm(o, nw[li, 3], nbias[li, 3], layer_norm, eps, o)


@njit(parallel=True)
def _empty_region(out):
    for i in prange(out.shape[0]):
        out[i] += 1.0


@njit
def _regions(k, out):
    for _ in range(k):
        _empty_region(out)


def _clock():
    """At 1 thread the kernels run on the calling thread: its CPU time (time.thread_time) leaves out the time
    other processes hold the core (on 2 shared cores a 10 ms step was preempted in most runs, a 0.5 ms phase
    rarely: wall-clock medians put a phantom 30-60% "overhead" on the step). Threads: wall clock."""
    return time.thread_time if numba.get_num_threads() == 1 else time.perf_counter


def _time(fns: dict, reps: int, flush) -> dict:
    """Median seconds of each fn() over reps rounds, interleaved (one run of each per round: under load the
    figures share the same conditions), each run after a cache flush (untimed)."""
    clock = _clock()
    ts = {k: [] for k in fns}
    for fn in fns.values():
        fn()
    for _ in range(reps):
        for k, fn in fns.items():
            flush()
            t = clock()
            fn()
            ts[k].append(clock() - t)
    return {k: statistics.median(v) for k, v in ts.items()}


def profile(model, depth: int = 64, reps: int = 15, bandwidth: float | None = None, rows: int = 1) -> dict:
    """Seconds per step of each phase, the step, the bytes of each matrix kind, the regions per step. rows > 1:
    the server's step, the next position of `rows` sequences, each with its own cache slot (batch.BatchStep)."""
    c, tr = model.cfg, model.cfg.traits
    L = c.n_layers
    n = numba.get_num_threads()
    rng = np.random.default_rng(0)
    cache = model.new_cache(depth + reps + 64)
    model.forward(rng.integers(0, c.vocab_size, depth), cache) if depth else None
    table = model._step_table()
    if table is None:
        raise SystemExit(f"the compiled step does not run this model: {minirt.model.step_fallback_reason(model)}")
    junk = np.ones(16 << 20, np.float32)
    bench._stream_sum(junk[:1024])

    def flush():
        bench._stream_sum(junk)
    R = rows
    s = {k: v.copy() for k, v in model._buffers(R).items()}
    for v in s.values():
        v[...] = rng.standard_normal(v.shape).astype(np.float32)
    ins = (s["h"], s["att"].reshape(R, -1), s["h"], s["act"])
    outs = (s["qkv"], s["o"], s["up"], s["o"])
    nb = table.max_k // 32
    mid, xqb, xdeb, xsb, xkb = (np.empty(R * table.max_rank, np.float32), np.empty(R * table.max_k, np.int8),
                                np.empty(R * nb * 8, np.float32), np.empty(R * nb, np.float32),
                                np.empty(R * nb, np.float32))
    args = (table.tags[0], table.tags[1], table.has, table.fmt, table.sub, table.qs, table.hs, table.ms, table.fs,
            table.bs)
    fns, nbytes = {}, {}
    for j, name in enumerate(MATRICES):
        fns[name] = (lambda j: lambda: _mats(j, L, *args, ins[j], outs[j], mid, xqb, xdeb, xsb, xkb, n))(j)
        nbytes[name] = sum(getattr(Lr, ("qkv", "wo", "up", "down")[j]).nbytes for Lr in model.layers)
        one = np.zeros_like(table.fmt)  # the quantization of this kind's input alone, taken out of its phase
        one[j::4] = table.fmt[j::4]
        if ((one >= 1) & (one <= 3)).any():
            fns["quant " + name] = (lambda one: lambda: _quant(L, one, ins, xqb, xdeb, xsb))(one)
    h1 = np.ascontiguousarray(s["h"][:R, :c.dim])
    logits = np.empty((R, c.vocab_size), np.float32)
    fns["head"] = lambda: model.head.forward(h1, logits)
    nbytes["head"] = model.head.nbytes
    # R slots of one pool, each a copy of the cache (a slot per sequence, as the server's)
    kc, vc = np.repeat(cache.k[:, None], R, axis=1), np.repeat(cache.v[:, None], R, axis=1)
    slots, positions = np.arange(R, dtype=np.int64), np.full(R, cache.pos, np.int64)
    scores = kernels.attention_scratch(c, cache.pos + 1)
    q = s["q"]
    fns["attention"] = lambda: _attention(L, q, kc, vc, slots, positions, c.scale, table.win, scores, s["att"])
    cos, sin = table._tables(model)
    x = s["o"].copy()
    fns["norms+rope+act"] = lambda: _small(
        L, x, s["h"], s["qkv"], q, kc, vc, slots, positions, cos[0], sin[0], table.nw, table.nb, table.qkn,
        tr.norm == "layer", step.FFNS[tr.ffn], tr.rope, tr.qk_norm, tr.post_norms, table.eps, s["up"], s["act"],
        s["o"])
    # the step as generation runs it, and step.layers alone (same position: the cache is rolled back)
    pos = cache.pos
    tok = [int(rng.integers(0, c.vocab_size))]
    if R > 1:
        pool = KVCache.pooled(c, cache.capacity, R, kv_type=cache.kv_type)
        for sc in pool:
            sc.k[...], sc.v[...], sc.pos = cache.k, cache.v, pos
        toks, batch_step = rng.integers(0, c.vocab_size, R), BatchStep(model)

    def one_step():
        if R > 1:
            for sc in pool:
                sc.pos = pos
            batch_step(toks, pool)
            return
        cache.pos = pos
        model.forward(tok, cache)

    def layers_only():
        if R > 1:
            table.run_rows(model, toks, pool[0].pool[0], pool[0].pool[1], slots, positions, scores)
            return
        cache.pos = pos
        table.run(model, np.array(tok, np.int64), cache, scores)
    fns["step"], fns["layers"] = one_step, layers_only
    t = _time(fns, reps, flush)
    sec = {}
    for name in MATRICES:
        sec[name] = max(0.0, t[name] - t.get("quant " + name, 0.0))
    sec["act quant"] = sum(t.get("quant " + name, 0.0) for name in MATRICES)
    for k in ("head", "attention", "norms+rope+act"):
        sec[k] = t[k]
    total, layers = t["step"], t["layers"]
    # parallel regions: per layer the 4 matrices (a low-rank one: 2), attention, the activation; head, final norm
    per_layer = sum(2 if f == step.LOWRANK else 1 for f in table.fmt[:4 * L]) + 2 * L
    regions = per_layer + 2
    buf = np.zeros(n, np.float64)
    _regions(10, buf)
    k = 2000
    fork = _time({0: lambda: _regions(k, buf)}, 5, lambda: None)[0] / k
    bw = bandwidth if bandwidth else bench.memory_bandwidth()
    return dict(sec=sec, nbytes=nbytes, total=total, layers=layers, regions=regions, fork=fork, bandwidth=bw,
                threads=n, depth=cache.pos, rows=R)


def report(p: dict, name: str) -> str:
    sec, total = p["sec"], p["total"]
    summed = sum(sec.values())
    bw = p["bandwidth"]
    lines = [f"{name}: decode step ({p['rows']} row{'s' * (p['rows'] > 1)}) at position {p['depth']}, {p['threads']} threads, "
             f"bandwidth {bw / 1e9:.1f} GB/s; each phase alone, median, caches flushed, "
             f"{'CPU time of the calling thread' if p['threads'] == 1 else 'wall clock'}",
             "| phase | ms/token | share of step | GB/s | floor ms | × floor |", "|---|---|---|---|---|---|"]
    for k, v in sec.items():
        row = f"| {k} | {v * 1e3:.3f} | {v / total:.1%} |"
        if k in p["nbytes"]:
            b = p["nbytes"][k]
            row += f" {b / v / 1e9:.1f} | {b / bw * 1e3:.3f} | {v / (b / bw):.2f} |"
        else:
            row += " | | |"
        lines.append(row)
    mats = sum(p["nbytes"].values())
    lines += [f"| Σ phases | {summed * 1e3:.3f} | {summed / total:.1%} | | | |",
              f"| step ({'Model.forward, 1 token' if p['rows'] == 1 else 'BatchStep'}) | {total * 1e3:.3f} | 100% | {mats / total / 1e9:.1f} | "
              f"{mats / bw * 1e3:.3f} | {total / (mats / bw):.2f} |",
              f"| of which step.layers | {p['layers'] * 1e3:.3f} | {p['layers'] / total:.1%} | | | |",
              f"| overhead (step − Σ phases) | {(total - summed) * 1e3:.3f} | {(total - summed) / total:.1%} | | | |",
              f"parallel regions per token: {p['regions']}; an empty one costs {p['fork'] * 1e6:.1f} µs "
              f"→ {p['regions'] * p['fork'] * 1e3:.3f} ms/token ({p['regions'] * p['fork'] / total:.1%} of the step; "
              f"inside the phases above), threading layer {numba.threading_layer()}"]
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model")
    ap.add_argument("-t", "--threads", type=int, default=None)
    ap.add_argument("-d", "--depth", type=int, default=64, help="tokens in the cache before the step (default 64)")
    ap.add_argument("-r", "--reps", type=int, default=15)
    ap.add_argument("--bandwidth", type=float, default=None, help="GB/s (default: measured as minirt bench does)")
    ap.add_argument("--rows", type=int, default=1, help="sequences in the step, each with its own cache slot, as "
                    "the server batches them (default 1)")
    ap.add_argument("--kv-type", choices=("f32", "f16"), default="f32", help="KV cache type (default f32)")
    a = ap.parse_args(argv)
    model = minirt.load(a.model, threads=a.threads, kv_type=a.kv_type)
    p = profile(model, a.depth, a.reps, a.bandwidth * 1e9 if a.bandwidth else None, a.rows)
    print(report(p, f"{model.source.name if model.source else a.model} {model.file_type}"))


if __name__ == "__main__":
    sys.exit(main())
