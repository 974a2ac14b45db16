"""A/B of the block-format decode kernels (qmatmul.matmul_q) of this checkout against a git ref, in one process,
1 thread, interleaved (A B / B A by round), process CPU time (4 sessions share 2 cores: wall time is noise).

    python tools/qmatmul_ab.py Q4_0 [--ref main] [-T 1 2 4 5 8 16] [--mats 100] [--rounds 8]

The ref's minirt/ is archived into a temporary folder as package minirt_base. --mats matrices of 1536×576
(SmolLM2-135M's FFN), 100 ≈ 50-94 MB: past L3, as a model's step. Prints per T the min time of a pass over all
matrices, each side's ratio to its own T=1, and the median of the paired new/old ratios. Q4_0 runs on the
new side with h without columns (its −8 in the integer sums); the ref gets what it was written for (h = d)
unless --ref-q40-int."""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("fmt", choices=["Q8_0", "Q4_0", "Q4_1"])
    ap.add_argument("--ref", default="main")
    ap.add_argument("-T", type=int, nargs="+", default=[1, 2, 4, 5, 8, 16])
    ap.add_argument("--mats", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--ref-q40-int", action="store_true", help="the ref also takes Q4_0 with h without columns")
    a = ap.parse_args()
    tmp = tempfile.mkdtemp()
    subprocess.run(f"git archive {a.ref} minirt | tar -x -C {tmp} && mv {tmp}/minirt {tmp}/minirt_base", shell=True,
                   check=True, cwd=ROOT)
    sys.path[:0] = [tmp, ROOT]
    import numba
    numba.set_num_threads(1)
    import numpy as np
    from gguf import GGMLQuantizationType, quants
    import minirt_base.cpu.isa as IA
    import minirt_base.cpu.qmatmul as QA
    import minirt.cpu.isa as IB
    import minirt.cpu.qmatmul as QB

    K, N, nb = 576, 1536, 576 // 32
    raw = quants.quantize(np.random.default_rng(0).standard_normal((N, K)).astype(np.float32),
                          GGMLQuantizationType[a.fmt])
    b = raw.reshape(N, nb, {"Q8_0": 34, "Q4_0": 18, "Q4_1": 20}[a.fmt])
    d = b[..., 0:2].copy().view(np.uint16)[..., 0]
    m = b[..., 2:4].copy().view(np.uint16)[..., 0] if a.fmt == "Q4_1" else np.zeros((N, 0), np.uint16)
    q = b[..., 4 if a.fmt == "Q4_1" else 2:].copy().view(np.int8 if a.fmt == "Q8_0" else np.uint8)
    qi, di, mi = QB.pack(q, d, m)
    q40 = a.fmt == "Q4_0"
    mats = [(qi.copy(), di.copy(), di.copy() if q40 else mi.copy()) for _ in range(a.mats)]

    def run(Q, I, T, reps, int_q40):
        x = np.random.default_rng(T).standard_normal((T, K)).astype(np.float32)
        xq, xde, xs = np.empty((T, K), np.int8), np.empty((T, nb * 8), np.float32), np.empty((T, nb), np.float32)
        Q.quantize_x(x, xq, xde, xs)
        xk = xs * np.float32(-8) if q40 and not int_q40 else xs
        out = np.empty((T, N), np.float32)
        best = 1e9
        for _ in range(reps):
            t0 = time.process_time()
            for qq, dd, hh in mats:
                Q.matmul_q(I.tag(), xq, xde, xk, qq, dd, hh[:, :0] if q40 and int_q40 else hh, out, 1)
            best = min(best, time.process_time() - t0)
        return best, out

    sides = {"old": (QA, IA, a.ref_q40_int), "new": (QB, IB, True)}
    for T in a.T:  # compile
        for Q, I, iq in sides.values():
            run(Q, I, T, 1, iq)
    best, pairs = {}, {}
    for r in range(a.rounds):
        for T in a.T:
            got = {}
            for name in (("old", "new") if r % 2 == 0 else ("new", "old")):
                got[name] = run(*sides[name][:2], T, 2, sides[name][2])
                best[name, T] = min(best.get((name, T), 1e9), got[name][0])
            o = got["old"][1]
            assert np.allclose(got["new"][1], o, rtol=1e-4, atol=1e-3 * np.abs(o).max()), T
            pairs.setdefault(T, []).append(got["new"][0] / got["old"][0])
    print(f"{a.fmt}: {a.mats} matrices {N}×{K}, 1 thread, {IB.SELECTED}; old = {a.ref}, new = this checkout; "
          f"ms per pass (min of {a.rounds} rounds), × own T={a.T[0]}, new/old (median of paired rounds)")
    for T in a.T:
        o, n = best["old", T], best["new", T]
        print(f"T={T:2d}  old {o * 1e3:7.2f} ({o / best['old', a.T[0]]:4.2f}x)  new {n * 1e3:7.2f} "
              f"({n / best['new', a.T[0]]:4.2f}x)  new/old {np.median(pairs[T]):4.2f}")


if __name__ == "__main__":
    main()
