"""Cost of entering a Numba parallel region from the main thread and from another thread.

On the omp threading layer (GNU OpenMP) a region entered from a non-main thread costs about ten times one
entered from the main thread (measured 2026-11-29, 2-core EPYC: 1.5 µs vs 17.2 µs). `minirt serve` runs the
model in its batcher thread, so each of a step's ~200 regions pays it:  python tools/omp_threads.py
"""
import threading
import time

import numba
import numpy as np


@numba.njit(parallel=True)
def touch(a):
    for i in numba.prange(a.shape[0]):
        a[i] += 1


def per_call(tag: str, a: np.ndarray, n: int = 2000) -> None:
    t = time.perf_counter()
    for _ in range(n):
        touch(a)
    print(f"{tag}: {(time.perf_counter() - t) / n * 1e6:.1f} µs per parallel region "
          f"({numba.threading_layer()} layer, {numba.get_num_threads()} threads)")


if __name__ == "__main__":
    a = np.zeros(64)
    touch(a)
    per_call("main thread", a)
    th = threading.Thread(target=per_call, args=("another thread", a))
    th.start()
    th.join()
    per_call("main thread again", a)
