"""`Problem`: one level of a multi-level program: what it optimizes, with what, on which data, for which loss.

A Problem knows nothing about devices, processes, precision, logging or other levels' estimators;
the Engine does. Subclass it and define ``loss(self, batch) -> Tensor``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sized
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from .errors import ProgramError
from .transforms import GradientTransform

__all__ = ["Problem"]


class Problem:
    """One level: ``module``'s trainable parameters, minimized by ``optimizer`` on ``loss(batch)``.

    Args:
        name: unique name of the level in its program; the graph refers to levels by name.
        module: the ``nn.Module`` whose trainable parameters (``requires_grad=True``) this level
            optimizes. The loss may also call other levels' modules (closures over them): the
            engine sees every level's parameters whoever calls them.
        optimizer: a ``torch.optim.Optimizer`` over exactly those parameters, kept as built
            (param groups, per-group learning rates).
        data: any iterable of batches, restarted when exhausted; ``None`` for a loss that needs
            no batch (it is then called with ``batch=None``).
        steps: optimizer steps of this level per round (default 1).
        scheduler: optional learning-rate scheduler, stepped after every optimizer step.
        transform: optional ``mlo.transforms.GradientTransform`` applied to this level's
            (hyper)gradient before every optimizer step, e.g. ``clip_by_global_norm(5.0)``.

    Subclasses must define ``loss``; a subclass that does not is rejected when it is defined.
    Pass ``abstract=True`` in the class statement for an intermediate base class.
    """

    _abstract: ClassVar[bool] = True

    def __init_subclass__(cls, abstract: bool = False, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls._abstract = abstract
        if not abstract and cls.loss is Problem.loss:
            raise TypeError(
                f"Problem subclass {cls.__qualname__} does not define `loss(self, batch) -> Tensor`; "
                "every level needs a loss (or declare the class with `abstract=True`)."
            )

    def __init__(
        self,
        name: str,
        module: nn.Module,
        optimizer: torch.optim.Optimizer,
        data: Iterable[Any] | None = None,
        steps: int = 1,
        scheduler: Any | None = None,
        transform: GradientTransform | None = None,
    ) -> None:
        if type(self)._abstract:
            raise TypeError(f"{type(self).__qualname__} is abstract: subclass it and define `loss`.")
        if not isinstance(name, str) or not name:
            raise TypeError(f"Problem name must be a non-empty string, got {name!r}")
        if not isinstance(module, nn.Module):
            raise TypeError(f"level {name!r}: module must be an nn.Module, got {type(module).__name__}")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"level {name!r}: optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}"
            )
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"level {name!r}: steps must be an int >= 1, got {steps!r}")
        if data is not None and not isinstance(data, Iterable):
            raise TypeError(f"level {name!r}: data must be an iterable of batches or None, got {type(data).__name__}")
        if transform is not None and not isinstance(transform, GradientTransform):
            raise TypeError(
                f"level {name!r}: transform must be an mlo.transforms.GradientTransform "
                f"(e.g. mlo.transforms.clip_by_global_norm(5.0)), got {type(transform).__name__}"
            )
        self.name = name
        self.module = module
        self.optimizer = optimizer
        self.data = data
        self.steps = steps
        self.scheduler = scheduler
        self.transform = transform

    def loss(self, batch: Any) -> Tensor:
        """This level's objective on one batch (``None`` when the level has no data)."""
        raise NotImplementedError

    def check_data(self) -> None:
        """Reject data that can be seen to yield no batch without drawing one (an empty list, a
        DataLoader whose ``drop_last`` leaves no batch), or that is a string. Called when the
        Engine is built; an iterator cannot be checked without consuming it, so it is not."""
        if isinstance(self.data, (str, bytes)):
            raise ProgramError(f"level {self.name!r}: data must be an iterable of batches, got a {type(self.data).__name__}")
        if isinstance(self.data, Sized) and not isinstance(self.data, Iterator):
            try:
                size = len(self.data)
            except TypeError:  # e.g. a DataLoader over an IterableDataset without a length
                return
            if size == 0:
                raise ProgramError(
                    f"level {self.name!r}: its data ({type(self.data).__name__}) holds no batch; "
                    "pass at least one batch, or data=None for a loss that needs none"
                )

    def parameters(self) -> list[nn.Parameter]:
        """The parameters this level optimizes: ``module``'s trainable parameters, in order."""
        return [p for p in self.module.parameters() if p.requires_grad]

    def batches(self, on_pass: Callable[[], None] | None = None) -> Iterator[Any]:
        """An endless stream of batches: ``data`` restarted whenever it is exhausted.
        ``on_pass`` is called just before each pass over ``data`` begins."""
        if self.data is None:
            while True:
                yield None
        while True:
            if on_pass is not None:
                on_pass()
            empty = True
            for batch in self.data:
                empty = False
                yield batch
            if empty and isinstance(self.data, Iterator):
                raise ValueError(
                    f"level {self.name!r}: its data is an exhausted iterator, which cannot be restarted; "
                    "pass a re-iterable (a list, a DataLoader) or an endless iterator"
                )
            if empty:
                raise ValueError(f"level {self.name!r}: its data yielded no batch")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, steps={self.steps})"
