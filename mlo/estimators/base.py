"""What an estimator is: a small frozen dataclass that turns an adjoint into a hypergradient.

For one edge (upper u, lower l) of the graph, with ``theta_l*(theta_u)`` the best response of
the lower level, an estimator approximates the vector-Jacobian product

    vjp(a) = (d theta_l* / d theta_u)^T a

for an adjoint ``a`` (the derivative of the upper objective with respect to ``theta_l``).
It may first move the lower level to a *look-ahead* point at which the upper objective is
evaluated (one SGD step for finite differences, K differentiable optimizer steps for unroll).
An estimator whose look-ahead is differentiable in ``theta_u`` sets ``attached = True``: autograd
then carries the upper objective's direct path through it, and ``vjp`` only receives the part of
the adjoint that arrives from deeper levels.

The hypergradient rule (`mlo.hypergradient`) hands the estimator a ``Hop`` per edge and per
evaluation: the values there and explicit operators (``curvature``: Hessian-vector and mixed
products; ``direction``: the lower level's total gradient; ``upper_gradient``). Estimators use
nothing else.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch
from torch import Tensor

from .. import autodiff
from ..autodiff import Tensors
from ..errors import EstimatorError
from ..problem import Problem

__all__ = ["Estimator", "Hop", "Curvature", "Info", "Norm", "option_types", "choices_of", "non_finite_result", "adjoint_not_finite",
           "read_info"]

@dataclasses.dataclass(frozen=True)
class Norm:
    """A Euclidean norm over several tensors, left unread: the norm of the values of ``parts``,
    the 0-d norms of the tensors (one fused ``torch._foreach_norm``)."""

    parts: tuple[Tensor, ...]


#: Diagnostics an estimator reports for one evaluation (residuals, Hessian-vector products, ...).
#: A value may be left as a 0-d tensor or a `Norm`: it is read as a float only when the
#: diagnostics are read (`read_info`; ``Engine.diagnostics``), so that reporting it costs no host
#: read, and no combining operation, on every step.
Info = dict[str, float | Tensor | Norm]


class Curvature(ABC):
    """The lower level's objective around one point, as explicit operators: its Hessian ``H``
    (symmetric) and its mixed second derivative with the upper level. Which objective (the lower
    loss alone, or the reduced one through the levels below it) is the ``hessian`` the estimator
    asked for (see `mlo.hypergradient`). ``create_graph``: keep the result differentiable."""

    #: products ``H v`` taken so far (with a reduced Hessian each costs inner solves, not counted)
    hvps: int
    #: ``T`` when ``H`` is block-diagonal over the leading dimension of every lower parameter:
    #: ``T`` independent systems, one per task (a `mlo.tasks.TaskBatch` level's own loss), that a
    #: solver may treat separately; ``None`` for one system
    tasks: int | None = None

    @abstractmethod
    def hvp(self, v: Tensors, create_graph: bool = False) -> Tensors:
        """``H v``, one tensor per lower parameter."""

    @abstractmethod
    def mixed(self, x: Tensors, create_graph: bool = False) -> Tensors:
        """``(d^2 / dtheta_u dtheta_l) x``: one tensor per upper parameter."""


class Hop(ABC):
    """One edge (upper -> lower) of the graph at one point, as an estimator sees it: the values
    there and explicit operators on the lower level, computed by `mlo.hypergradient`."""

    upper: str
    lower: str
    upper_params: Tensors
    lower_params: Tensors
    #: the lower level (its optimizer: learning rates, update rule)
    problem: Problem
    #: the lower level's parameters themselves (``problem.parameters()``, found once when the
    #: program was built): the keys of its optimizer's param groups and state
    parameters: Tensors
    #: the gradient of the lower level's last optimizer step, where ``reads_last_gradient`` asked
    #: for it (the engine's `mlo.state.LevelState`); ``None`` otherwise or before its first step
    last_gradient: Tensors | None
    #: whether the estimator's result must stay differentiable (inside a look-ahead or a curvature)
    create_graph: bool

    @abstractmethod
    def curvature(self, hessian: str = "total") -> Curvature:
        """The lower level's curvature here: ``"total"`` (its reduced objective, the levels
        below it at their best responses) or ``"partial"`` (its own loss, those levels fixed)."""

    @abstractmethod
    def direction(self, values: Tensors, differentiable: bool) -> Tensors:
        """The gradient the lower level's real step would use (its hypergradient through the
        levels below it) with its parameters at ``values``."""

    @abstractmethod
    def upper_gradient(self, lower_values: Tensors) -> Tensors:
        """``dL_l/dtheta_u`` (partial) with the lower parameters at ``lower_values``."""

    def learning_rates(self) -> tuple[float, ...]:
        """The lower optimizer's learning rate for each lower parameter (param groups respected)."""
        by_id = {}
        for group in self.problem.optimizer.param_groups:
            for p in group["params"]:
                by_id[id(p)] = float(group["lr"])
        return tuple(by_id[id(p)] for p in self.parameters)

    def where(self) -> str:
        return f"edge {self.upper!r} -> {self.lower!r}"


def choices_of(kind: Any) -> tuple[str, ...]:
    """The values an option annotated ``Literal["a", "b"]`` accepts; ``()`` for other types."""
    return typing.get_args(kind) if typing.get_origin(kind) is typing.Literal else ()


class Estimator(ABC):
    """Base of every hypergradient estimator. Subclasses are frozen dataclasses whose fields are
    their options; ``__post_init__`` checks each option's type against its annotation, then
    ``validate`` checks ranges."""

    name: ClassVar[str]
    attached: ClassVar[bool] = False
    #: False when ``vjp`` is zero whatever the adjoint (first order): the engine then skips the
    #: edge and does not compute the partial derivatives only that edge would read
    uses_adjoint: ClassVar[bool] = True
    #: True when ``vjp`` itself answers an adjoint with a non-finite element (an fp16 level's
    #: overflow, a NaN loss) by a non-finite result, without raising or warning
    #: (`non_finite_result`); otherwise the rule tests every adjoint before calling ``vjp``
    guards_non_finite: ClassVar[bool] = False
    #: True when the estimator differentiates a backward pass again (a Hessian- or mixed-vector
    #: product, a look-ahead kept differentiable); False when first-order gradients are all it
    #: takes of the losses, so the levels it serves may run code that takes no double backward
    #: (a ``torch.compile``-d module, an autograd Function marked ``once_differentiable``)
    double_backward: ClassVar[bool] = True

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value, expected = getattr(self, f.name), hints[f.name]
            choices = choices_of(expected)
            if choices:
                if not (isinstance(value, str) and value in choices):
                    raise EstimatorError(
                        f"estimator {self.name!r}: option {f.name!r} must be one of "
                        f"{', '.join(map(repr, choices))}, got {value!r}"
                    )
                continue
            kinds = option_types(expected)
            ok = isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)
            if float in kinds and isinstance(value, int) and not isinstance(value, bool):
                object.__setattr__(self, f.name, float(value))
                ok = True
            if not ok:
                raise EstimatorError(
                    f"estimator {self.name!r}: option {f.name!r} must be {type_name(kinds)}, got {value!r}"
                )
        self.validate()

    def validate(self) -> None:
        """Check option ranges; raise ``EstimatorError`` naming the option."""

    def _require(self, condition: bool, option: str, rule: str) -> None:
        if not condition:
            raise EstimatorError(
                f"estimator {self.name!r}: option {option!r} must be {rule}, got {getattr(self, option)!r}"
            )

    def check(self, lower: Problem) -> None:
        """Called when the engine is built, once per edge served: reject a lower level this
        estimator cannot handle (for example an optimizer it cannot differentiate)."""

    def reads_last_gradient(self, lower: Problem) -> bool:
        """Whether ``vjp`` reads the gradient of ``lower``'s last optimizer step
        (``Hop.last_gradient``); the engine keeps it only for such levels."""
        return False

    def lookahead(self, hop: Hop) -> Tensors | None:
        """Lower parameters at which the upper objective is evaluated; ``None``: where they are."""
        return None

    def lookahead_info(self, hop: Hop, lookahead: Tensors) -> Info:
        """Diagnostics of a look-ahead: its steps and ``step_norm``, how far it moved the lower
        level (recorded even where ``vjp`` is not called, as for ``unroll`` on a plain edge)."""
        with torch.no_grad():  # one norm per tensor: read and combined only when the diagnostics are
            step = autodiff.sub(lookahead, hop.lower_params)
            return {"step_norm": Norm(tuple(torch._foreach_norm(list(step))))}

    @abstractmethod
    def vjp(self, hop: Hop, adjoint: Tensors, lookahead: Tensors | None) -> tuple[Tensors, Info]:
        """``(d theta_l*/d theta_u)^T adjoint``: one tensor per upper parameter, and diagnostics."""

    def options(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]


def read_info(info: Info) -> dict[str, float]:
    """``info`` with every value a float: the tensors among them read in one host read."""
    lazy = [value for value in info.values() if isinstance(value, (Tensor, Norm))]
    values = iter(autodiff.read(*(t for v in lazy for t in ((v,) if isinstance(v, Tensor) else v.parts))))
    out: dict[str, float] = {}
    for key, value in info.items():
        if isinstance(value, Tensor):
            out[key] = next(values)
        elif isinstance(value, Norm):
            out[key] = math.hypot(*(next(values) for _ in value.parts))
        else:
            out[key] = float(value)
    return out


def option_types(annotation: Any) -> tuple[type, ...]:
    """The types an option's annotation allows: ``(float,)`` for ``float``, ``(float, str)`` for
    ``float | str``, in the order written."""
    return tuple(typing.get_args(annotation)) or (annotation,)


def type_name(kinds: tuple[type, ...]) -> str:
    return " or ".join(k.__name__ for k in kinds)


def non_finite_result(hop: Hop) -> tuple[Tensors, Info]:
    """What ``vjp`` returns for an adjoint with a non-finite element: NaN for every upper
    parameter (so an fp16 step is skipped, and anything else raises the engine's
    ``NonFiniteError`` naming the level and round), and ``finite_adjoint = 0``."""
    return tuple(torch.full_like(p, math.nan) for p in hop.upper_params), {"finite_adjoint": 0.0}


def adjoint_not_finite(norm: float, adjoint: Tensors) -> bool:
    """Whether ``adjoint``, whose norm was read as ``norm``, has a non-finite element: only a
    non-finite norm is looked at further (it can also be an overflow on finite elements)."""
    return not math.isfinite(norm) and not autodiff.all_finite(adjoint)


def zero_result(hop: Hop) -> tuple[Tensors, Info]:
    return autodiff.zeros_like(hop.upper_params), {}

