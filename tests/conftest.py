"""Shared fixtures. The builders and references they use live in tests/helpers.py."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


from .helpers import RidgeProgram, ridge as ridge_program, single_threaded


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
    """Run the test on one intra-op thread (see `tests.helpers.single_threaded`)."""
    with single_threaded():
        yield


@pytest.fixture
def ridge(float64: None) -> RidgeProgram:
    """The ridge HPO program (`tests.helpers.ridge`) in float64, at a random point."""
    return ridge_program()
