"""The hypergradient rule: a pure function of a program's graph, the estimator of each edge, the
levels' losses, the point at which they are evaluated, the batches they are evaluated on and the
levels' state an estimator reads (the last step's gradient). This module is its only home:
`hypergradient` (exported as ``mlo.hypergradient``) takes all of that as arguments, and the
`Engine` calls the same `Rule` with its own batches and state, keeping the scheduling, data,
checks and state.

The rule, at any depth
----------------------
Each level ``v`` has parameters ``theta_v`` and a loss ``L_v`` that may read any level's
parameters. The best response ``theta_m*`` of a level ``m`` minimizes its *reduced objective*

    R_m(theta_m) = L_m(theta_m, theta_D*(theta_m)),    D = every level below m (its descendants),

with the levels below ``m`` at their own best responses, as functions of their uppers in the
graph, and every other level held where it is. (A level's best response depends on its uppers in
the graph: two uppers of one lower are not differentiated through each other; declare an edge
wherever a level's best response should follow another level.) The hypergradient of a level
``u`` is the total derivative ``dR_u / dtheta_u``. By the chain rule over the DAG, with
``a_v = dL_u/dtheta_v`` the partial derivatives at the evaluation point:

    adjoint(v)      = a_v + sum over lowers l of v:  vjp_{v,l}(adjoint(l))      bottom-up, v below u
    hypergradient   = a_u + sum over lowers l of u:  vjp_{u,l}(adjoint(l))

so contributions are summed over every path of the graph. ``vjp_{v,l}(a)`` is
``(d theta_l* / d theta_v)^T a``, approximated by the edge's estimator. The implicit ones
(``cg``, ``neumann``) use the implicit function theorem at a stationary point of ``R_l``:

    vjp_{v,l}(a) = -(d G_l / d theta_v)^T H_l^{-1} a,     G_l = dR_l/dtheta_l,  H_l = dG_l/dtheta_l

Their option ``hessian`` says which ``H_l`` and mixed derivative they use:

- ``"total"`` (default): the exact ones. ``H_l`` is the Hessian of the reduced objective ``R_l``
  and the mixed derivative is that of ``G_l``, both including every level below ``l`` moving
  with its best response. A product ``H_l v`` differentiates ``G_l`` (``l``'s own hypergradient,
  computed once per edge evaluation with a graph) at the point and carries the part that lands on
  the levels below ``l`` back through their best responses: ``H_l v = d<G_l, v>/dtheta_l + J^T
  d<G_l, v>/dtheta_D``, ``J = dtheta_D*/dtheta_l``. The linear solves inside ``G_l`` are
  differentiated as solutions (``d(A^{-1} b) = A^{-1}(db - dA A^{-1} b)``, the inverse applied by the
  edge's own solver), so for a non-quadratic lower the product includes the third derivatives of
  its loss: it is the derivative of the exact ``G_l``, not of a truncated iteration.
  The mixed derivative takes the same extra term for the levels below ``l`` that depend on
  ``theta_v`` through other edges.
- ``"partial"``: ``H_l`` and the mixed derivative of ``L_l`` alone, the levels below ``l`` held
  fixed (Betty's per-hop rule; cheaper, and wrong by any amount when ``L_l`` reads the levels
  below it).

Both are the same on an edge whose lower has no lowers. Cost of ``"total"`` on an edge whose
lower ``l`` has lowers: forming ``G_l`` costs one solve per edge below ``l``, and every outer
product ``H_l v`` costs two more per edge below (one to differentiate the solve inside ``G_l``,
one to carry the result back through the best response); solves below nest the same way, so
the work multiplies by about twice the inner iteration count per level of depth.

Look-aheads. Estimators with a look-ahead (``finite_difference``, ``unroll``) move their lower
to a look-ahead point at which the upper's loss is evaluated; ``unroll``'s look-ahead is
differentiable in the upper (``attached``), so autograd carries the direct path through it and
its ``vjp`` receives only what arrives from deeper levels. Each look-ahead step of a level with
lowers follows that level's own hypergradient through them (the rule, recursively), the levels
below it staying where they are unless their own edge looks ahead too. So nested ``unroll``
approaches the exact hypergradient as K grows, while ``unroll`` above an implicit edge does not:
its look-ahead differentiates the middle level's hypergradient with the levels below held fixed.

"Exact" is the implicit function theorem's promise: it holds where every level below the one
differentiated is at its best response (a stationary point of its reduced objective) and the
solves converge; elsewhere the implicit estimators approximate, as at depth 2.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor

from . import autodiff, distributed
from . import precision as precisions
from .autodiff import Tensors
from .errors import EstimatorError, ProgramError
from .estimators import Estimator, resolve
from .estimators.base import Curvature, Hop, Info, non_finite_result, read_info
from .functional import Point, Program, frozen_buffers
from .graph import Edge, Graph
from .precision import full_precision
from .problem import Problem, batches_in_use
from .tasks import TaskBatch

__all__ = ["Loss", "Edge", "Result", "Rule", "hypergradient", "level_losses", "resolve_edges", "SYNCS"]

#: A level's loss on a batch at a point: the levels named in the point at the given values and
#: every other level at its own parameters.
Loss = Callable[[Any, Point], Tensor]
EstimatorSpec = str | Estimator
PrecisionSpec = str | precisions.Precision
#: how derivatives are averaged across ranks under a process group (``None``: not at all)
SYNCS = ("exact", "once")


@dataclass(frozen=True)
class Result:
    """A hypergradient: one tensor per parameter of the level, the level's loss at the point
    where it was evaluated, and what each edge's estimator reported (the last evaluation of each)."""

    gradient: Tensors
    loss: Tensor
    infos: dict[Edge, Info] = field(default_factory=dict)


def hypergradient(
    level: str,
    problems: Sequence[Problem],
    graph: Mapping[str, Sequence[str]] | None = None,
    estimator: EstimatorSpec | Mapping[Edge, EstimatorSpec] = "cg",
    *,
    batches: Mapping[str, Any],
    point: Mapping[str, Sequence[Tensor]] | None = None,
    last_gradients: Mapping[str, Sequence[Tensor]] | None = None,
    precision: PrecisionSpec | Mapping[str, PrecisionSpec] = "fp32",
    scalers: Mapping[str, torch.amp.GradScaler] | None = None,
    sync: str | None = "exact",
) -> Result:
    """The hypergradient of ``level`` in the program ``problems`` wired by ``graph``, with
    ``estimator`` on every edge (or ``{edge: estimator}``), as a pure function of its arguments:
    the rule stated in this module's docstring. ``mlo.Engine`` computes its steps by the same
    call, so with the engine's batches (``Engine.batch``) and state the two agree bit for bit.

    Args:
        batches: ``{level: batch}`` for ``level`` and every level below it (a level whose
            ``data`` is ``None`` may be left out: its batch is ``None``). A loss reading another
            level's ``Problem.batch`` sees the batch given here.
        point: ``{level: values}``, one tensor per trainable parameter, for the levels to be
            evaluated elsewhere than at their modules' parameters; the others are where they are.
        last_gradients: ``{level: gradient of its last step}`` for the levels whose estimator
            reads it (``sama`` under Adam); a level left out counts as zero.
        precision: ``"fp32"``, ``"bf16"``, ``"fp16"``, or ``{level: precision}``, as for the Engine.
        scalers: the gradient scaler of each fp16 level (its current scale); a fresh one if absent.
        sync: ``"exact"`` (every derivative averaged across ranks under a process group),
            ``"once"`` (only the result) or ``None`` (no averaging), as ``Engine(sync=...)``.

    Returns a `Result`: ``gradient`` (one tensor per trainable parameter of ``level``), ``loss``
    (the level's loss where it was evaluated) and ``infos`` (the estimators' reports per edge).
    Module parameters, buffers and optimizer states are left as they were."""
    problems = list(problems)
    if sync is not None and sync not in SYNCS:
        raise ProgramError(f"sync must be one of {SYNCS} or None, got {sync!r}")
    built = Graph.build([p.name for p in problems], graph or {})
    built.require(level)
    program = Program(problems)
    chosen = resolve_edges(built, estimator, program.problems)
    levels = precisions.per_level(precision, list(program.problems))
    given = dict(scalers or {})
    scaling = {
        name: scaler
        for name, prec in levels.items()
        if (scaler := given.get(name) or prec.scaler(program.params[name][0].device)) is not None
    }
    rule = Rule(program, built, chosen, level_losses(program, levels, scaling))
    used: dict[str, Any] = {}
    for name in (level, *built.descendants(level)):
        if name in batches:
            used[name] = batches[name]
        elif program.problems[name].data is None:
            used[name] = None
        else:
            raise ProgramError(f"mlo.hypergradient: no batch for level {name!r}; pass batches={{{name!r}: batch, ...}}")
    at: dict[str, Tensors] = dict(program.params)
    for name, values in (point or {}).items():
        built.require(name)
        at[name] = tuple(values)
    last = {name: tuple(g) for name, g in (last_gradients or {}).items()}
    result = rule.evaluate(level, at, {**batches, **used}, last, sync)
    read: dict[Edge, Info] = {edge: dict(read_info(info)) for edge, info in result.infos.items()}
    return replace(result, infos=read)


def resolve_edges(
    graph: Graph, spec: EstimatorSpec | Mapping[Edge, EstimatorSpec], problems: Mapping[str, Problem]
) -> dict[Edge, Estimator]:
    """The estimator of every edge of ``graph`` from one spec for all or ``{edge: spec}`` covering
    every edge; each checked against the lower level it serves."""
    edges = graph.edges
    if isinstance(spec, Mapping):
        unknown = [e for e in spec if e not in edges]
        if unknown:
            raise EstimatorError(f"estimator mapping names edge(s) {unknown} not in the graph; edges: {list(edges)}")
        missing = [e for e in edges if e not in spec]
        if missing:
            raise EstimatorError(f"estimator mapping has no estimator for edge(s) {missing}")
        chosen = {e: resolve(spec[e]) for e in edges}
    else:
        one = resolve(spec)
        chosen = {e: one for e in edges}
    for (_, lower), est in chosen.items():
        est.check(problems[lower])
    return chosen


def level_losses(
    program: Program, levels: Mapping[str, precisions.Precision], scalers: Mapping[str, torch.amp.GradScaler]
) -> dict[str, Loss]:
    """Each level's loss as a function of its batch and the point, in the level's precision: the
    forward pass under autocast, the loss returned in float32; for fp16, the backward passes
    scaled by the level's scaler between the loss and every level's values it reads."""
    return {name: _level_loss(program, name, prec, scalers.get(name)) for name, prec in levels.items()}


def _level_loss(program: Program, name: str, prec: precisions.Precision, scaler: torch.amp.GradScaler | None) -> Loss:
    problem_loss = program.loss
    if prec.dtype is None:

        def loss(batch: Any, point: Point) -> Tensor:  # widened only if a caller's autocast narrowed it
            return precisions.widen(problem_loss(name, batch, point))

        return loss

    device, params = program.params[name][0].device, program.params

    def low_precision_loss(batch: Any, point: Point) -> Tensor:
        with prec.autocast(device):
            if scaler is None:
                return precisions.widen(problem_loss(name, batch, point))
            return precisions.scale_backward(
                lambda at: precisions.widen(problem_loss(name, batch, at)), {**params, **point}, scaler
            )

    return low_precision_loss


class Rule:
    """The rule bound to one program: its graph, estimators and losses. Holds no state between
    calls: the point, the batches and the last gradients are arguments. What it derives from the
    graph (which partial derivatives each level's hypergradient reads) is derived once, here."""

    def __init__(self, program: Program, graph: Graph, estimators: Mapping[Edge, Estimator], losses: Mapping[str, Loss]) -> None:
        self.program, self.graph, self.estimators, self.losses = program, graph, estimators, losses
        self.problems = program.problems
        self.plans = {name: self._plan(name) for name in graph.levels}
        #: per level: the levels its hypergradient takes derivatives in (itself and those below it)
        self.differentiated = {name: frozenset((name, *graph.descendants(name))) for name in graph.levels}

    def __call__(
        self,
        level: str,
        point: Mapping[str, Tensors],
        batches: Mapping[str, Any],
        last_gradients: Mapping[str, Tensors] | None = None,
        create_graph: bool = False,
    ) -> Result:
        """``level``'s hypergradient at ``point`` (every level's values) on ``batches``."""
        evaluation = _Evaluation(self, batches, last_gradients or {})
        # a result kept differentiable may be differentiated in anything: every level is wanted
        with batches_in_use(batches, None if create_graph else self.differentiated[level]):
            gradient, loss = evaluation.total(level, point, create_graph)
        return Result(gradient, loss, evaluation.infos)

    def evaluate(
        self,
        level: str,
        point: Mapping[str, Tensors],
        batches: Mapping[str, Any],
        last_gradients: Mapping[str, Tensors] | None = None,
        sync: str | None = "exact",
    ) -> Result:
        """As a call, with every module buffer restored afterwards (estimator evaluations never
        move BatchNorm statistics) and the derivatives averaged across ranks as ``sync`` says:
        ``"exact"`` every one, ``"once"`` only the result (the solves use each rank's own
        batch), ``None`` none. Without a process group the three are the same."""
        buffers = self.program.buffers()
        averaging = distributed.data_parallel(sync == "exact") if distributed.active() else nullcontext()
        with frozen_buffers(buffers) if buffers else nullcontext(), averaging:
            result = self(level, point, batches, last_gradients)
        if sync != "once":
            return result
        with distributed.data_parallel():
            return replace(result, gradient=distributed.average(result.gradient))

    def _plan(self, name: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """For level ``name``: the levels below it (bottom-up), and those whose partial
        derivative some edge reads. A first-order edge contributes zero whatever its adjoint, and
        an attached look-ahead from ``name`` itself is already differentiated through by autograd
        (its ``vjp`` reads only what arrives from below its lower), so the partials only such
        edges would read are never computed."""
        below = self.graph.descendants(name)

        def reads(upper: str, level: str) -> bool:
            est = self.estimators[(upper, level)]
            return est.uses_adjoint and not (upper == name and est.attached)

        needed = tuple(level for level in below if any(reads(v, level) for v in self.graph.uppers_of[level]))
        return below, needed


class _Evaluation:
    """One call of the rule: the recursion, and what the estimators reported during it."""

    def __init__(self, rule: Rule, batches: Mapping[str, Any], last_gradients: Mapping[str, Tensors]) -> None:
        self.rule = rule
        self.graph = rule.graph
        self.batches = batches
        self.last_gradients = last_gradients
        self.infos: dict[Edge, Info] = {}
        self.started = False

    def loss(self, name: str, point: Point) -> Tensor:
        """Level ``name``'s loss on its batch at ``point``."""
        return self.rule.losses[name](self.batches[name], point)

    def total(self, name: str, point: Mapping[str, Tensors], create_graph: bool) -> tuple[Tensors, Tensor]:
        """``(dR_name/dtheta_name, L_name)`` at ``point``: the level's hypergradient through every
        level below it, and its loss where it was evaluated."""
        if autodiff.computed(point.values()):
            # Inside a look-ahead or a curvature, some values were computed from others: aliases
            # keep every derivative taken below to the computations of this evaluation, as the
            # rule's partial derivatives require.
            point = {level: autodiff.alias(values) for level, values in point.items()}
        if not self.started:  # the outermost call: derived levels from the point, differentiably
            self.started = True
            point = self.rule.program.derive(point)
        lowers = self.graph.lowers_of[name]
        if not lowers:
            loss = self.loss(name, point)
            return autodiff.grad(loss, point[name], create_graph=create_graph), loss

        below, needed = self.rule.plans[name]
        evaluation = dict(point)
        lookaheads: dict[str, Tensors] = {}
        hops = {low: self.hop(name, low, point, create_graph) for low in lowers}
        for low in lowers:
            est = self.rule.estimators[(name, low)]
            ahead = est.lookahead(hops[low])
            if ahead is not None:
                lookaheads[low] = ahead
                self.infos[(name, low)] = est.lookahead_info(hops[low], ahead)
                evaluation[low] = ahead if est.attached else tuple(t.detach().requires_grad_() for t in ahead)
        if autodiff.computed(evaluation[level] for level in (name, *below)):
            # Some values were computed from others (an attached look-ahead, or the iterate of an
            # outer look-ahead): each level below gets an alias, so that its adjoint is the partial
            # derivative of this loss, not a total through a look-ahead's dependence on it.
            for level in below:
                if level not in lookaheads:
                    evaluation[level] = autodiff.alias(evaluation[level])
        loss = self.loss(name, evaluation)
        levels = (name, *needed)
        # an attached look-ahead's graph is read again only to carry adjoints from below it
        keep = create_graph or any(
            self.rule.estimators[(name, low)].attached and self.graph.lowers_of[low] for low in lookaheads
        )
        partial = self.gradients(loss, evaluation, levels, None, create_graph, keep)
        # a look-ahead's first gradient of a lower's own loss at this point, whose graph the
        # backward above kept: the same gradient a curvature of that lower here would form
        known = {low: g for low, hop in hops.items() if (g := hop.start_gradient) is not None} if keep else {}
        deeper = self.carry(below, partial, point, create_graph, known)

        total = partial[name]
        for low in lowers:
            est = self.rule.estimators[(name, low)]
            if not est.uses_adjoint:
                continue
            if est.attached:  # autograd already carried the direct path through the look-ahead
                if low not in deeper:
                    continue
                adjoint = deeper[low]
            else:
                adjoint = _adjoint(low, partial, deeper)
            total = autodiff.add(total, self.vjp(hops[low], adjoint, lookaheads.get(low)))
        return total, loss

    def carry(
        self, levels: tuple[str, ...], adjoints: Mapping[str, Tensors], point: Mapping[str, Tensors], create_graph: bool,
        known: Mapping[str, Tensors] | None = None,
    ) -> dict[str, Tensors]:
        """Bottom-up over ``levels``: what arrives at each from its lowers among them, through
        their best responses, given the partial ``adjoints``. ``known``: for some leaf levels,
        the differentiable gradient of their own loss at ``point``, already formed."""
        deeper: dict[str, Tensors] = {}
        for level in levels:
            arrived = self.pull(level, levels, adjoints, deeper, point, create_graph, known)
            if arrived is not None:
                deeper[level] = arrived
        return deeper

    def pull(
        self,
        level: str,
        among: tuple[str, ...],
        adjoints: Mapping[str, Tensors],
        deeper: Mapping[str, Tensors],
        point: Mapping[str, Tensors],
        create_graph: bool,
        known: Mapping[str, Tensors] | None = None,
    ) -> Tensors | None:
        """``sum_l vjp_{level,l}(adjoint(l))`` over the lowers ``l`` of ``level`` in ``among``."""
        arrived = None
        for low in self.graph.lowers_of[level]:
            if low not in among or not self.rule.estimators[(level, low)].uses_adjoint:
                continue
            hop = self.hop(level, low, point, create_graph)
            hop.own_gradient = (known or {}).get(low)
            part = self.vjp(hop, _adjoint(low, adjoints, deeper), None)
            arrived = part if arrived is None else autodiff.add(arrived, part)
        return arrived

    def vjp(self, hop: _Hop, adjoint: Tensors, lookahead: Tensors | None) -> Tensors:
        est = self.rule.estimators[(hop.upper, hop.lower)]
        if est.guards_non_finite or autodiff.all_finite(adjoint):
            part, info = est.vjp(hop, adjoint, lookahead)
        else:  # an overflow above (an fp16 level's scaled backward): nothing to solve, the result is
            # not finite either, so an fp16 step is skipped (and anything else raises NonFiniteError)
            part, info = non_finite_result(hop)
        edge = (hop.upper, hop.lower)
        self.infos[edge] = {**self.infos[edge], **info} if edge in self.infos and lookahead is not None else info
        return part

    def gradients(
        self,
        output: Tensor | Tensors,
        point: Mapping[str, Tensors],
        levels: tuple[str, ...],
        seed: Tensors | None,
        create_graph: bool,
        retain_graph: bool,
    ) -> dict[str, Tensors]:
        """The derivatives of ``output`` (seeded by ``seed``) in each of ``levels`` at ``point``."""
        flat = [t for level in levels for t in point[level]]
        got = autodiff.grad(output, flat, seed, create_graph=create_graph, retain_graph=retain_graph)
        out: dict[str, Tensors] = {}
        i = 0
        for level in levels:
            n = len(point[level])
            out[level] = got[i : i + n]
            i += n
        return out

    def hop(self, upper: str, lower: str, point: Mapping[str, Tensors], create_graph: bool) -> _Hop:
        return _Hop(self, upper, lower, point, create_graph)


def _adjoint(low: str, adjoints: Mapping[str, Tensors], deeper: Mapping[str, Tensors]) -> Tensors:
    """The total adjoint of ``low``: its partial plus what arrived from below it."""
    if low not in deeper:
        return adjoints[low]
    return autodiff.add(adjoints[low], deeper[low]) if low in adjoints else deeper[low]


class _Hop(Hop):
    """An edge at one point, with the operators the estimators use, computed by the rule."""

    def __init__(self, evaluation: _Evaluation, upper: str, lower: str, point: Mapping[str, Tensors], create_graph: bool) -> None:
        self.evaluation = evaluation
        self.upper, self.lower = upper, lower
        self.point = point
        self.problem = evaluation.rule.problems[lower]
        self.parameters = evaluation.rule.program.params[lower]
        self.last_gradient = evaluation.last_gradients.get(lower)
        self.create_graph = create_graph
        self.upper_params = tuple(point[upper])
        self.lower_params = tuple(point[lower])
        #: the differentiable gradient of the lower's own loss here (a leaf lower), where the
        #: rule already formed it: the partial curvature starts from it instead of a new pass
        self.own_gradient: Tensors | None = None
        #: what `direction` formed at ``lower_params`` itself, differentiably, where that is that
        #: gradient (a leaf lower, a point of parameters, not values computed from others)
        self.start_gradient: Tensors | None = None

    def lower_loss(self, overrides: Mapping[str, Tensors]) -> Tensor:
        # second derivatives and differences of this loss are taken: never in low precision
        with full_precision():
            return self.evaluation.loss(self.lower, {**self.point, **overrides})

    def curvature(self, hessian: str = "total") -> Curvature:
        if hessian == "total" and self.evaluation.graph.lowers_of[self.lower]:
            return _ReducedCurvature(self)
        if self.own_gradient is not None:
            curvature = _PartialCurvature(None, self.lower_params, self.upper_params, self.own_gradient)
        else:
            curvature = _PartialCurvature(self.lower_loss({}), self.lower_params, self.upper_params)
        if isinstance(self.problem.module, TaskBatch):  # a sum of per-task losses: one block per task
            curvature.tasks = self.problem.module.tasks
        return curvature

    def direction(self, values: Tensors, differentiable: bool) -> Tensors:
        # a step that is differentiated again (unroll) is a second derivative: full precision
        with full_precision() if differentiable else nullcontext():
            grads, _ = self.evaluation.total(self.lower, {**self.point, self.lower: values}, differentiable)
        if (differentiable and values is self.lower_params and not self.evaluation.graph.lowers_of[self.lower]
                and not autodiff.computed(self.point.values())):  # the same pass a partial curvature here makes
            self.start_gradient = grads
        return grads

    def upper_gradient(self, lower_values: Tensors) -> Tensors:
        if not self.create_graph:
            loss = self.lower_loss({self.lower: lower_values})
            return autodiff.grad(loss, self.upper_params)
        # differentiable: lower_values may depend on the upper level (through the adjoint); the
        # partial derivative is taken in an alias that only this loss uses
        upper = autodiff.alias(self.upper_params)
        loss = self.lower_loss({self.lower: lower_values, self.upper: upper})
        return autodiff.grad(loss, upper, create_graph=True)


class _PartialCurvature(Curvature):
    """The lower level's own loss, the levels below it held fixed: ``g = dL_l/dtheta_l`` kept
    differentiable, so that one forward and backward pass serves every product
    ``H v = d<g, v>/dtheta_l`` and ``(d^2 L_l / dtheta_u dtheta_l) x = d<g, x>/dtheta_u``."""

    def __init__(self, loss: Tensor | None, lower: Tensors, upper: Tensors, gradient: Tensors | None = None) -> None:
        """From ``loss``, or from ``gradient`` (that of such a loss in ``lower``, differentiable)."""
        self.lower, self.upper = lower, upper
        if gradient is None:
            assert loss is not None
            gradient = autodiff.grad(loss, lower, create_graph=True)
        self.gradient = gradient
        self.hvps = 0

    def hvp(self, v: Tensors, create_graph: bool = False) -> Tensors:
        self.hvps += 1
        return autodiff.grad(self.gradient, self.lower, v, retain_graph=True, create_graph=create_graph)

    def mixed(self, x: Tensors, create_graph: bool = False) -> Tensors:
        return autodiff.grad(self.gradient, self.upper, x, retain_graph=True, create_graph=create_graph)


class _ReducedCurvature(Curvature):
    """The lower level's reduced objective: ``G = dR_l/dtheta_l`` (its hypergradient through the
    levels below it) kept differentiable at an aliased copy of the point, so that a product with
    ``G`` differentiates it in ``theta_l`` (or ``theta_u``) and in the levels below ``l``; the
    latter part is carried back to ``theta_l`` (or ``theta_u``) through their best responses."""

    def __init__(self, hop: _Hop) -> None:
        self.evaluation = hop.evaluation
        self.lower, self.upper = hop.lower, hop.upper
        self.below = self.evaluation.graph.descendants(hop.lower)
        self.point = {level: autodiff.alias(values) for level, values in hop.point.items()}
        with full_precision():  # differentiated again: never in low precision (nor loss-scaled)
            self.gradient, _ = self.evaluation.total(hop.lower, self.point, create_graph=True)
        self.hvps = 0

    def _product(self, target: str, v: Tensors, create_graph: bool) -> Tensors:
        """``dG/dtheta_target^T v`` with the levels below ``l`` moving with their best responses."""
        levels = (target, *self.below)
        got = self.evaluation.gradients(self.gradient, self.point, levels, v, create_graph, True)
        deeper = self.evaluation.carry(self.below, got, self.point, create_graph)
        arrived = self.evaluation.pull(target, self.below, got, deeper, self.point, create_graph)
        return got[target] if arrived is None else autodiff.add(got[target], arrived)

    def hvp(self, v: Tensors, create_graph: bool = False) -> Tensors:
        self.hvps += 1
        return self._product(self.lower, v, create_graph)

    def mixed(self, x: Tensors, create_graph: bool = False) -> Tensors:
        return self._product(self.upper, x, create_graph)

