"""Gemma 3 270M Q4_K_M decode speed, per-operation path vs the compiled step, in one process, runs interleaved.

    python3 tools/gemma_step_tg.py [--threads 1] [--runs 3] [--gen 64]
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import numba

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import minirt  # noqa: E402
from minirt import bench  # noqa: E402
from minirt.model import step_fallback_reason  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--gen", type=int, default=64)
    args = ap.parse_args()
    numba.set_num_threads(args.threads)
    g = minirt.load("gemma3-270m")
    assert step_fallback_reason(g) is None
    tg = {False: [], True: []}
    for compiled in (False, True):  # warm both paths
        g.compiled_step = compiled
        bench.run(g, 0, 8, 1, bandwidth=False)
    for _ in range(args.runs):
        for compiled in (False, True):
            g.compiled_step = compiled
            tg[compiled] += bench.run(g, 0, args.gen, 1, bandwidth=False).tg
    for compiled, name in ((False, "per-operation"), (True, "compiled step")):
        v = tg[compiled]
        print(f"{name}: tg{args.gen} {statistics.mean(v):.1f} ± {statistics.stdev(v) if len(v) > 1 else 0:.1f} t/s "
              f"(runs {', '.join(f'{x:.1f}' for x in v)})")
    print(f"ratio of means {statistics.mean(tg[True]) / statistics.mean(tg[False]):.2f}×, {args.threads} thread(s)")


if __name__ == "__main__":
    main()
