"""Shared fixtures. Program builders live in tests/programs.py (a plain module the tests import)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

import programs  # noqa: E402


@pytest.fixture
def float64() -> Iterator[None]:
    """Make float64 the default dtype for the test; restore the previous default afterwards."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Run the test on one intra-op thread (see `programs.single_threaded`)."""
    with programs.single_threaded():
        yield


@pytest.fixture
def ridge(float64: None) -> programs.Ridge:
    """The ridge HPO program (tests/programs.py) in float64, at a random point."""
    return programs.ridge()
