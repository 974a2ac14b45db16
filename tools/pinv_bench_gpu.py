"""The pinv transition on a GPU (CuPy): dense X_{t+1}·W (cuBLAS, fp32) against the transition through the
S×S Gram matrix (Cholesky + two triangular solves, no H×H or H×N intermediate), at SmolLM2's FFN shape and
the design documents' (S = 128, H = 12288, N = 49152). Device-event timing, median of 50 after warm-up.
Run on the GPU machine: python3 tools/pinv_bench_gpu.py
"""
from __future__ import annotations

import cupy as cp
import cupyx.scipy.linalg as cla


def transition(x, y, xn, ridge=1e-10):
    g = x @ x.T
    g += (ridge * cp.trace(g) / g.shape[0]) * cp.eye(g.shape[0], dtype=g.dtype)
    L = cp.linalg.cholesky(g)
    w = cla.solve_triangular(L, x @ xn.T, lower=True)          # L⁻¹ X_t xᵀ
    z = cla.solve_triangular(L, w, lower=True, trans="T")      # G⁻¹ X_t xᵀ
    return z.T @ y


def median_ms(f, reps=50):
    for _ in range(5):
        f()
    cp.cuda.Device().synchronize()
    times = []
    for _ in range(reps):
        a, b = cp.cuda.Event(), cp.cuda.Event()
        a.record()
        f()
        b.record()
        b.synchronize()
        times.append(cp.cuda.get_elapsed_time(a, b))
    times.sort()
    return times[len(times) // 2]


def main():
    print(cp.cuda.runtime.getDeviceProperties(0)["name"].decode())
    print("| H | N | S | dense X·W ms | transition ms | speedup | rel. error (σ = 0.01) | reuse Y_t error |")
    print("|---|---|---|---|---|---|---|---|")
    for H, N, sizes in ((576, 1536, (8, 32, 128)), (12288, 49152, (32, 128))):
        rng = cp.random.default_rng(0)
        w = rng.standard_normal((H, N), dtype=cp.float32) / H ** 0.5
        for S in sizes:
            x = rng.standard_normal((S, H), dtype=cp.float32)
            xn = x + 0.01 * rng.standard_normal((S, H), dtype=cp.float32)
            y = x @ w
            exact = xn @ w
            err = float(cp.linalg.norm(transition(x, y, xn) - exact) / cp.linalg.norm(exact))
            reuse = float(cp.linalg.norm(y - exact) / cp.linalg.norm(exact))
            td = median_ms(lambda: xn @ w)
            tt = median_ms(lambda: transition(x, y, xn))
            print(f"| {H} | {N} | {S} | {td:.3f} | {tt:.3f} | {td / tt:.1f}× | {err:.2e} | {reuse:.2e} |", flush=True)


if __name__ == "__main__":
    main()
