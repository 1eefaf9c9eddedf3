"""`Problem`: one level of a multi-level program: what it optimizes, with what, on which data, for which loss.

A Problem knows nothing about devices, processes, precision, logging or other levels' estimators;
the Engine does. Give it a loss function (``mlo.Problem(..., loss=fn)``), or subclass it and
define ``loss(self, batch) -> Tensor``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence, Sized
from contextvars import ContextVar
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from .errors import ArgumentError, ProgramError
from .transforms import GradientTransform

__all__ = ["Problem", "cycle", "batches_in_use", "derivative_wanted"]

#: A level's loss as a function of its batch (a closure over the modules it reads).
LossFn = Callable[[Any], Tensor]
#: Starting values of a level's parameters, computed from other levels' modules.
InitFn = Callable[[], Sequence[Tensor]]

#: the batches an evaluation runs on (level name -> batch), for the length of that evaluation
_IN_USE: ContextVar[Mapping[str, Any] | None] = ContextVar("mlo_batches_in_use", default=None)


#: the levels in whose parameters the running evaluation takes derivatives (None: no evaluation)
_DIFFERENTIATED: ContextVar[frozenset[str] | None] = ContextVar("mlo_differentiated", default=None)


class batches_in_use:  # noqa: N801 (used as a function: ``with batches_in_use(batches):``)
    """Inside: ``Problem.batch`` of each level named in ``batches`` is that batch. The
    hypergradient rule and the engine's plain steps enter it with the batches they were given,
    so that a loss reading another level's batch sees the one the evaluation runs on; and with
    ``differentiated``, the levels in whose parameters the evaluation takes derivatives
    (`derivative_wanted`). (A class: it is entered on every step, and costs less than a
    generator-based context manager.)"""

    def __init__(self, batches: Mapping[str, Any], differentiated: frozenset[str] | None = None) -> None:
        self.batches = batches
        self.differentiated = differentiated

    def __enter__(self) -> None:
        self.token = _IN_USE.set(self.batches)
        self.levels = _DIFFERENTIATED.set(self.differentiated)

    def __exit__(self, *exc: object) -> None:
        _DIFFERENTIATED.reset(self.levels)
        _IN_USE.reset(self.token)


def derivative_wanted(level: str) -> bool:
    """Whether the evaluation running now may take a derivative in the parameters of ``level``.

    A step of a level, `Engine.hypergradient` and `mlo.check` take derivatives only in the
    parameters of the level evaluated and of the levels below it in the graph (those its
    hypergradient flows through). For any other level this is False while they run: a loss
    that reads that level may then skip work whose only use is that level's derivative, as long
    as the loss's value stays the same (LFM-CW's ``w2`` skips W1's forward pass on its validation
    batch, which only the derivative in W1 and the architecture needs, when the step is W2's own
    or the class weights'). Outside such an evaluation: True."""
    levels = _DIFFERENTIATED.get()
    return levels is None or level in levels


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
        steps: optimizer steps of this level per round (default 1). ``steps=0``: the level takes
            no steps of its own (see below).
        scheduler: optional learning-rate scheduler, stepped after every optimizer step.
        transform: optional ``mlo.transforms.GradientTransform`` applied to this level's
            (hyper)gradient before every optimizer step, e.g. ``clip_by_global_norm(5.0)``.
        loss: the level's loss as a function of the batch, for a level made without a subclass:
            ``mlo.Problem("w", model, opt, data, loss=lambda batch: F.mse_loss(model(batch[0]), batch[1]))``.
        init: the level's starting point as a function of other levels' modules (a closure, like
            the loss), e.g. ``lambda: tuple(meta.parameters())`` for an inner problem that starts
            from the meta-parameters. A level with ``init`` is solved afresh every round: at the
            start of each round its parameters are set to ``init()``, its optimizer state is
            cleared, and it draws one batch that all its steps of the round use (a task batch).

    ``steps=0`` (with ``init``): the level is a function of the levels its ``init`` reads, not a
    free variable. The engine never steps it; it draws one batch per round. Wherever an upper
    level is evaluated, this level's value is ``init()`` at that point, so derivatives flow
    through ``init``; an estimator with a look-ahead on its edge (``unroll:steps=K``) then takes
    its K differentiable steps from there: MAML's inner loop from the initialisation the upper
    level provides. A level with ``steps=0`` needs ``init`` and an upper level that reads it.

    ``batch`` is the batch the level is on, for another level's loss to read (a meta level reads
    the query sets of the task batch its lower level drew): inside an evaluation (the engine's
    steps, ``mlo.hypergradient``) the batch that evaluation was given for this level; elsewhere
    the last batch the engine drew for it (``None`` before its first). It is a view for users:
    the hypergradient rule takes every batch as an argument and never reads it. The rest of a
    level's runtime state (data position, last gradient, transform and scaler state) is the
    engine's (``Engine.levels``).

    Subclasses must define ``loss``; a subclass that does not is rejected when it is defined.
    Pass ``abstract=True`` in the class statement for an intermediate base class.
    """

    _abstract: ClassVar[bool] = True

    def __init_subclass__(cls, abstract: bool = False, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls._abstract = abstract
        if not abstract and cls.loss is Problem.loss:
            raise ArgumentError(
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
        loss: LossFn | None = None,
        init: InitFn | None = None,
    ) -> None:
        if not isinstance(name, str) or not name:
            raise ArgumentError(f"Problem name must be a non-empty string, got {name!r}")
        if type(self) is Problem:
            if loss is None:
                raise ArgumentError(f"level {name!r}: mlo.Problem needs a loss function (loss=fn), or subclass it and define `loss`")
        elif type(self)._abstract:
            raise ArgumentError(f"{type(self).__qualname__} is abstract: subclass it and define `loss`.")
        elif loss is not None:
            raise ArgumentError(f"level {name!r}: {type(self).__qualname__} defines `loss`; do not also pass loss=")
        if loss is not None and not callable(loss):
            raise ArgumentError(f"level {name!r}: loss must be a function of the batch, got {type(loss).__name__}")
        if init is not None and not callable(init):
            raise ArgumentError(f"level {name!r}: init must be a function returning the starting values, got {type(init).__name__}")
        if not isinstance(module, nn.Module):
            raise ArgumentError(f"level {name!r}: module must be an nn.Module, got {type(module).__name__}")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise ArgumentError(
                f"level {name!r}: optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}"
            )
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ProgramError(f"level {name!r}: steps must be an int >= 0, got {steps!r}")
        if steps == 0 and init is None:
            raise ProgramError(
                f"level {name!r}: steps=0 (no steps of its own) needs init, the function of other levels "
                "it starts from (e.g. init=lambda: tuple(meta.parameters()))"
            )
        if data is not None and not isinstance(data, Iterable):
            raise ArgumentError(f"level {name!r}: data must be an iterable of batches or None, got {type(data).__name__}")
        if transform is not None and not isinstance(transform, GradientTransform):
            raise ArgumentError(
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
        self.init = init
        self._drawn: Any = None
        self._loss_fn = loss

    @property
    def batch(self) -> Any:
        """The batch this level is on (see the class docstring)."""
        in_use = _IN_USE.get()
        if in_use is not None and self.name in in_use:
            return in_use[self.name]
        return self._drawn

    @batch.setter
    def batch(self, value: Any) -> None:
        """Set by whoever draws the level's batches (the engine) when it draws one."""
        self._drawn = value

    def loss(self, batch: Any) -> Tensor:
        """This level's objective on one batch (``None`` when the level has no data)."""
        assert self._loss_fn is not None  # enforced in __init__
        return self._loss_fn(batch)

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

    def batches(self, on_pass: Callable[[], None] | None = None, first_pass: int = 0) -> Iterator[Any]:
        """An endless stream of batches: ``data`` restarted whenever it is exhausted (see
        `cycle`). ``on_pass`` is called just before each pass over ``data`` begins."""
        return cycle(self.data, f"level {self.name!r}", on_pass, first_pass)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, steps={self.steps})"


def _epoch_setters(data: Any) -> list[Callable[[int], None]]:
    """The ``set_epoch`` of the samplers a ``DataLoader`` shuffles with (a ``DistributedSampler``
    draws the same permutation every pass unless its epoch moves on)."""
    if not isinstance(data, DataLoader):
        return []
    found: dict[int, Callable[[int], None]] = {}
    for sampler in (data.sampler, getattr(data.batch_sampler, "sampler", None)):
        set_epoch = getattr(sampler, "set_epoch", None)
        if callable(set_epoch):
            found.setdefault(id(sampler), set_epoch)
    return list(found.values())


def cycle(
    data: Iterable[Any] | None,
    owner: str = "data",
    on_pass: Callable[[], None] | None = None,
    first_pass: int = 0,
) -> Iterator[Any]:
    """``data``'s items in order, endlessly: a re-iterable (list, DataLoader) is restarted when
    exhausted, an endless iterator is read on; ``None`` yields ``None`` forever. An exhausted
    iterator or an empty iterable raises ``ValueError`` naming ``owner``. ``on_pass`` is called
    just before each pass over ``data`` begins. A ``DataLoader`` whose sampler has ``set_epoch``
    (``DistributedSampler``) gets the pass number as its epoch before each pass, counted from
    ``first_pass``, so each pass is a new permutation, as torch's docs ask of a training loop."""
    if data is None:
        while True:
            yield None
    setters = _epoch_setters(data)
    epoch = first_pass
    while True:
        for set_epoch in setters:
            set_epoch(epoch)
        epoch += 1
        if on_pass is not None:
            on_pass()
        empty = True
        for item in data:
            empty = False
            yield item
        if empty and isinstance(data, Iterator):
            raise ProgramError(
                f"{owner}: its data is an exhausted iterator, which cannot be restarted; "
                "pass a re-iterable (a list, a DataLoader) or an endless iterator"
            )
        if empty:
            raise ProgramError(f"{owner}: its data yielded no batch")
