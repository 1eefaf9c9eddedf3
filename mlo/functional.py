"""Evaluate a level's loss at parameter values other than its modules' own, without copying models.

Every level's module is placed in one container so that ``torch.func.functional_call`` can
swap any level's parameters for other tensors for the length of one call: a loss that calls
other levels' modules through closures sees the substituted values too. Nothing is
deep-copied and nothing is left changed after the call.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, Callable

import torch
from torch import Tensor, nn

from .problem import Problem

__all__ = ["Point", "Program", "frozen_buffers"]

#: Parameter values for some levels: level name -> one tensor per parameter of that level.
Point = Mapping[str, Sequence[Tensor]]


class _Container(nn.Module):
    """Holds every level's module; its forward runs a function, so the swap covers closures."""

    def forward(self, fn: Callable[..., Tensor], *args: Any) -> Tensor:
        return fn(*args)


class Program:
    """The levels of a program, indexed by name, and the means to evaluate them at any point."""

    def __init__(self, problems: Sequence[Problem]) -> None:
        self.problems: dict[str, Problem] = {p.name: p for p in problems}
        self.params: dict[str, tuple[nn.Parameter, ...]] = {}
        self._keys: dict[str, tuple[str, ...]] = {}
        self._container = _Container()
        for i, problem in enumerate(problems):
            key = f"level{i}"
            self._container.add_module(key, problem.module)
            named = [(n, p) for n, p in problem.module.named_parameters() if p.requires_grad]
            self.params[problem.name] = tuple(p for _, p in named)
            self._keys[problem.name] = tuple(f"{key}.{n}" for n, _ in named)

    def loss(self, name: str, batch: Any, point: Point | None = None) -> Tensor:
        """Level ``name``'s loss on ``batch`` with the levels in ``point`` set to the given values."""
        problem = self.problems[name]
        overrides: dict[str, Tensor] = {}
        if point:
            for level, values in point.items():
                own = self.params[level]
                if values is own or all(v is p for v, p in zip(values, own)):
                    continue
                overrides.update(zip(self._keys[level], values))
        if not overrides:
            return problem.loss(batch)
        return torch.func.functional_call(
            self._container, overrides, (problem.loss, batch), tie_weights=True, strict=False
        )

    def buffers(self) -> list[Tensor]:
        """Every buffer of every level's module (BatchNorm statistics and the like)."""
        return list(self._container.buffers())


@contextmanager
def frozen_buffers(buffers: Sequence[Tensor]) -> Iterator[None]:
    """Restore ``buffers`` to their values on exit: estimator evaluations never move them."""
    saved = [b.detach().clone() for b in buffers]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, s in zip(buffers, saved):
                b.copy_(s)
