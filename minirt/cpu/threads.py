"""Threads on the CPU: Numba's pool for the kernels, and a small pool that runs BLAS GEMMs side by side.

BLAS's own threads spin after each call and steal the cores from the Numba kernels that follow, so
batched matmuls run single-threaded BLAS calls on disjoint row blocks from our own threads instead.
"""
from __future__ import annotations

import contextlib
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from typing import Callable

import numba


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


def split_rows(n_rows: int, work: Callable[[int, int], None], min_rows: int = 64) -> None:
    """Call work(a, b) on disjoint row ranges covering 0..n_rows, one range per kernel thread.
    work must release the GIL (BLAS, nogil Numba) for the ranges to run in parallel."""
    n = numba.get_num_threads()
    if n == 1 or n_rows < 2 * min_rows:
        work(0, n_rows)
        return
    step = -(-n_rows // n)
    list(_pool(n).map(lambda i: work(i * step, min(n_rows, (i + 1) * step)), range(n)))
