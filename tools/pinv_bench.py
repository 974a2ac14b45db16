"""Operator benchmark of the pinv transition (minirt/modes/pinv.py) against the dense product X_{t+1} W and
against naive reuse Ŷ = Y_t, at SmolLM2's FFN shape (H = 576, N = 1536) and the design documents' shape
(H = 12288, N = 49152), fp32, for several block sizes S and noise levels (X_{t+1} = X_t + σ·noise·rms(X_t)).

    python tools/pinv_bench.py            # both shapes
    python tools/pinv_bench.py --small    # SmolLM2's shape only
"""
from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from minirt.modes.pinv import transition


def best(f, reps=3):
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t)
    return min(ts)


def run(H, N, sizes, noises, reps):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((H, N), dtype=np.float32) / np.sqrt(H)
    print(f"\nH = {H}, N = {N}: dense X·W vs transition (time: best of {reps}; error: ‖Ŷ − XW‖_F / ‖XW‖_F)")
    print("| S | dense ms | transition ms | speedup | σ | transition error | reuse Y_t error | max row residual |")
    print("|---|---|---|---|---|---|---|---|")
    for S in sizes:
        x = rng.standard_normal((S, H), dtype=np.float32)
        y = x @ w
        for sigma in noises:
            xn = (x + sigma * rng.standard_normal((S, H), dtype=np.float32)).astype(np.float32)
            exact = xn @ w
            t_dense = best(lambda: xn @ w, reps)
            t_tr = best(lambda: transition(x, y, xn), reps)
            y_hat, resid = transition(x, y, xn)
            err = np.linalg.norm(y_hat - exact) / np.linalg.norm(exact)
            reuse = np.linalg.norm(y - exact) / np.linalg.norm(exact)
            print(f"| {S} | {t_dense * 1e3:.2f} | {t_tr * 1e3:.2f} | {t_dense / t_tr:.1f}× | {sigma:g} | {err:.2e} | "
                  f"{reuse:.2e} | {resid.max():.2e} |")
            sys.stdout.flush()


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--small", action="store_true")
    a = ap.parse_args()
    run(576, 1536, [8, 16, 32, 64, 128], [0.001, 0.01, 0.1], reps=5)
    if not a.small:
        run(12288, 49152, [128], [0.001, 0.01, 0.1], reps=2)
