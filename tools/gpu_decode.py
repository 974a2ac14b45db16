"""Decode speed of SmolLM2 (or a GGUF) on the GPU backend by weight layout and launch scheme (BENCHMARKS.md GPU).

    python3 tools/gpu_decode.py [-m FILE] [-n 128] [-r 5] [--ncu-step]

For the weights as stored (GGUF blocks dequantized in the kernels) and expanded to float16, each with the
persistent layers kernel (one launch for all layers) and with one launch per matmul/attention: greedy decode
tok/s with the argmax on the device and one host sync at the end (decode_greedy), and streamed through
`generate` (a token read and detokenized per step). --ncu-step: run ONE eager decode step (position 64)
between cupy.cuda.profiler.start()/stop(), for `ncu --profile-from-start off` (DRAM bytes per step).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import minirt  # noqa: E402
from minirt.cuda.backend import to_gpu  # noqa: E402


def ms(xs):
    return f"{statistics.mean(xs):.1f} ± {statistics.stdev(xs) if len(xs) > 1 else 0.0:.1f}"


def main():
    from gpu_bench import decode_tps, generate_tps
    from minirt.bench import FREE_WRITING
    ap = argparse.ArgumentParser()
    ap.add_argument("-m", "--model", default="smollm2")
    ap.add_argument("-n", type=int, default=128)
    ap.add_argument("-r", type=int, default=5)
    ap.add_argument("--ncu-step", action="store_true")
    ap.add_argument("--dtype", default=None)
    args = ap.parse_args()
    cpu = minirt.load(args.model)
    if args.ncu_step:
        import cupy as cp
        g = to_gpu(cpu, args.dtype)
        cache = g.new_cache(128)
        g.prefill_greedy(list(range(1, 65)), cache)
        g.stream.synchronize()
        cp.cuda.profiler.start()
        g.step_greedy(cache)  # the first T=1 step on this cache runs eagerly (not a graph): kernels ncu can see
        g.stream.synchronize()
        cp.cuda.profiler.stop()
        print(f"one step profiled: {g.weight_type}, {g.weight_bytes / 2**20:.1f} MiB of weights")
        return
    rows = []
    for dtype in (None, "float16"):
        g = to_gpu(cpu, dtype)
        for persistent in (True, False):
            if persistent and not g.layers_type:
                continue
            g.persistent = persistent
            d = decode_tps(g, args.n, args.r, [1])
            gt, _, _ = generate_tps(g, FREE_WRITING, args.n)
            rows.append((g.weight_type, g.weight_bytes / 2**20, "1 (persistent)" if persistent else "5 a layer",
                         d, gt))
            print(f"  {rows[-1][0]} {rows[-1][2]}: decode {ms(d)}, streamed {ms(gt)} tok/s", flush=True)
        del g
    print(f"\n{args.model}, {args.n} tokens, {args.r} runs (decode) / {len(FREE_WRITING)} prompts (streamed)")
    print("| weights on the device | MiB read per token | layer launches | decode tok/s (argmax on device) "
          "| streamed generate tok/s |")
    print("|---|---|---|---|---|")
    for t, mib, launches, d, gt in rows:
        print(f"| {t} | {mib:.1f} | {launches} | {ms(d)} | {ms(gt)} |")


if __name__ == "__main__":
    main()
