"""Where a GPU decode step's time goes: the launch floor and the persistent layers kernel's variants.

    python3 tools/gpu_lab.py [-m FILE] [-n 128] [-r 3] [--floor-only]

1. The launch floor: a CUDA graph of N empty kernels (N = the default step's launches), µs per node.
2. Per-kernel times of the 5-launch step (tools/gpu_bench.profile_step).
3. Greedy decode tok/s (tools/gpu_bench.decode_tps: argmax on the device, one sync at the end) of the step
   with 5 launches a layer (L2 prefetch of the next matrix off / on) and of the persistent layers kernel with its L2 prefetch off / next layer / next
   layer and the head (kernels.py pf), and of source variants that measure a part by leaving it out (no grid
   barriers, no attention: wrong tokens, timing only) or change it (2 blocks per multiprocessor, no sleep in
   the barrier's spin). Tokens are checked against the 5-launch step's where the variant is exact.
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
from minirt.cuda import kernels as K  # noqa: E402
from minirt.cuda.backend import to_gpu  # noqa: E402

VARIANTS = {  # name: source replacements (exact variants: the tokens are checked)
    "2 blocks/SM (launch bounds)": {"template <typename W>\n__global__ void layers(":
                                    "template <typename W>\n__global__ void __launch_bounds__(256, 2) layers("},
}


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


def variant_kernels(repl: dict):
    src = K.SOURCE
    for a, b in repl.items():
        assert a in src, a
        src = src.replace(a, b)
    saved, K.SOURCE = K.SOURCE, src
    try:
        return K.Kernels()
    finally:
        K.SOURCE = saved


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
        print(f"  {name}: {ms(d)} tok/s ({1e6 / statistics.mean(d):.0f} µs/token), tokens as 5 a layer: {same}",
              flush=True)

    from gpu_bench import profile_step
    g.persistent, g.prefetch, g.pdl = False, 0, False
    ref = g.decode_greedy(prompt, g.new_cache(args.n + 2), args.n)
    print("per-kernel µs of the 5-launch step (layer 0, warm caches, 100 launches in a graph):", flush=True)
    profile_step(g)
    for persistent, pf, pdl in ((False, 0, False), (False, 0, True), (False, 2, True), (True, 0, True),
                                (True, 1, True), (True, 2, True)):
        g.persistent, g.prefetch, g.pdl = persistent, pf, pdl
        run(f"{'persistent' if persistent else '5 launches a layer'}, prefetch {pf}, PDL {int(pdl)}")
    base = g.k
    for name, repl in VARIANTS.items():
        g.k = variant_kernels(repl)
        g.persistent, g.prefetch, g.pdl = True, 1, True
        run(f"persistent, prefetch 1, PDL 1, {name}")
    g.k = base
    print("\n| step | decode tok/s | µs/token | tokens as 5 a layer |\n|---|---|---|---|")
    for name, d, same in rows:
        print(f"| {name} | {ms(d)} | {1e6 / statistics.mean(d):.0f} | {'—' if same is None else same} |")


if __name__ == "__main__":
    main()
