"""The low-rank trade-off table: every setting against dense, measured in one run.

    python3 tools/lowrank_table.py [--chunks 10] [--runs 3] [--gen 64] [--calib-tokens 4096] [--quick]
    python3 tools/lowrank_table.py --model gemma3-270m [--threads 1] [--per-op]

Base: SmolLM2-135M's shipped weights expanded to float32 (the dense reference and baseline speed). For each
setting — energy 0.80/0.85/0.90/0.95/0.99 and parameter ratio 0.5/0.7/0.9, plain SVD and activation-aware
(SVD-LLM, calibrated on the second half of botchan.txt) — it prints ranks (min/median/max over the matrices
factored), matrices factored, parameters kept, MiB read per token, tg tokens/s (greedy, mean ± std) and
speedup over dense float32, perplexity on the first windows of botchan.txt (ctx 512; disjoint from the
calibration text) and its change, KL(dense ‖ setting) and top-1 agreement. The quantized formats follow at
their bytes per token, and factors stored in Q8_0 for the calibrated settings.

--model gemma3-270m: the base is the shipped Q4_K_M model as loaded (layers dequantized only for the SVD; its Q8_0
head and embedding stay), the speed baseline is that model's tg in the same run, and the settings are energy
0.9/0.99 and params 0.5/0.9, plain and aware, F32 factors, then Q8_0 factors for three of them. --per-op runs every
row on the per-operation path (no compiled step), so that the speed ratios compare like with like.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numba
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import minirt  # noqa: E402
from minirt import bench  # noqa: E402
from minirt.modes.lowrank import Factorizer, calibration_grams  # noqa: E402
from minirt.perplexity import perplexity  # noqa: E402
from minirt.quantize import quantize_gguf  # noqa: E402
from minirt.registry import pull  # noqa: E402


def tg_pairs(model, dense, args):
    """tg tokens/s of the setting and of dense, runs interleaved (so drift and neighbours hit both alike)."""
    tg, ref = [], []
    for _ in range(args.runs):
        ref += bench.run(dense, 0, args.gen, 1, bandwidth=False).tg
        tg += bench.run(model, 0, args.gen, 1, bandwidth=False).tg
    return tg, ref


def row(label, model, text, args, base, dense):
    t = time.perf_counter()
    r = perplexity(model, text, ctx=512, chunks=args.chunks, progress=False, base=base)
    tg, ref = tg_pairs(model, dense, args)
    fs = [f for f in getattr(model, "lowrank", []) if f.rank]
    if fs:
        ranks = sorted(f.rank for f in fs)
        rk = f"{ranks[0]}/{int(np.median(ranks))}/{ranks[-1]}"
        total = sum(f.shape[0] * f.shape[1] for f in model.lowrank)
        kept = sum(f.rank * sum(f.shape) if f.rank else f.shape[0] * f.shape[1] for f in model.lowrank)
        nf, pk = f"{len(fs)}/{len(model.lowrank)}", f"{kept / total:.2f}"
    else:
        rk, nf, pk = "—", "0", "1.00"
    mean = statistics.mean(tg)
    sd = statistics.stdev(tg) if len(tg) > 1 else 0.0
    speed = f"{mean:.1f} ± {sd:.1f}"
    line = (f"| {label} | {rk} | {nf} | {pk} | {model.weight_bytes / 2**20:.0f} | {speed} | "
            f"{statistics.mean(ref):.1f} | {mean / statistics.mean(ref):.2f}× | {r.ppl:.2f} | "
            f"{100 * (r.ppl / args.dense_ppl - 1):+.1f}% | {r.kl:.3f} | {100 * r.top1:.1f}% |")
    sys.stderr.write(f"{label}: PPL {r.ppl:.2f}, tg {speed} ({time.perf_counter() - t:.0f} s)\n")
    return line


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--chunks", type=int, default=10)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--gen", type=int, default=64)
    ap.add_argument("--calib-tokens", type=int, default=4096)
    ap.add_argument("--quick", action="store_true", help="two settings only (a smoke run)")
    ap.add_argument("--model", default="smollm2", choices=("smollm2", "gemma3-270m"))
    ap.add_argument("--threads", type=int, default=0, help="Numba threads (default: as set)")
    ap.add_argument("--per-op", action="store_true", help="every row on the per-operation path")
    args = ap.parse_args()
    if args.threads:
        numba.set_num_threads(args.threads)
    if args.per_op:
        minirt.model.Model.compiled_step = False
    if args.model != "smollm2":
        return gemma(args)
    dense = minirt.load("smollm2", dequantize=True)
    text, base, calib, out = baseline(args, dense, "dense F32", "dense F32")
    t = time.perf_counter()
    plain = Factorizer(dense, progress=True)
    grams = calibration_grams(dense, calib, progress=True)
    aware = Factorizer(dense, grams, progress=True)
    sys.stderr.write(f"decompositions: {time.perf_counter() - t:.0f} s\n")
    settings = [("energy", e) for e in (0.80, 0.85, 0.90, 0.95, 0.99)] + [("params", p) for p in (0.5, 0.7, 0.9)]
    if args.quick:
        settings = [("energy", 0.9), ("params", 0.7)]
    for kind, val in settings:
        for name, fz in (("plain", plain), ("aware", aware)):
            m = fz.build(**{kind: val})
            out.append(row(f"{name} {kind} {val}", m, text, args, base, dense))
    for kind, val in ([("params", 0.9), ("energy", 0.99)] if not args.quick else [("params", 0.9)]):
        m = aware.build(**{kind: val}, storage="Q8_0")
        out.append(row(f"aware {kind} {val}, Q8_0 factors", m, text, args, base, dense))
    del plain, aware
    src = pull("smollm2")
    with tempfile.TemporaryDirectory() as d:
        for q in ("Q8_0", "Q4_0"):
            f = quantize_gguf(src, Path(d) / f"smollm2-{q}.gguf", q, progress=False)
            out.append(row(f"dense {q} (from the Q4_1 values)", minirt.load(f), text, args, base, dense))
    out.append(row("dense Q4_1 (shipped)", minirt.load(src), text, args, base, dense))
    print(f"SmolLM2-135M, {args.chunks} windows of 512 (botchan.txt), tg{args.gen} × {args.runs}, "
          f"{numba.get_num_threads()} threads; calibration: "
          f"{len(calib)} tokens of botchan's second half")
    print("\n".join(out))


def baseline(args, ref_model, name: str, column: str):
    """botchan's text, the reference model's log-probabilities on it (its PPL in args.dense_ppl), the calibration
    ids (botchan's second half) and the table so far: its header and the reference's own row."""
    raw = open(pull("botchan"), "rb").read().decode("utf-8")
    text, calib_text = raw, raw[len(raw) // 2:]
    ref = perplexity(ref_model, text, ctx=512, chunks=args.chunks, progress=False, keep=True)
    args.dense_ppl = ref.ppl
    out = [f"| setting | ranks min/med/max | factored | params kept | MiB/token | tg tok/s | {column} tg, same run "
           "| speedup | PPL | ΔPPL | KL | top-1 |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    out.append(row(f"{name} (baseline)", ref_model, text, args, ref.logprobs, ref_model))
    calib = np.asarray(ref_model.tokenizer.encode(calib_text, add_bos=False)[:args.calib_tokens], np.int64)
    return text, ref.logprobs, calib, out


def gemma(args):
    """The table for a shipped K-quant model: its own values are the reference and the speed baseline."""
    shipped = minirt.load(args.model)
    text, base, calib, out = baseline(args, shipped, "shipped Q4_K_M", "shipped")
    t = time.perf_counter()
    plain = Factorizer(shipped)
    aware = Factorizer(shipped, calibration_grams(shipped, calib))
    sys.stderr.write(f"decompositions: {time.perf_counter() - t:.0f} s\n")
    settings = [("energy", 0.90), ("energy", 0.99), ("params", 0.5), ("params", 0.9)]
    if args.quick:
        settings = [("params", 0.9)]
    for kind, val in settings:
        for name, fz in (("plain", plain), ("aware", aware)):
            out.append(row(f"{name} {kind} {val}", fz.build(**{kind: val}), text, args, base, shipped))
    q8 = [("aware", aware, "params", 0.9), ("aware", aware, "energy", 0.99), ("plain", plain, "energy", 0.99)]
    for name, fz, kind, val in (q8[:1] if args.quick else q8):
        m = fz.build(**{kind: val}, storage="Q8_0")
        out.append(row(f"{name} {kind} {val}, Q8_0 factors", m, text, args, base, shipped))
    print(f"{args.model} (shipped Q4_K_M), {args.chunks} windows of 512 (botchan.txt), tg{args.gen} × {args.runs} "
          f"interleaved, {numba.get_num_threads()} threads, {'per-operation path' if args.per_op else 'default path'}; "
          f"calibration: {len(calib)} tokens of botchan's second half")
    print("\n".join(out))


if __name__ == "__main__":
    main()
