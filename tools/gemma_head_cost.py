"""CPU time of Gemma 3's head and of a whole decode step, shipped Q8_0 head vs re-quantized or factored heads, on
one thread (thread CPU time, best of N, variants interleaved round by round): a speed comparison that holds on
a machine other work shares, where wall-clock tok/s does not.

    python3 tools/gemma_head_cost.py [--rounds 5] [--reps 10]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import minirt  # noqa: E402
from minirt.modes.lowrank import Factorizer  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gemma_head import requantized_head, with_head  # noqa: E402


def cpu_ms(fn, reps: int) -> float:
    best = float("inf")
    for _ in range(reps):
        t = time.thread_time()
        fn()
        best = min(best, time.thread_time() - t)
    return 1e3 * best


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--reps", type=int, default=10)
    args = ap.parse_args()
    minirt.set_threads(1)
    shipped = minirt.load("gemma3-270m")
    variants = {"shipped (Q8_0 head)": shipped}
    for q in ("Q5_1", "Q5_0", "Q4_1", "Q4_0"):
        variants[f"head {q}"] = with_head(shipped, requantized_head(shipped, q))
    fz = Factorizer(shipped, None, head=True)
    for p in (0.5, 0.25):
        lm = fz.build(params=p, storage="Q8_0")
        lm.layers = shipped.layers
        rk = next(f.rank for f in lm.lowrank if f.name == "head")
        variants[f"head plain params {p} (rank {rk}), Q8_0 factors"] = lm
    del fz
    x = np.random.default_rng(0).standard_normal((1, shipped.cfg.dim)).astype(np.float32)
    out = np.empty((1, shipped.cfg.vocab_size), np.float32)
    head, step = {k: [] for k in variants}, {k: [] for k in variants}
    caches = {k: m.new_cache(4096) for k, m in variants.items()}
    for k, m in variants.items():  # warm: kernels loaded, 64 positions in the cache
        m.forward(np.arange(64) + 1000, caches[k])
    for _ in range(args.rounds):
        for k, m in variants.items():
            head[k].append(cpu_ms(lambda: m.head.forward(x, out), args.reps))
            c = caches[k]
            pos = c.pos

            def one():
                c.pos = pos  # the same position each time: the same attention span
                m.forward([1234], c)
            step[k].append(cpu_ms(one, args.reps))
    base_h, base_s = min(head["shipped (Q8_0 head)"]), min(step["shipped (Q8_0 head)"])
    print(f"Gemma 3 270M Q4_K_M, 1 thread, thread CPU time, best of {args.reps} × {args.rounds} interleaved rounds; "
          f"decode step at position 64")
    print("| setting | MiB/token | head ms | decode step ms | step vs shipped | est. tok/s ratio |")
    print("|---|---|---|---|---|---|")
    for k, m in variants.items():
        h, s = min(head[k]), min(step[k])
        print(f"| {k} | {m.weight_bytes / 2**20:.0f} | {h:.2f} | {s:.2f} | {s / base_s:.2f} | {base_s / s:.2f}× |")
    print(f"head share of the shipped step: {base_h / base_s:.0%}")


if __name__ == "__main__":
    main()
