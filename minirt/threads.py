"""Threads on the CPU: Numba's pool for the kernels, and a small pool that runs BLAS GEMMs side by side.

BLAS's own threads spin after each call and steal the cores from the Numba kernels that follow, so
batched matmuls run single-threaded BLAS calls on disjoint row blocks from our own threads instead.
"""
from __future__ import annotations

import contextlib
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache

import numba
import numpy as np


@lru_cache(maxsize=4)
def _pool(n: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(n, thread_name_prefix="minirt-gemm")


@lru_cache(maxsize=1)
def _controller():
    from threadpoolctl import ThreadpoolController
    return ThreadpoolController()


def blas_single_threaded():
    """Context in which BLAS runs on the calling thread only (restored afterwards)."""
    try:
        return _controller().limit(limits=1, user_api="blas")
    except Exception:  # no threadpoolctl-visible BLAS: nothing to limit
        return contextlib.nullcontext()


def gemm_nt(x: np.ndarray, w: np.ndarray, out: np.ndarray) -> None:
    """out = x · wᵀ with the rows of w split over the kernel threads (each a single-threaded BLAS call)."""
    n = numba.get_num_threads()
    N = w.shape[0]
    if n == 1 or N < 64:
        np.matmul(x, w.T, out=out)
        return
    step = -(-N // n)

    def part(i: int) -> None:
        a, b = i * step, min(N, (i + 1) * step)
        np.matmul(x, w[a:b].T, out=out[:, a:b])

    list(_pool(n).map(part, range(n)))
