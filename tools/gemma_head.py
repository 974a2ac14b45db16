"""Gemma 3 270M Q4_K_M: what re-quantizing or factoring its tied 262,144 × 640 Q8_0 head does to speed and
quality (and, with --layers, low-rank layers as in the SmolLM2 table).

    python3 tools/gemma_head.py [--chunks 5] [--runs 3] [--gen 64] [--layers]

Each row replaces the head only (the embedding lookups keep the shipped Q8_0 table) and reports: MiB read per
token, tg tok/s (greedy, mean ± std) beside the shipped model's tg measured interleaved run by run, the ratio
of the means, perplexity on the first windows of botchan.txt (ctx 512), KL(shipped ‖ row) and top-1 agreement
over the same positions, and how many of 64 greedy tokens equal the shipped model's on three prompts (up to the
first difference). Re-quantized heads start from the shipped Q8_0 values (640 columns are not whole 256-blocks,
so no K-quant fits: that is why llama.cpp's Q4_K_M mix keeps this head in Q8_0). Factored heads: SVD of the
head, plain or activation-aware (SVD-LLM, Grams of its inputs over 4,096 tokens of botchan's second half).
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import numba
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import minirt  # noqa: E402
from minirt import bench  # noqa: E402
from minirt.linear import make_linear  # noqa: E402
from minirt.modes.lowrank import Factorizer, calibration_grams, dense_matrix  # noqa: E402
from minirt.perplexity import perplexity  # noqa: E402
from minirt.quantize import encode  # noqa: E402
from minirt.readers.base import Tensor  # noqa: E402
from minirt.registry import pull  # noqa: E402

PROMPTS = ("Once upon a time", "The capital of France is", "def fibonacci(n):")


def with_head(model, head):
    out = copy.copy(model)
    out.head, out._scratch = head, {}
    return out


def requantized_head(model, qtype: str):
    w = dense_matrix(model.head)
    return make_linear([Tensor(encode(w, qtype), qtype, w.shape)])


def greedy(model, n: int) -> list[list[int]]:
    return [_ids(model, p, n) for p in PROMPTS]


def _ids(model, prompt: str, n: int) -> list[int]:
    g = model.generate(prompt, max_tokens=n, temperature=0)
    g.text()
    return list(g.stats.tokens)


def head_ms(model, reps: int = 20) -> float:
    """The head's matmul for one position (a decode step's), best of reps, in ms."""
    x = np.random.default_rng(0).standard_normal((1, model.cfg.dim)).astype(np.float32)
    out = np.empty((1, model.cfg.vocab_size), np.float32)
    model.head.forward(x, out)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        model.head.forward(x, out)
        best = min(best, time.perf_counter() - t)
    return 1e3 * best


def agreement(a: list[list[int]], b: list[list[int]]) -> str:
    same = 0
    for x, y in zip(a, b):
        k = 0
        while k < min(len(x), len(y)) and x[k] == y[k]:
            k += 1
        same += k
    return f"{same}/{sum(len(x) for x in a)}"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--chunks", type=int, default=5)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--gen", type=int, default=64)
    ap.add_argument("--calib-tokens", type=int, default=4096)
    ap.add_argument("--layers", action="store_true", help="also low-rank layers (head shipped)")
    ap.add_argument("--no-lowrank", action="store_true", help="re-quantized heads only")
    ap.add_argument("--only", default="", help="comma-separated row labels to run (default: all)")
    args = ap.parse_args()
    raw = open(pull("botchan"), "rb").read().decode("utf-8")
    shipped = minirt.load("gemma3-270m")
    ref = perplexity(shipped, raw, ctx=512, chunks=args.chunks, progress=False, keep=True)
    ref_ids = greedy(shipped, args.gen)
    out = ["| setting | MiB/token | tg tok/s | shipped tg, same run | ratio of means | ratio of bests | head ms (min): "
           "this / shipped | PPL | ΔPPL | KL | top-1 | greedy = shipped |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def row(label, model):
        if args.only and label not in args.only.split(","):
            return
        t0 = time.perf_counter()
        r = perplexity(model, raw, ctx=512, chunks=args.chunks, progress=False, base=ref.logprobs)
        tg, base, hv, hb = [], [], [], []
        for _ in range(args.runs):  # interleaved: the shipped model, then this one
            base += bench.run(shipped, 0, args.gen, 1, bandwidth=False).tg
            tg += bench.run(model, 0, args.gen, 1, bandwidth=False).tg
            hb.append(head_ms(shipped))
            hv.append(head_ms(model))
        m, s, b = statistics.mean(tg), statistics.stdev(tg) if len(tg) > 1 else 0.0, statistics.mean(base)
        agree = agreement(ref_ids, greedy(model, args.gen))
        line = (f"| {label} | {model.weight_bytes / 2**20:.0f} | {m:.1f} ± {s:.1f} | {b:.1f} | {m / b:.2f}× | "
                f"{max(tg) / max(base):.2f}× | {min(hv):.2f} / {min(hb):.2f} | "
                f"{r.ppl:.3f} | {100 * (r.ppl / ref.ppl - 1):+.2f}% | {r.kl:.4f} | {100 * r.top1:.1f}% | {agree} |")
        out.append(line)
        print(line, f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)

    row("shipped (Q8_0 head)", shipped)
    for q in ("Q5_1", "Q5_0", "Q4_1", "Q4_0"):
        if args.only and f"head {q}" not in args.only.split(","):
            continue
        row(f"head {q}", with_head(shipped, requantized_head(shipped, q)))
    calib = np.asarray(shipped.tokenizer.encode(raw[len(raw) // 2:], add_bos=False)[:args.calib_tokens], np.int64)
    if args.no_lowrank:
        print(f"shipped PPL {ref.ppl:.3f}")
        print("\n".join(out))
        return
    grams = calibration_grams(shipped, calib)
    for gr, name in ((None, "plain"), (grams, "aware")):
        fz = Factorizer(shipped, gr, head=True)
        for kw, storage in ((dict(params=0.5), "Q8_0"), (dict(params=0.9), "Q8_0"), (dict(energy=0.99), "Q8_0")):
            lm = fz.build(**kw, storage=storage)
            lm.layers = shipped.layers  # the head alone
            rk = next(f.rank for f in lm.lowrank if f.name == "head")
            label = f"head {name} {next(iter(kw))} {next(iter(kw.values()))} (rank {rk}), {storage} factors"
            if rk:
                row(label, lm)
        if args.layers:
            for kw in (dict(energy=0.99), dict(params=0.9)):
                lm = fz.build(**kw, storage="Q8_0")
                lm.head = shipped.head
                fs = [f for f in lm.lowrank if f.rank and f.name != "head"]
                row(f"layers {name} {next(iter(kw))} {next(iter(kw.values()))}, Q8_0 factors "
                    f"({len(fs)}/{len(shipped.layers) * 4} factored)", lm)
        del fz
    print(f"Gemma 3 270M Q4_K_M, {args.chunks} windows of 512 (botchan.txt), tg{args.gen} × {args.runs} interleaved, "
          f"{numba.get_num_threads()} threads; shipped PPL {ref.ppl:.3f}")
    print("\n".join(out))


if __name__ == "__main__":
    main()
