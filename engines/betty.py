"""Run an mlo program on Betty's engine (betty-ml 0.2.x): the same Problems, graph and estimator.

    program = BettyProgram(problems, {"hyper": ["weights"]}, "neumann:iterations=10,alpha=0.1")
    program.run(rounds=100)                     # Betty's Engine steps the levels
    program.hypergradient("hyper")              # Betty's hypergradient at the current state

Each mlo level becomes a Betty ``ImplicitProblem`` whose ``training_step`` is the level's
``loss``; the graph becomes Betty's ``u2l``/``l2u`` dependencies; each edge's estimator becomes
the Betty method that computes the same thing. Betty runs on the levels' own modules,
optimizers, schedulers and data streams, so the program's state after a Betty run is where an
mlo run would have left it.

Estimators (Betty configures the method on the *lower* level of an edge and a switch
``first_order`` on the *upper*; ``first_order=True`` there means "do compute the implicit part"):

=================  =======================  ====================================================
mlo                Betty                    status
=================  =======================  ====================================================
first_order        upper first_order=False  same hypergradient
neumann            type="neumann"           same series ``alpha * sum_i (I - alpha H)^i a``;
                                            Betty does not detect divergence
sama               type="sama"              same approximation (``sama_adam_alpha`` = radius);
                                            Betty keeps Adam's last gradient in the
                                            optimizer's state, mlo in ``Problem.last_gradient``
cg                 type="cg"                refused: Betty 0.2.1's CG builds the next search
                                            direction from the previous residual, not the new
                                            one (wrong after the first iteration), and divides by
                                            zero once the residual vanishes. ``allow_inexact``
                                            runs it anyway, with a warning
finite_difference  type="darts"             refused: Betty's "darts" takes no look-ahead step and
                                            omits the inner learning rate (it approximates
                                            ``-(d2 L_l / du dl) a`` at the current point, i.e.
                                            Neumann with no terms and alpha = 1). With
                                            ``allow_inexact`` it runs, with a warning
unroll             IterativeProblem         refused: Betty's IterativeProblem fails on torch 2.x
                                            (it builds on ``functorch.make_functional_with_
                                            buffers`` and reads an attribute ``_fp16`` that its
                                            base class never sets)
=================  =======================  ====================================================

Where Betty's machinery would change what the program means, the adapter keeps mlo's meaning:

- Betty rebuilds each optimizer from its ``defaults`` (collapsing param groups, dropping state)
  and each scheduler by introspection; the adapter keeps the level's own objects (the rebuild
  only serves Betty's ZeRO/DDP strategies, not used here).
- Betty's ``train()`` flips every module to train mode; the adapter leaves module modes alone.
- mlo's hypergradient evaluations never move module buffers (BatchNorm statistics); Betty's
  extra forward passes would. The adapter restores every buffer after a step of a level that has
  lowers, exactly as mlo's engine does.
- Betty asks the lower level to build a double-backward graph at every step when its upper is
  first order (``create_graph`` for its iterative problems); implicit lowers never use it, so
  the adapter turns it off.

Programs Betty cannot express are refused when the adapter is built (`BettyUnsupported`): a
level with lowers and ``steps > 1``; leaves with different ``steps``; a lower whose uppers want
different Betty methods; an upper mixing first-order and other edges; Betty's implicit methods
on a lower that has lowers of its own; and an edge whose lower also reaches its upper through
other levels (Betty's multi-hop paths). A chain deeper than two levels runs, with a warning:
Betty's hypergradient of an upper ignores its loss's direct dependence on levels below its
direct lowers, which mlo's rule includes.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

import mlo
from mlo.errors import ProgramError
from mlo.functional import frozen_buffers
from mlo.graph import Edge
from mlo.estimators import CG, Estimator, FiniteDifference, FirstOrder, Neumann, Sama, Unroll

__all__ = [
    "BettyProgram",
    "BettyUnsupported",
    "BettyMismatchWarning",
    "betty_available",
    "betty_version",
    "betty_method",
    "run_on_betty",
    "betty_hypergradient",
]

EstimatorSpec = str | Estimator


class BettyUnsupported(ProgramError):
    """Betty cannot run this program, or would compute something other than mlo does."""


class BettyMismatchWarning(UserWarning):
    """Betty runs the program, but its result differs from mlo's in the way the message says."""


def betty_available() -> bool:
    """Whether betty-ml can be imported."""
    try:
        import betty  # noqa: F401
    except ImportError:
        return False
    return True


def betty_version() -> str | None:
    """betty-ml's version, or ``None`` when it is not installed."""
    try:
        import betty
    except ImportError:
        return None
    return str(getattr(betty, "__version__", "unknown"))


def _import_betty() -> Any:
    try:
        import betty.engine
        import betty.problems
    except ImportError as err:
        raise ImportError(
            "the Betty adapter needs betty-ml 0.2.x. It declares Python < 3.11 but runs on 3.11: "
            "install it with `pip install --ignore-requires-python --no-deps betty-ml==0.2.1` "
            "(or `make peers`)."
        ) from err
    return betty


# ---------------------------------------------------------------------------------------------- methods


@dataclass(frozen=True)
class BettyMethod:
    """How Betty computes one edge: ``kind`` is ``"first_order"`` or a Betty ``Config.type``."""

    kind: str
    options: tuple[tuple[str, Any], ...] = ()
    #: why Betty's result differs from mlo's estimator; empty when it is the same computation
    mismatch: str = ""


_CG_WRONG = (
    "Betty 0.2.1's CG builds each search direction from the previous residual instead of the new "
    "one (p <- r_old + beta p), so it is not conjugate gradient after the first iteration (41% "
    "relative error on a 10-dimensional ridge problem after 10 iterations), and it divides by "
    "zero once the residual vanishes"
)
_DARTS_DIFFERENT = (
    "Betty's 'darts' method takes no look-ahead step and omits the inner learning rate: it "
    "approximates -(d2 L_lower / d upper d lower) a at the current point (a Neumann series with "
    "no terms and alpha = 1), not DARTS's second-order formula that mlo's finite_difference uses"
)


def betty_method(estimator: EstimatorSpec, allow_inexact: bool = False) -> BettyMethod:
    """The Betty method for an mlo estimator, or `BettyUnsupported` saying why there is none.

    With ``allow_inexact=True`` the methods Betty computes differently (its CG, its finite
    difference) are returned with ``mismatch`` set instead of being refused.
    """
    est = mlo.estimators.resolve(estimator)
    if isinstance(est, FirstOrder):
        return BettyMethod("first_order")
    if isinstance(est, Neumann):
        if not isinstance(est.alpha, float):
            raise BettyUnsupported(f"Betty's Neumann takes a numeric alpha; {est} (alpha='auto') cannot run on Betty")
        return BettyMethod("neumann", (("neumann_iterations", est.iterations), ("neumann_alpha", est.alpha)))
    if isinstance(est, Sama):
        return BettyMethod("sama", (("sama_adam_alpha", est.radius),))
    if isinstance(est, CG):
        if est.damping:
            raise BettyUnsupported(f"Betty's CG has no damping; {est} cannot run on Betty")
        method = BettyMethod("cg", (("cg_iterations", est.iterations), ("cg_alpha", 1.0)), _CG_WRONG)
    elif isinstance(est, FiniteDifference):
        method = BettyMethod("darts", (("darts_alpha", est.radius),), _DARTS_DIFFERENT)
    elif isinstance(est, Unroll):
        raise BettyUnsupported(
            "mlo's unroll has no working Betty counterpart: Betty 0.2.1's IterativeProblem fails on "
            "torch 2.x (it builds on functorch.make_functional_with_buffers and reads an attribute "
            "`_fp16` its base class never sets). Run unroll on mlo's own engine."
        )
    else:
        raise BettyUnsupported(f"estimator {est.name!r} has no Betty counterpart")
    if not allow_inexact:
        raise BettyUnsupported(
            f"{est} would not compute the same hypergradient on Betty: {method.mismatch}. "
            "Pass allow_inexact=True to run Betty's method anyway (with a warning)."
        )
    return method


# ---------------------------------------------------------------------------------------------- levels


def _level_class() -> type:
    """A Betty ImplicitProblem that runs one mlo Problem (built on first use: betty is optional)."""
    betty = _import_betty()

    class Level(betty.problems.ImplicitProblem):  # type: ignore[misc, name-defined]
        def __init__(self, problem: mlo.Problem, betty_name: str, config: Any, buffers: list[Tensor]) -> None:
            super().__init__(
                name=betty_name,
                config=config,
                module=problem.module,
                optimizer=problem.optimizer,
                scheduler=problem.scheduler,
            )
            self.mlo_problem = problem
            self.frozen = buffers  # restored after each step (levels with lowers only)
            self.stream = problem.batches()

        def training_step(self, batch: Any) -> Tensor:
            return self.mlo_problem.loss(batch)

        def get_batch(self) -> Any:
            self.mlo_problem.batch = next(self.stream)
            return self.mlo_problem.batch

        def trainable_parameters(self) -> list[Tensor]:
            return list(self.mlo_problem.parameters())

        def parameters(self) -> list[Tensor]:
            return list(self.mlo_problem.parameters())

        def patch_optimizer(self) -> None:  # keep the level's own optimizer (param groups, state)
            pass

        def patch_scheduler(self) -> None:  # and its own scheduler, bound to that optimizer
            pass

        def train(self) -> None:  # Betty's flag only: module modes stay as the user set them
            self._training = True

        def eval(self) -> None:
            self._training = False

        def one_step_descent(self, batch: Any = None) -> Any:
            if not self.frozen:
                return super().one_step_descent(batch)
            with frozen_buffers(self.frozen):
                return super().one_step_descent(batch)

    return Level


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Betty logs to stdout at INFO level from its first use; keep it to warnings."""
    from betty.logging.logger_base import get_logger

    logger = get_logger()
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


# ---------------------------------------------------------------------------------------------- program


class BettyProgram:
    """An mlo program (problems, graph, estimator) built as Betty problems on a Betty Engine.

    The program is first checked by ``mlo.Engine`` (so bad programs fail with mlo's errors), then
    against what Betty can express (`BettyUnsupported`). Methods Betty computes differently from
    mlo are refused unless ``allow_inexact=True``, which runs them with a `BettyMismatchWarning`.
    """

    def __init__(
        self,
        problems: Sequence[mlo.Problem],
        graph: Mapping[str, Sequence[str]] | None = None,
        estimator: EstimatorSpec | Mapping[Edge, EstimatorSpec] = "neumann",
        allow_inexact: bool = False,
    ) -> None:
        betty = _import_betty()
        checked = mlo.Engine(problems, graph, estimator, check_finite=False)
        self.graph = checked.graph
        self.problems = dict(checked.program.problems)
        self.methods = {edge: betty_method(est, allow_inexact) for edge, est in checked.estimators.items()}
        self._check_shape()
        for (upper, lower), method in self.methods.items():
            if method.mismatch:
                warnings.warn(
                    f"edge {upper!r} -> {lower!r} runs Betty's {method.kind!r}, which differs from mlo: "
                    f"{method.mismatch}",
                    BettyMismatchWarning,
                    stacklevel=2,
                )

        level_cls = _level_class()
        all_buffers = checked.program.buffers()
        self.levels: dict[str, Any] = {}
        for i, name in enumerate(self.graph.levels):
            has_lowers = bool(self.graph.lowers_of[name])
            self.levels[name] = level_cls(
                self.problems[name], f"level{i}", self._config(name), all_buffers if has_lowers else []
            )
        u2l = {self.levels[u]: [self.levels[low] for low in lows] for u, lows in self.graph.lowers_of.items() if lows}
        l2u = {self.levels[low]: [self.levels[u] for u in ups] for low, ups in self.graph.uppers_of.items() if ups}
        leaves = [n for n in self.graph.levels if not self.graph.lowers_of[n]]
        self.leaf_steps = self.problems[leaves[0]].steps
        params = [p for p in self.problems[leaves[0]].parameters()]
        strategy = "gpu" if params and params[0].is_cuda else "cpu"
        config = betty.configs.EngineConfig(train_iters=0, valid_step=10**9, logger_type="none", strategy=strategy)
        with _quiet():
            self.engine = betty.engine.Engine(
                problems=list(self.levels.values()), config=config, dependencies={"u2l": u2l, "l2u": l2u}
            )
        for name, level in self.levels.items():
            # Betty asks for create_graph in a lower's step when an upper is "first order" (for its
            # iterative problems); implicit lowers never use that graph.
            level._first_order = True

    # -------------------------------------------------------------------------------- checks

    def _check_shape(self) -> None:
        g = self.graph
        restarted = [n for n in g.levels if self.problems[n].init is not None]
        if restarted:
            raise BettyUnsupported(
                f"level(s) {restarted} start every round from init (or take no steps of their own, steps=0); "
                "Betty's problems have no such restart"
            )
        leaves = [n for n in g.levels if not g.lowers_of[n]]
        steps = {n: self.problems[n].steps for n in leaves}
        if len(set(steps.values())) > 1:
            raise BettyUnsupported(
                f"Betty steps every leaf once per iteration; leaves with different steps {steps} have no "
                "Betty equivalent"
            )
        for name in g.levels:
            if g.lowers_of[name] and self.problems[name].steps != 1:
                raise BettyUnsupported(
                    f"level {name!r} has lowers and steps={self.problems[name].steps}: Betty steps a level with "
                    "lowers once after its lowers' unrolled steps, so only steps=1 means the same on both"
                )
        for lower in g.levels:
            kinds = {self.methods[(u, lower)].kind for u in g.uppers_of[lower]} - {"first_order"}
            if len(kinds) > 1:
                raise BettyUnsupported(
                    f"Betty sets one method per lower level; level {lower!r} is served by {sorted(kinds)}"
                )
        for upper in g.levels:
            lows = g.lowers_of[upper]
            first = {self.methods[(upper, low)].kind == "first_order" for low in lows}
            if len(first) > 1:
                raise BettyUnsupported(
                    f"Betty's first_order switch is per upper level; level {upper!r} mixes first_order with "
                    "other estimators on its edges"
                )
            for low in lows:
                kind = self.methods[(upper, low)].kind
                if kind in ("neumann", "cg", "sama") and g.lowers_of[low]:
                    raise BettyUnsupported(
                        f"edge {upper!r} -> {low!r}: Betty's {kind} only serves a lower level without lowers of "
                        f"its own, and {low!r} has {list(g.lowers_of[low])}"
                    )
                other_routes = [m for m in g.uppers_of[low] if m != upper and upper in (m, *self._ancestors(m))]
                if other_routes:
                    raise BettyUnsupported(
                        f"edge {upper!r} -> {low!r}: {low!r} also reaches {upper!r} through {other_routes}; Betty "
                        "chains such multi-hop paths differently from mlo's rule"
                    )
            beyond = [d for d in g.descendants(upper) if d not in lows]
            if beyond and any(self.methods[(upper, low)].kind != "first_order" for low in lows):
                warnings.warn(
                    f"Betty's hypergradient of level {upper!r} ignores its loss's direct dependence on "
                    f"{beyond} (levels below its direct lowers); mlo's rule includes it. The two "
                    f"agree only if {upper!r}'s loss does not read {beyond}.",
                    BettyMismatchWarning,
                    stacklevel=3,
                )

    def _ancestors(self, name: str) -> set[str]:
        found: set[str] = set()
        stack = list(self.graph.uppers_of[name])
        while stack:
            u = stack.pop()
            if u not in found:
                found.add(u)
                stack.extend(self.graph.uppers_of[u])
        return found

    def _config(self, name: str) -> Any:
        from betty.configs import Config

        g = self.graph
        options: dict[str, Any] = {"unroll_steps": self.problems[name].steps}
        lows = g.lowers_of[name]
        # On an upper: ``first_order=True`` is Betty's switch for "compute the implicit part".
        implicit = any(self.methods[(name, low)].kind != "first_order" for low in lows)
        options["first_order"] = implicit
        options["retain_graph"] = implicit  # the loss serves the direct gradient and the paths
        for upper in g.uppers_of[name]:
            method = self.methods[(upper, name)]
            if method.kind != "first_order":
                options["type"] = method.kind
                options.update(dict(method.options))
        return Config(**options)

    # -------------------------------------------------------------------------------- running

    def run(self, rounds: int) -> None:
        """Run ``rounds`` rounds on Betty's Engine: each steps the leaves their ``steps`` steps and
        every upper once, as an mlo round does."""
        if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 0:
            raise ValueError(f"rounds must be an int >= 0, got {rounds!r}")
        if rounds == 0:
            return
        self.engine.train_iters = rounds * self.leaf_steps
        with _quiet():
            self.engine.run()

    def iterate(self, rounds: int = 1) -> None:
        """``rounds`` rounds as the body of Betty's own training loop runs them, without
        ``Engine.run``'s per-call setup and teardown (mode switch, log level, closing log line):
        what a round costs inside one long Betty run. The benchmarks time rounds this way, so
        that Betty is not charged for being called one round at a time."""
        engine = self.engine
        for _ in range(rounds * self.leaf_steps):
            engine.global_step += 1
            engine.train_step()

    def hypergradient(self, name: str) -> list[Tensor]:
        """Level ``name``'s hypergradient as Betty computes it at the current state, one tensor per
        trainable parameter of its module; steps nothing and restores every parameter, gradient
        and buffer (Betty's finite differences move parameters in place and back, which is not
        exact in floating point). A level that has drawn no batch yet draws its first."""
        if name not in self.levels:
            raise KeyError(f"unknown level {name!r}; levels: {list(self.levels)}")
        for level_name in (name, *self.graph.descendants(name)):
            level = self.levels[level_name]
            if level.cur_batch is None:
                level.cur_batch = level.get_batch()
        level = self.levels[name]
        params = [p for lv in self.levels.values() for p in lv.trainable_parameters()]
        buffers = [b for problem in self.problems.values() for b in problem.module.buffers()]
        grads = [p.grad for p in params]
        try:
            with _quiet(), frozen_buffers(params + buffers):
                for p in params:
                    p.grad = None
                loss, _ = level.get_loss(level.cur_batch)
                level.backward(loss, level.trainable_parameters(), level.paths, create_graph=False, retain_graph=True)
                return [
                    p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)
                    for p in level.trainable_parameters()
                ]
        finally:
            for p, g in zip(params, grads):
                p.grad = g


def run_on_betty(
    problems: Sequence[mlo.Problem],
    graph: Mapping[str, Sequence[str]] | None,
    estimator: EstimatorSpec | Mapping[Edge, EstimatorSpec],
    rounds: int,
    allow_inexact: bool = False,
) -> BettyProgram:
    """Build ``problems`` and ``graph`` on Betty with ``estimator`` and run ``rounds`` rounds."""
    program = BettyProgram(problems, graph, estimator, allow_inexact)
    program.run(rounds)
    return program


def betty_hypergradient(
    problems: Sequence[mlo.Problem],
    graph: Mapping[str, Sequence[str]] | None,
    estimator: EstimatorSpec | Mapping[Edge, EstimatorSpec],
    name: str,
    allow_inexact: bool = False,
) -> list[Tensor]:
    """Level ``name``'s hypergradient as Betty computes it, on a fresh build of the program (each
    level on its first batch, as ``mlo.Engine(...).hypergradient(name)`` on a fresh engine)."""
    return BettyProgram(problems, graph, estimator, allow_inexact).hypergradient(name)
