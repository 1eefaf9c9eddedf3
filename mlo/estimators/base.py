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

The engine builds a ``Hop`` per edge and per evaluation; estimators only use the Hop.
"""

from __future__ import annotations

import dataclasses
import typing
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from .. import autodiff
from ..autodiff import Tensors
from ..errors import EstimatorError
from ..problem import Problem

__all__ = ["Estimator", "Hop", "Linearization", "Info", "option_types"]

#: Diagnostics an estimator reports for one evaluation (residuals, Hessian-vector products, ...).
Info = dict[str, float]


class Linearization:
    """The lower level's gradient ``g = dL_l/dtheta_l`` at one point, kept differentiable.

    One forward and backward pass serves every Hessian-vector product ``H v = d(g.v)/dtheta_l``
    and every mixed product ``(d^2 L_l / dtheta_u dtheta_l) x = d(g.x)/dtheta_u`` taken from it.
    """

    def __init__(self, loss: Tensor, lower: Tensors, upper: Tensors, create_graph: bool) -> None:
        self.lower, self.upper, self.create_graph = lower, upper, create_graph
        self.gradient = autodiff.grad(loss, lower, create_graph=True)
        self.hvps = 0

    def hvp(self, v: Tensors) -> Tensors:
        """``H v`` with ``H`` the Hessian of the lower loss in the lower parameters."""
        self.hvps += 1
        return autodiff.grad(self.gradient, self.lower, v, retain_graph=True, create_graph=self.create_graph)

    def mixed(self, x: Tensors) -> Tensors:
        """``(d^2 L_l / dtheta_u dtheta_l) x``: one tensor per upper parameter."""
        return autodiff.grad(self.gradient, self.upper, x, retain_graph=True, create_graph=self.create_graph)


@dataclass
class Hop:
    """One edge of the graph at one point, as an estimator sees it."""

    upper: str
    lower: str
    point: Mapping[str, Tensors]
    #: the lower level's loss (on its current batch) at ``point`` with some levels replaced
    lower_loss: Callable[[Mapping[str, Tensors]], Tensor]
    #: the gradient the lower level's real step would use, at the given lower parameters
    direction: Callable[[Tensors, bool], Tensors]
    problem: Problem
    create_graph: bool

    @property
    def upper_params(self) -> Tensors:
        return tuple(self.point[self.upper])

    @property
    def lower_params(self) -> Tensors:
        return tuple(self.point[self.lower])

    def learning_rates(self) -> tuple[float, ...]:
        """The lower optimizer's learning rate for each lower parameter (param groups respected)."""
        by_id = {}
        for group in self.problem.optimizer.param_groups:
            for p in group["params"]:
                by_id[id(p)] = float(group["lr"])
        return tuple(by_id[id(p)] for p in self.problem.parameters())

    def linearize(self) -> Linearization:
        return Linearization(self.lower_loss({}), self.lower_params, self.upper_params, self.create_graph)

    def upper_gradient(self, lower_values: Tensors) -> Tensors:
        """``dL_l/dtheta_u`` (partial) with the lower parameters set to ``lower_values``."""
        if not self.create_graph:
            loss = self.lower_loss({self.lower: lower_values})
            return autodiff.grad(loss, self.upper_params)
        # differentiable: lower_values may depend on the upper level (through the adjoint); the
        # partial derivative is taken in an alias that only this loss uses
        upper = autodiff.alias(self.upper_params)
        loss = self.lower_loss({self.lower: lower_values, self.upper: upper})
        return autodiff.grad(loss, upper, create_graph=self.create_graph)

    def where(self) -> str:
        return f"edge {self.upper!r} -> {self.lower!r}"


class Estimator(ABC):
    """Base of every hypergradient estimator. Subclasses are frozen dataclasses whose fields are
    their options; ``__post_init__`` checks each option's type against its annotation, then
    ``validate`` checks ranges."""

    name: ClassVar[str]
    attached: ClassVar[bool] = False
    #: False when ``vjp`` is zero whatever the adjoint (first order): the engine then skips the
    #: edge and does not compute the partial derivatives only that edge would read
    uses_adjoint: ClassVar[bool] = True

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value, kinds = getattr(self, f.name), option_types(hints[f.name])
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

    def lookahead(self, hop: Hop) -> Tensors | None:
        """Lower parameters at which the upper objective is evaluated; ``None``: where they are."""
        return None

    @abstractmethod
    def vjp(self, hop: Hop, adjoint: Tensors, lookahead: Tensors | None) -> tuple[Tensors, Info]:
        """``(d theta_l*/d theta_u)^T adjoint``: one tensor per upper parameter, and diagnostics."""

    def options(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]


def option_types(annotation: Any) -> tuple[type, ...]:
    """The types an option's annotation allows: ``(float,)`` for ``float``, ``(float, str)`` for
    ``float | str``, in the order written."""
    return tuple(typing.get_args(annotation)) or (annotation,)


def type_name(kinds: tuple[type, ...]) -> str:
    return " or ".join(k.__name__ for k in kinds)


def zero_result(hop: Hop) -> tuple[Tensors, Info]:
    return autodiff.zeros_like(hop.upper_params), {}

