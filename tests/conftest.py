"""Shared fixtures. Registry files are fetched through the package index (cached in ~/.cache/minirt)."""
from __future__ import annotations

import os

import pytest

import minirt
from minirt.jitcache import kernel_dir
from minirt.registry import pull

# CLI runs in child processes (often with an empty MINIRT_HOME of their own) share the suite's compiled kernels
os.environ.setdefault("NUMBA_CACHE_DIR", str(kernel_dir()))


@pytest.fixture(scope="session")
def smollm2_path():
    return pull("smollm2")


@pytest.fixture(scope="session")
def smollm2(smollm2_path):
    """Exact arithmetic on the stored Q4_1/Q8_0 blocks (float32 activations): what references compare to."""
    return minirt.load(smollm2_path, exact=True)


@pytest.fixture(scope="session")
def smollm2_fast(smollm2_path):
    """The default: decode kernels round activations to int8 per block, as llama.cpp does."""
    return minirt.load(smollm2_path)


@pytest.fixture(scope="session")
def smollm2_f16(smollm2_path):
    """smollm2_fast with a float16 KV cache (kv_type="f16", --kv-type f16)."""
    return minirt.load(smollm2_path, kv_type="f16")


@pytest.fixture(scope="session")
def botchan_text():
    with open(pull("botchan"), "rb") as f:
        return f.read().decode("utf-8")  # CRLF kept, as llama.cpp reads it


@pytest.fixture(scope="session")
def gpt2_tiktoken():
    return pull("gpt2-tiktoken")
