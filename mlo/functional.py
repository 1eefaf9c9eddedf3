"""Evaluate a level's loss at parameter values other than its modules' own, without copying models.

For the length of one loss call, the modules' parameter slots (the ``_parameters`` entries that
attribute access reads) hold the given tensors instead of the parameters, then get them back,
even when the loss raises. This is the reparametrization ``torch.func.functional_call`` does,
done by the module objects themselves, so a loss that reaches any level's module through a
closure sees the substituted values too. A parameter registered under several names (tied
weights) is replaced under all of them. Nothing is deep-copied and nothing is left changed.

The slots are found once, when the `Program` is built; the swap then costs a few dictionary
writes, where ``functional_call`` re-derives them on every call (on a small network, as much as
its forward pass; docs/benchmarks.md).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from .errors import LossError, ProgramError
from .problem import Problem

T = TypeVar("T")

__all__ = ["Point", "Program", "frozen_buffers"]

#: Parameter values for some levels: level name -> one tensor per parameter of that level.
Point = Mapping[str, Sequence[Tensor]]


#: Where a parameter lives: the module whose ``_parameters`` dict holds it, and the key there.
Slot = tuple[nn.Module, str]


def _slots(modules: Sequence[nn.Module], table: str) -> dict[int, list[Slot]]:
    """Every ``(module, key)`` at which each tensor of ``table`` (``"_parameters"`` or
    ``"_buffers"``) is registered under ``modules``, by tensor id; each module read once."""
    found: dict[int, list[Slot]] = {}
    seen: set[int] = set()
    for root in modules:
        for sub in root.modules():
            if id(sub) in seen:
                continue
            seen.add(id(sub))
            for key, t in getattr(sub, table).items():
                if t is not None:
                    found.setdefault(id(t), []).append((sub, key))
    return found


class Program:
    """The levels of a program, indexed by name, and the means to evaluate them at any point."""

    def __init__(self, problems: Sequence[Problem]) -> None:
        self.problems: dict[str, Problem] = {p.name: p for p in problems}
        self.params: dict[str, tuple[nn.Parameter, ...]] = {}
        for problem in problems:
            self.params[problem.name] = tuple(p for p in problem.module.parameters() if p.requires_grad)
        modules = [p.module for p in problems]
        slots = _slots(modules, "_parameters")
        self._buffer_slots = [places[0] for places in _slots(modules, "_buffers").values()]
        self._slots: dict[str, tuple[tuple[Slot, ...], ...]] = {
            name: tuple(tuple(slots[id(p)]) for p in params) for name, params in self.params.items()
        }
        self._derived = tuple(p.name for p in problems if p.steps == 0)

    def loss(self, name: str, batch: Any, point: Point | None = None) -> Tensor:
        """Level ``name``'s loss on ``batch`` with the levels in ``point`` set to the given values."""
        problem = self.problems[name]
        swaps = self._swaps(point)
        if not swaps:  # every level at its own parameters: the loss, called directly
            return _checked(name, problem.loss(batch))
        return _checked(name, self._swapped(lambda: problem.loss(batch), swaps))

    def _swaps(self, point: Point | None) -> list[tuple[Slot, Tensor]]:
        """The parameter slots ``point`` sets to other values, with those values."""
        swaps: list[tuple[Slot, Tensor]] = []
        if point:
            for level, values in point.items():
                own = self.params[level]
                if values is own:
                    continue
                for slots, value, p in zip(self._slots[level], values, own):
                    if value is not p:
                        swaps.extend((slot, value) for slot in slots)
        return swaps

    def evaluate(self, fn: Callable[[], T], point: Point | None = None) -> T:
        """``fn()`` (a closure over the levels' modules) with the levels in ``point`` set to the
        given values."""
        swaps = self._swaps(point)
        return self._swapped(fn, swaps) if swaps else fn()

    @staticmethod
    def _swapped(fn: Callable[[], T], swaps: list[tuple[Slot, Tensor]]) -> T:
        """``fn()`` with each slot of ``swaps`` holding its value, every slot put back after."""
        saved = [module._parameters[key] for (module, key), _ in swaps]
        try:
            for (module, key), value in swaps:
                module._parameters[key] = value  # type: ignore[assignment]
            return fn()
        finally:
            for ((module, key), _), old in zip(swaps, saved):
                module._parameters[key] = old

    def derive(self, point: Mapping[str, tuple[Tensor, ...]]) -> Mapping[str, tuple[Tensor, ...]]:
        """``point`` with each level that takes no steps of its own (``steps=0``) at ``init()``
        evaluated at ``point``: such a level is a function of the levels its ``init`` reads.
        A level that ``point`` already gives other values than its parameters keeps them (the
        iterate of a look-ahead)."""
        if not self._derived:
            return point
        out = dict(point)
        for name in self._derived:
            if out[name] is self.params[name]:
                out[name] = self.start(name, out)
        return out

    def start(self, name: str, point: Point | None = None) -> tuple[Tensor, ...]:
        """Level ``name``'s ``init()`` at ``point``, checked against its parameters' shapes."""
        init = self.problems[name].init
        assert init is not None
        values = tuple(self.evaluate(init, point))
        own = self.params[name]
        if len(values) != len(own) or any(v.shape != p.shape for v, p in zip(values, own)):
            raise ProgramError(
                f"level {name!r}: init() returned shapes {[tuple(v.shape) for v in values]}, but the level's "
                f"parameters have shapes {[tuple(p.shape) for p in own]}"
            )
        return values

    def buffers(self) -> list[Tensor]:
        """Every buffer of every level's module (BatchNorm statistics and the like), once each.

        The buffers' places are found when the program is built; the tensors are read from
        those places on every call, so a module that assigns a new tensor to a buffer is seen."""
        return [b for module, key in self._buffer_slots if (b := module._buffers.get(key)) is not None]


def _checked(name: str, loss: Any) -> Tensor:
    """``loss`` if it is a one-element floating-point tensor; else `LossError` naming the level."""
    if isinstance(loss, Tensor) and loss.numel() == 1 and loss.is_floating_point():
        return loss
    if loss is None:
        got = "None (does `loss` end with `return`?)"
    elif isinstance(loss, (int, float)):
        got = f"a Python {type(loss).__name__} ({loss!r}), which carries no gradient: compute it with torch operations"
    elif isinstance(loss, Tensor) and loss.numel() != 1:
        got = f"a tensor of shape {tuple(loss.shape)}: reduce it to a scalar (e.g. `.mean()`)"
    elif isinstance(loss, Tensor):
        got = f"a tensor of dtype {loss.dtype}: a loss must be real and floating-point"
    else:
        got = f"{type(loss).__name__}: {loss!r:.80}"
    raise LossError(f"level {name!r}: loss must return a scalar floating-point tensor, got {got}")


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
