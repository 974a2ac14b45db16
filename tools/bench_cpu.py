#!/usr/bin/env python3
"""minirt beside llama.cpp on this CPU: tg and pp for F32, F16, Q8_0, Q4_0, Q4_1 at 1 and 2 threads.

    python tools/bench_cpu.py [--bin ~/.cache/minirt-anchors/llama.cpp-0.3.36/build/bin] [-r 3] [-p 128] [-n 128]
                              [--formats F32,F16,Q8_0,Q4_0,Q4_1] [--threads 1,2] [--model smollm2]

The files are made from the model's (SmolLM2-135M's Q4_1) file with `minirt quantize` and cached in
~/.cache/minirt/cpu-bench/. Each round runs, for every format and thread count, minirt (in this process)
and then `llama-bench -r 1` on the same file: the rounds are interleaved, so a change in the machine's
load falls on both. Printed: mean ± std over the rounds, the ratio minirt ÷ llama.cpp, the bandwidth a
generated token implies (weight bytes × tok/s) against the measured streaming bandwidth, and the CPU
features with the ISA path minirt chose. Run it on a quiet machine (it takes ~1 minute per round per format).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's minirt

import numba  # noqa: E402

import minirt  # noqa: E402
from minirt import bench  # noqa: E402
from minirt.cpu import isa  # noqa: E402
from minirt.registry import pull  # noqa: E402

DEFAULT_BIN = Path.home() / ".cache/minirt-anchors/llama.cpp-0.3.36/build/bin"
FORMATS = ("F32", "F16", "Q8_0", "Q4_0", "Q4_1")


def cpu_features() -> str:
    flags: set[str] = set()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
        name = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    except OSError:
        name = "?"
    shown = sorted(f for f in flags if f.startswith("avx512") or f in ("avx2", "fma", "f16c", "avx_vnni"))
    return f"{name}; {os.cpu_count()} CPUs; flags: {' '.join(shown) or '(none of avx2/avx512)'}"


def files(model: str, formats: list[str]) -> dict[str, Path]:
    """The model's file re-encoded in each format (made once, then cached)."""
    from minirt.quantize import quantize_gguf
    src = Path(pull(model)) if not Path(model).exists() else Path(model)
    out_dir = Path.home() / ".cache/minirt/cpu-bench"
    out_dir.mkdir(parents=True, exist_ok=True)
    out = {}
    for f in formats:
        dst = out_dir / f"{src.stem}.{f}.gguf"
        if not dst.exists():
            tmp = dst.with_suffix(".tmp.gguf")
            quantize_gguf(src, tmp, f)
            tmp.replace(dst)
        out[f] = dst
    return out


def llama_bench(exe: Path, path: Path, threads: int, p: int, n: int, depth: int = 0) -> dict[str, float]:
    cmd = [str(exe), "-m", str(path), "-t", str(threads), "-p", str(p), "-n", str(n), "-r", "1", "-o", "json",
           "-d", str(depth)]
    res = subprocess.run(cmd, capture_output=True, text=True, check=True)
    out = {}
    for row in json.loads(res.stdout):
        key = f"pp{row['n_prompt']}" if row["n_prompt"] else f"tg{row['n_gen']}"
        out[key] = float(row["avg_ts"])
    return out


def fork_join_us(threads: int, k: int = 2000) -> float:
    """µs per parallel region entered from compiled code (what each matrix product, attention and activation
    of the compiled step costs on top of its work): the median of 7 runs of k empty regions."""
    from numba import njit, prange
    import numpy as np

    @njit(parallel=True)
    def region(a, n):
        for i in prange(n):
            a[i] += 1.0

    @njit
    def many(a, n, k):
        for _ in range(k):
            region(a, n)
    minirt.set_threads(threads)
    a = np.zeros(64)
    many(a, threads, 10)
    ts = []
    for _ in range(7):
        t = time.perf_counter()
        many(a, threads, k)
        ts.append((time.perf_counter() - t) / k * 1e6)
    return statistics.median(ts)


def ms(xs: list[float]) -> str:
    return f"{statistics.mean(xs):7.1f} ± {statistics.stdev(xs) if len(xs) > 1 else 0.0:5.1f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bin", type=Path, default=DEFAULT_BIN, help="llama.cpp's build/bin (llama-bench)")
    ap.add_argument("--model", default="smollm2", help="registry name or GGUF path the formats are made from")
    ap.add_argument("--formats", default=",".join(FORMATS))
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("-r", "--rounds", type=int, default=3)
    ap.add_argument("-p", type=int, default=128)
    ap.add_argument("-n", type=int, default=128)
    ap.add_argument("-d", "--depth", type=int, default=0, help="tokens of context before each test (llama-bench -d)")
    a = ap.parse_args()
    exe = a.bin / "llama-bench"
    if not exe.exists():
        sys.exit(f"no llama-bench in {a.bin}: build llama.cpp (../shared/anchors/llama-cpp.sh) or give --bin")
    formats = a.formats.split(",")
    threads = [int(t) for t in a.threads.split(",")]
    paths = files(a.model, formats)
    print(f"CPU: {cpu_features()}", flush=True)
    bw = {}
    for t in threads:
        minirt.set_threads(t)
        bw[t] = bench.memory_bandwidth()
    print(f"minirt ISA path: {isa.SELECTED} (host paths: {', '.join(isa.host_paths())}); "
          f"Numba threading layer: {numba.threading_layer()}; streaming read bandwidth: "
          + ", ".join(f"{bw[t] / 1e9:.1f} GB/s ({t} threads)" for t in threads)
          + f"; load average at start: {' '.join(f'{v:.2f}' for v in os.getloadavg())}", flush=True)
    print("parallel region fork/join: " + ", ".join(f"{fork_join_us(t):.1f} µs ({t} threads)" for t in threads)
          + f"; regions per decode step of the compiled step: 6 per layer + 2", flush=True)
    models = {}
    for f in formats:
        models[f] = minirt.load(paths[f])
        models[f].warmup()
    tests = [f"pp{a.p}"] * (a.p > 0) + [f"tg{a.n}"] * (a.n > 0)
    res = {(f, t, who, k): [] for f in formats for t in threads for who in ("minirt", "llama.cpp") for k in tests}
    t0 = time.time()
    for rnd in range(a.rounds):
        for f in formats:
            for t in threads:
                minirt.set_threads(t)
                r = bench.run(models[f], a.p, a.n, r=1, seed=rnd, bandwidth=False, depth=a.depth)
                for k in tests:
                    res[(f, t, "minirt", k)] += r.pp if k.startswith("pp") else r.tg
                lb = llama_bench(exe, paths[f], t, a.p, a.n, a.depth)
                for k in tests:
                    res[(f, t, "llama.cpp", k)].append(lb[k])
                print(f"round {rnd + 1}/{a.rounds} {f} {t} threads: "
                      + " ".join(f"{k} {res[(f, t, 'minirt', k)][-1]:.1f} vs {lb[k]:.1f}" for k in tests)
                      + f"  ({time.time() - t0:.0f} s, load "
                      f"{os.getloadavg()[0]:.2f})", file=sys.stderr, flush=True)
    print(f"load average at end: {' '.join(f'{v:.2f}' for v in os.getloadavg())}; {a.rounds} interleaved rounds")
    print("| format | threads | test | minirt t/s | llama.cpp t/s | minirt ÷ llama.cpp | minirt GB/s | % of bandwidth |")
    print("|---|---|---|---|---|---|---|---|")
    for f in formats:
        wb = models[f].weight_bytes
        for t in threads:
            for k in tests:
                m, ll = res[(f, t, "minirt", k)], res[(f, t, "llama.cpp", k)]
                ratio = statistics.mean(m) / statistics.mean(ll)
                gbs = pct = ""
                if k.startswith("tg"):
                    g = statistics.mean(m) * wb
                    gbs, pct = f"{g / 1e9:.1f}", f"{100 * g / bw[t]:.0f}% of {bw[t] / 1e9:.1f}"
                print(f"| {f} | {t} | {k} | {ms(m)} | {ms(ll)} | {ratio:.2f} | {gbs} | {pct} |")


if __name__ == "__main__":
    main()
