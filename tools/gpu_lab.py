"""Where a GPU decode step's time goes: the launch floor, per-kernel times and the launch schemes.

    python3 tools/gpu_lab.py [-m FILE] [-n 128] [-r 3] [--floor-only]

1. The launch floor: a CUDA graph of N empty kernels (N = the default step's launches), µs per node.
2. Per-kernel times of the 5-launch step (tools/gpu_bench.profile_step).
3. Greedy decode tok/s (tools/gpu_bench.decode_tps: argmax on the device, one sync at the end) by launch
   scheme (CONFIGS: 5 launches a layer, with and without programmatic dependent launch; the persistent layers
   kernel with and without its L2 prefetch), each row's tokens checked against the first row's.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import minirt  # noqa: E402
from minirt.cuda.backend import to_gpu  # noqa: E402

CONFIGS = [  # GPUModel attributes per row: launch scheme, programmatic dependent launch
    dict(persistent=False, pdl=False),
    dict(persistent=False, pdl=True),
    dict(persistent=True, pdl=True, prefetch=0),
    dict(persistent=True, pdl=True, prefetch=1),
]


def ms(xs):
    return f"{statistics.mean(xs):.1f} ± {statistics.stdev(xs) if len(xs) > 1 else 0.0:.1f}"


def launch_floor(cp, n: int, reps: int = 50) -> float:
    """µs per node of a graph of n empty kernels (1 block of 32 threads)."""
    f = cp.RawKernel(r'extern "C" __global__ void nop(int* p) { if (p[0] == 12345) p[1] = 1; }', "nop")
    buf = cp.zeros(2, cp.int32)
    s = cp.cuda.Stream(non_blocking=True)
    with s:
        f((1,), (32,), (buf,))
        s.begin_capture()
        for _ in range(n):
            f((1,), (32,), (buf,))
        g = s.end_capture()
        g.launch(stream=s)
        s.synchronize()
        ts = []
        for _ in range(reps):
            t = time.perf_counter()
            g.launch(stream=s)
            s.synchronize()
            ts.append(time.perf_counter() - t)
    return statistics.median(ts) / n * 1e6


def main():
    from gpu_bench import decode_tps
    ap = argparse.ArgumentParser()
    ap.add_argument("-m", "--model", default="smollm2")
    ap.add_argument("-n", type=int, default=128)
    ap.add_argument("-r", type=int, default=3)
    ap.add_argument("--floor-only", action="store_true")
    args = ap.parse_args()
    import cupy as cp
    for n in (30, 154):
        print(f"launch floor: graph of {n} empty kernels: {launch_floor(cp, n):.2f} µs per node", flush=True)
    if args.floor_only:
        return
    g = to_gpu(minirt.load(args.model))
    print(f"{args.model}: {g.weight_type}, {g.weight_bytes / 2**20:.1f} MiB of weights, layers kernel type "
          f"{g.layers_type}", flush=True)
    prompt = [1]
    rows = []

    def run(name):
        cache = g.new_cache(args.n + 2)
        toks = g.decode_greedy(prompt, cache, args.n)
        d = decode_tps(g, args.n, args.r, prompt)
        same = toks == ref
        rows.append((name, d, same))
        print(f"  {name}: {ms(d)} tok/s ({1e6 / statistics.mean(d):.0f} µs/token), tokens as the first row's: {same}",
              flush=True)

    from gpu_bench import profile_step
    g.persistent, g.pdl = False, False
    ref = g.decode_greedy(prompt, g.new_cache(args.n + 2), args.n)
    print("per-kernel µs of the 5-launch step (layer 0, warm caches, 100 launches in a graph):", flush=True)
    profile_step(g)
    for cfg in CONFIGS:
        for key, v in cfg.items():
            setattr(g, key, v)
        run(", ".join(f"{key} {int(v)}" for key, v in cfg.items()))
    print("\n| step | decode tok/s | µs/token | tokens as the first row's |\n|---|---|---|---|")
    for name, d, same in rows:
        print(f"| {name} | {ms(d)} | {1e6 / statistics.mean(d):.0f} | {'—' if same is None else same} |")


if __name__ == "__main__":
    main()
