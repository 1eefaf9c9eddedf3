"""Per-level precision: the forward pass of a level's loss under autocast, chosen on the Engine
(``Engine(..., precision={"w": "bf16"})``), never in Problem code.

- ``"fp32"`` (default): the loss runs as written.
- ``"bf16"``: the loss runs under ``torch.autocast(dtype=torch.bfloat16)`` on the device of the
  level's parameters (CPU or GPU).
- ``"fp16"``: ``torch.autocast(dtype=torch.float16)`` with loss scaling by the level's
  ``torch.amp.GradScaler`` (meant for GPUs; torch's CPU scaler works the same): every backward
  pass through the level's loss, a plain gradient or the vector-Jacobian products of an upper
  level's hypergradient, runs multiplied by the scaler's scale between the loss and the
  parameter values it read (`scale_backward`), so the fp16 part of it neither underflows nor
  loses digits, and comes out unscaled in the parameters' dtype. So the estimators' solves start
  from unscaled float32 adjoints. A step whose gradient (or hypergradient) is not finite is
  skipped and the scale lowered, as ``GradScaler.step``/``update`` do.

Whatever the forward precision, the loss is returned in float32 and every derivative of it is
taken with respect to the parameters in their own dtype, so gradients, Hessian-vector products,
the estimators' inner products and solver state (CG's iterate and residual, Neumann's sum) are
float32 or better. Only the products inside the forward and backward passes run in the low
precision. Derivatives are formed with autocast off (`mlo.autodiff.grad`), so a caller's own
``torch.autocast`` reaches the forward passes only.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ContextManager

import torch
from torch import Tensor

from .errors import ProgramError

if TYPE_CHECKING:
    from .functional import Point

__all__ = ["Precision", "parse", "per_level", "widen", "full_precision", "autocast_on", "no_autocast", "scale_backward", "DTYPES"]

_FULL: ContextVar[bool] = ContextVar("mlo_full_precision", default=False)

DTYPES: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Precision:
    """A level's forward precision: ``dtype`` None (as written), bfloat16 or float16."""

    name: str = "fp32"

    @property
    def dtype(self) -> torch.dtype | None:
        return DTYPES[self.name]

    @property
    def scaled(self) -> bool:
        """Whether the level's backward passes are scaled by a gradient scaler (fp16)."""
        return self.name == "fp16"

    def autocast(self, device: torch.device) -> ContextManager[None]:
        """Autocast to this precision on ``device``; nothing inside `full_precision`."""
        if self.dtype is None or _FULL.get():
            return nullcontext()
        return torch.autocast(device.type, dtype=self.dtype)

    def scaler(self, device: torch.device) -> torch.amp.GradScaler | None:
        return torch.amp.GradScaler(device.type) if self.scaled else None


def parse(spec: str | Precision, level: str) -> Precision:
    """``"fp32"``, ``"bf16"`` or ``"fp16"`` (or a `Precision`) for ``level``; anything else is an
    error naming the level."""
    if isinstance(spec, Precision):
        return spec
    if not isinstance(spec, str) or spec not in DTYPES:
        raise ProgramError(f"level {level!r}: precision must be one of {', '.join(DTYPES)}, got {spec!r}")
    return Precision(spec)


def per_level(spec: str | Precision | Mapping[str, str | Precision], levels: list[str]) -> dict[str, Precision]:
    """One `Precision` per level from one spec for all or a mapping ``{level: spec}`` (levels not
    named stay fp32)."""
    if isinstance(spec, Mapping):
        unknown = [name for name in spec if name not in levels]
        if unknown:
            raise ProgramError(f"precision names unknown level(s) {unknown}; levels: {levels}")
        return {name: parse(spec.get(name, "fp32"), name) for name in levels}
    return {name: parse(spec, name) for name in levels}


def widen(loss: Tensor) -> Tensor:
    """``loss`` in float32 when autocast made it narrower."""
    return loss.float() if loss.dtype in (torch.float16, torch.bfloat16) else loss


class full_precision:  # noqa: N801 (used as a function: ``with full_precision():``)
    """Inside: every level's loss runs in the parameters' own dtype, whatever its precision and
    whatever autocast a caller entered. The hypergradient rule evaluates here the lower losses
    whose second derivatives or differences the estimators take (Hessian-vector and mixed
    products, finite differences): bf16 there costs whole digits (finite differences of bf16
    gradients were 290 % off on the reweighting MLP). (A class: the rule enters it several
    times a round, and it costs less than a generator-based context manager.)"""

    def __enter__(self) -> None:
        self.token = _FULL.set(True)
        self.off = no_autocast()
        self.off.__enter__()

    def __exit__(self, *exc: Any) -> None:
        try:
            self.off.__exit__(*exc)
        finally:
            _FULL.reset(self.token)


#: torch's test of every device's autocast state in one call (``torch._C._is_any_autocast_enabled``,
#: private). Measured reason: `mlo.autodiff.grad` asks before every derivative; in place, in the
#: middle of a round, the two public calls cost ~20 us per round of a small program (about 1 % of
#: it), this one a quarter of that. Public fallback where it is missing: `_autocast_on_public`.
_ANY_AUTOCAST: Callable[[], bool] | None = getattr(torch._C, "_is_any_autocast_enabled", None)


def autocast_on() -> bool:
    """Whether a caller entered autocast, on the CPU or on a GPU (or, where torch can say so
    in one call, on any device)."""
    if _ANY_AUTOCAST is not None:
        return bool(_ANY_AUTOCAST())
    return _autocast_on_public()


def _autocast_on_public() -> bool:
    """`autocast_on` by torch's public functions: the CPU's and CUDA's autocast."""
    return torch.is_autocast_enabled("cpu") or torch.is_autocast_enabled("cuda")


def no_autocast() -> ContextManager[None]:
    """Autocast off on the CPU and on GPUs (`mlo.autodiff.grad` forms every derivative so);
    nothing to enter when no caller turned it on (entering two disabled autocasts costs ~10 us,
    on every derivative)."""
    if not autocast_on():
        return nullcontext()
    return _autocast_off()


@contextmanager
def _autocast_off() -> Iterator[None]:
    with torch.autocast("cpu", enabled=False), torch.autocast("cuda", enabled=False):
        yield


def scale_backward(loss: Callable[[Point], Tensor], point: Point, scaler: torch.amp.GradScaler) -> Tensor:
    """``loss(point)``, whose backward passes run multiplied by ``scaler``'s current scale ``S``
    between its output and the values of ``point`` it read: its first derivatives are the
    unscaled ones, while inside the loss's own backward the gradients are ``S`` times larger
    (loss scaling). An overflow there comes out as inf or NaN. For first derivatives only: a
    second derivative through it would pass the unscaling twice (it is ``1/S`` times the true
    one), so the hypergradient rule evaluates every loss it differentiates twice inside
    `full_precision`, where nothing is scaled (no fp16 runs there)."""
    if _FULL.get():
        return loss(point)
    live = [t for values in point.values() for t in values if t.requires_grad]
    if not live:
        return loss(point)
    scale = scaler.scale(torch.ones((), device=live[0].device))  # a tensor: no host read
    unscaled = iter(_GradTimes.apply(scale.reciprocal(), *live))
    inner = {level: tuple(next(unscaled) if t.requires_grad else t for t in values) for level, values in point.items()}
    (out,) = _GradTimes.apply(scale, loss(inner))
    return out


class _GradTimes(torch.autograd.Function):
    """The tensors unchanged; their gradients multiplied by ``factor`` (differentiably, so a
    derivative taken with ``create_graph`` keeps the factor in its own graph)."""

    @staticmethod
    def forward(ctx: Any, factor: Tensor, *tensors: Tensor) -> tuple[Tensor, ...]:
        ctx.save_for_backward(factor)
        return tuple(t.view_as(t) for t in tensors)

    @staticmethod
    def backward(ctx: Any, *grads: Tensor | None) -> tuple[Tensor | None, ...]:
        (factor,) = ctx.saved_tensors
        return (None, *(None if g is None else g * factor for g in grads))
