"""`Engine`: runs a multi-level program; its hypergradients come from `mlo.hypergradient`.

Each round calls the hooks' ``before_round``, then steps every level bottom-up: a lower level its
``steps`` steps, then its uppers. A level with ``init`` restarts from it at its turn in each
round; a level with ``steps=0`` only draws its batch (see ``mlo.Problem``). A level without
lowers takes a plain training step. A level with lowers steps along its
hypergradient, computed at the current state by the rule stated in `mlo.hypergradient` (exact
implicit hypergradients at any depth with ``cg``/``neumann``; see there) with the estimator of
each edge. The engine keeps the scheduling, the data, the checks and the state.

Buffers: estimator evaluations never move module buffers (BatchNorm statistics are restored
after every hypergradient); the plain step of a level without lowers updates them as a normal
training step does.

The engine's state is explicit: every level's module, optimizer, scheduler, gradient-transform
state, data position and last gradient (where an estimator reads it), the random generators,
the gradient scalers, the hooks' state and the round counter
(``state_dict`` / ``load_state_dict``; `mlo.checkpoint` saves and loads it atomically).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from . import autodiff, distributed, rng
from . import precision as precisions
from .autodiff import Tensors
from .errors import EstimatorError, NonFiniteError, ProgramError
from .estimators import Estimator, Info, resolve
from .functional import Point, Program, frozen_buffers
from .graph import Graph
from .hooks import Hook
from .hypergradient import Loss, Rule
from .problem import Problem
from .streams import Stream

__all__ = ["Engine"]

EstimatorSpec = str | Estimator
PrecisionSpec = str | precisions.Precision
Edge = tuple[str, str]
#: the values of ``Engine(sync=...)``
SYNCS = ("exact", "once")


@dataclass
class Diagnostics:
    """What the estimators reported at the last hypergradient of each edge."""

    by_edge: dict[Edge, Info] = field(default_factory=dict)


class Engine:
    """Runs ``problems`` wired by ``graph`` with hypergradients from ``estimator``.

    Args:
        problems: the levels, each a ``Problem`` with a unique name.
        graph: ``{upper: [lowers]}``; the best response of each lower depends on the upper.
        estimator: a registered name (``"cg"``), a ``"name:opt=value"`` string, an ``Estimator``,
            or a mapping ``{(upper, lower): estimator}`` covering every edge.
        hooks: ``mlo.Hook`` instances (progress, logs, checkpoints; see ``mlo.hooks``).
        check_finite: raise ``NonFiniteError`` naming the level and round when a loss or
            hypergradient is NaN or infinite.
        precision: ``"fp32"`` (default), ``"bf16"`` or ``"fp16"`` for every level, or a mapping
            ``{level: precision}``: the forward pass of each level's loss under autocast, fp16
            with a gradient scaler (any level, upper levels included: their hypergradients'
            backward passes are scaled; `mlo.precision`). Derivatives and solves stay in float32.
        sync: how ranks synchronize under a process group. ``"exact"`` (default): every
            derivative is averaged across ranks, so W ranks compute what one process computes on
            the whole batch. ``"once"``: only each step's final gradient or hypergradient is
            averaged (as SAMA does); the solves inside a hypergradient (Hessian-vector products,
            look-aheads, the lower levels' gradients there) use each rank's own share of the
            batch. Fewer collectives, and approximate: the hypergradient is the mean over ranks
            of each rank's hypergradient on its share, not the whole batch's. Ranks still hold
            identical parameters. Without a process group both are the same.

    When a process group is initialized, the engine is data-parallel: every rank starts from
    rank 0's parameters and derivatives are averaged across ranks as ``sync`` says
    (`mlo.distributed`).

    Every check on the program happens here, before any step.
    """

    def __init__(
        self,
        problems: Sequence[Problem],
        graph: Mapping[str, Sequence[str]] | None = None,
        estimator: EstimatorSpec | Mapping[Edge, EstimatorSpec] = "cg",
        hooks: Sequence[Hook] = (),
        check_finite: bool = True,
        precision: PrecisionSpec | Mapping[str, PrecisionSpec] = "fp32",
        sync: str = "exact",
    ) -> None:
        if sync not in SYNCS:
            raise ProgramError(f"sync must be one of {SYNCS}, got {sync!r}")
        #: ``"exact"`` or ``"once"``: which derivatives are averaged across ranks (see the class)
        self.sync = sync
        problems = list(problems)
        for p in problems:
            if not isinstance(p, Problem):
                raise ProgramError(f"problems must be mlo.Problem instances, got {type(p).__name__}: {p!r}")
        ids = [id(p) for p in problems]
        for p in problems:
            if ids.count(id(p)) > 1:
                raise ProgramError(f"level {p.name!r} is listed twice in problems")
        for p in problems:
            p.check_data()
        for p in problems:
            distributed.refuse_wrapped(p.name, p.module)
            distributed.warn_batch_statistics(p.name, p.module)
        self.graph = Graph.build([p.name for p in problems], graph or {})
        self.program = Program(problems)
        self._check_parameters()
        self.estimators = self._resolve_estimators(estimator)
        self.precision = precisions.per_level(precision, list(self.program.problems))
        self._scalers = {
            name: scaler
            for name, prec in self.precision.items()
            if (scaler := prec.scaler(self.program.params[name][0].device)) is not None
        }
        self._check_starts()
        #: levels whose last step's gradient an estimator reads (``Problem.last_gradient``)
        self._keep_gradient = {
            low for (_, low), est in self.estimators.items() if est.reads_last_gradient(self.program.problems[low])
        }
        self.hooks = list(hooks)
        for hook in self.hooks:
            if not isinstance(hook, Hook):
                raise ProgramError(f"hooks must be mlo.Hook instances, got {type(hook).__name__}: {hook!r}")
        self.check_finite = check_finite
        self.round = 0
        self.diagnostics = Diagnostics()
        for p in problems:  # every rank starts from rank 0's state, as DDP does
            distributed.broadcast_module(p.module)
        self._streams = {name: Stream(p) for name, p in self.program.problems.items()}
        self._losses = {name: self._loss(name) for name in self.graph.levels}
        self._rule = Rule(self.graph, self.estimators, self._losses, self.program.problems, self.program.derive)
        self._transform_states: dict[str, Any] = {
            name: p.transform.init(self.program.params[name])
            for name, p in self.program.problems.items()
            if p.transform is not None
        }

    # ------------------------------------------------------------------ building

    def _check_parameters(self) -> None:
        owner: dict[int, str] = {}
        for name, problem in self.program.problems.items():
            params = self.program.params[name]
            if not params:
                role = "an upper level" if self.graph.lowers_of[name] else "a level"
                raise ProgramError(f"level {name!r} is {role} with no trainable parameters in its module")
            for p in params:
                if id(p) in owner:
                    raise ProgramError(
                        f"a parameter of level {name!r} also belongs to level {owner[id(p)]!r}; "
                        "each parameter must belong to exactly one level"
                    )
                owner[id(p)] = name
            held = {id(q) for group in problem.optimizer.param_groups for q in group["params"]}
            module_names = {id(p): n for n, p in problem.module.named_parameters() if p.requires_grad}
            missing = [n for i, n in module_names.items() if i not in held]
            if missing:
                raise ProgramError(
                    f"level {name!r}: its optimizer does not own parameter(s) {missing} of its module"
                )
            extra = held - set(module_names)
            if extra:
                raise ProgramError(
                    f"level {name!r}: its optimizer holds {len(extra)} tensor(s) that are not trainable "
                    "parameters of its module"
                )

    def _check_starts(self) -> None:
        """Levels with ``init``: its values fit the level; a level with ``steps=0`` is read by an
        upper level through an estimator that steps it (a look-ahead)."""
        for name, problem in self.program.problems.items():
            if problem.init is None:
                continue
            self.program.start(name)
            if problem.steps:
                continue
            if not self.graph.uppers_of[name]:
                raise ProgramError(f"level {name!r} has steps=0 and no upper level: nothing would ever step or read it")
            for upper in self.graph.uppers_of[name]:
                est = self.estimators[(upper, name)]
                if not est.attached:
                    raise ProgramError(
                        f"edge {upper!r} -> {name!r}: level {name!r} takes no steps of its own (steps=0), so its "
                        f"estimator must step it through a differentiable look-ahead (unroll); got {est.name!r}"
                    )

    def _resolve_estimators(self, spec: EstimatorSpec | Mapping[Edge, EstimatorSpec]) -> dict[Edge, Estimator]:
        edges = self.graph.edges
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
            est.check(self.program.problems[lower])
        return chosen

    # ------------------------------------------------------------------ running

    def run(self, rounds: int) -> None:
        """Run ``rounds`` rounds; each steps every level bottom-up. Hooks hear ``on_run_start``
        before the first and ``on_run_end`` after the last (also when the run raises)."""
        if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 0:
            raise ValueError(f"rounds must be an int >= 0, got {rounds!r}")
        for hook in self.hooks:
            hook.on_run_start(self)
        try:
            for _ in range(rounds):
                for hook in self.hooks:
                    hook.before_round(self)
                for name in self.graph.bottom_up:
                    problem = self.program.problems[name]
                    if problem.init is not None:
                        self.restart(name)
                    for _ in range(problem.steps):
                        self.step(name)
                self.round += 1
                for hook in self.hooks:
                    hook.on_round(self)
        finally:
            for hook in self.hooks:
                hook.on_run_end(self)

    def restart(self, name: str) -> None:
        """Start level ``name`` afresh from its ``init``: parameters set to ``init()`` (at the
        current state, not differentiated), optimizer state cleared, next batch drawn. `run`
        calls it at the level's turn in every round."""
        self.graph.require(name)
        problem = self.program.problems[name]
        if problem.init is None:
            raise ProgramError(f"level {name!r} has no init to restart from")
        with torch.no_grad():
            for p, value in zip(self.program.params[name], self.program.start(name)):
                p.copy_(value)
        problem.optimizer.state.clear()
        self._draw(name)

    def step(self, name: str) -> Tensor:
        """One optimizer step of level ``name`` on its next batch (a level with ``init``: on the
        batch it drew when it restarted); returns its loss (detached).

        The gradients are handed to the optimizer in ``.grad`` and released after its step (as
        ``zero_grad()`` does), so no level holds a parameter-sized gradient while others step.
        A gradient transform may absorb the step (it returns ``None`` as the gradient, as
        `mlo.transforms.accumulate` does between micro-batches): then neither the optimizer nor
        the scheduler steps. A level in fp16 whose (hyper)gradient is not finite does not step
        either; its gradient scaler lowers its scale (`mlo.precision`).

        For a level with lowers, the loss returned (and passed to hooks) is its loss at the point
        its hypergradient is evaluated: where an edge's estimator has a look-ahead (``unroll``,
        ``finite_difference``) that lower level is at its look-ahead parameters, not its current
        ones. Evaluate the loss yourself in a hook for its value at the current state."""
        self.graph.require(name)
        problem = self.program.problems[name]
        if problem.init is None or self._streams[name].drawn == 0:
            self._draw(name)
        params = self.program.params[name]
        scaler = self._scalers.get(name)
        with distributed.data_parallel():
            if self.graph.lowers_of[name]:
                grads, loss = self._hypergradient(name)
            else:
                loss = self._losses[name]({})
                grads = autodiff.grad(loss, params)
        overflow = False
        if scaler is not None:
            # The level's loss scaled its backward passes itself (`mlo.precision.scale_backward`),
            # so ``grads`` are unscaled. They go back into .grad at the scale they were taken at
            # (a power of two: exact both ways) for GradScaler's own inf check, skip and back-off.
            for p, g in zip(params, scaler.scale(list(grads))):
                p.grad = g
            scaler.unscale_(problem.optimizer)
            grads = tuple(p.grad for p in params)  # type: ignore[misc]
            overflow = not autodiff.all_finite(grads)
        if not overflow:
            self._check(loss, grads, name)
            for hook in self.hooks:
                hook.on_gradient(self, name, grads)
        update: Tensors | None = None if overflow else grads
        if problem.transform is not None and update is not None:
            grads = tuple(g.detach() for g in grads)
            update, self._transform_states[name] = problem.transform.update(grads, self._transform_states[name], params)
        if update is not None or scaler is not None:
            if update is not None:
                for p, g in zip(params, update):
                    p.grad = g.detach() if g.requires_grad else g
            if scaler is None:
                problem.optimizer.step()
            else:
                if update is not None or overflow:
                    scaler.step(problem.optimizer)  # skips the step after an overflow
                scaler.update()
            if update is not None and name in self._keep_gradient:  # as the optimizer left it (Betty's sama reads it so)
                problem.last_gradient = tuple(p.grad.detach() if p.grad is not None else torch.zeros_like(p) for p in params)
            for p in params:
                p.grad = None
            if problem.scheduler is not None and update is not None:
                problem.scheduler.step()
        loss = loss.detach()
        for hook in self.hooks:
            hook.on_step(self, name, loss)
        return loss

    def hypergradient(
        self,
        name: str,
        estimator: EstimatorSpec | Mapping[Edge, EstimatorSpec] | None = None,
        batches: Mapping[str, Any] | None = None,
    ) -> list[Tensor]:
        """Level ``name``'s hypergradient at the current state, one tensor per parameter of its
        module (``module.parameters()`` order, trainable ones), as the configured estimators
        compute it. Steps nothing and leaves every parameter and buffer as it was; a level that
        has drawn no batch yet draws its first.

        ``estimator``: another estimator for every edge, or ``{edge: estimator}`` for some edges
        (the others keep theirs), for this evaluation only. ``batches``: ``{level: batch}`` used
        instead of those levels' current batches, for this evaluation only."""
        self.graph.require(name)
        for level in (name, *self.graph.descendants(name)):
            if self._streams[level].drawn == 0 and (batches is None or level not in batches):
                self._streams[level].draw()
        rule = self._rule if estimator is None and batches is None else self._rule_with(estimator, batches or {})
        with distributed.data_parallel():
            grads, loss = self._hypergradient(name, rule)
        self._check(loss, grads, name)
        return [g.detach() for g in grads]

    def batch(self, name: str) -> Any:
        """The batch level ``name`` is on (the last it drew); ``ProgramError`` when it has drawn
        none yet (a level without data is always on ``None``)."""
        self.graph.require(name)
        stream = self._streams[name]
        if stream.drawn == 0 and self.program.problems[name].data is not None:
            raise ProgramError(f"level {name!r} has drawn no batch yet: run a round (or engine.step({name!r})) first")
        return stream.batch

    def _hypergradient(self, name: str, rule: Rule | None = None) -> tuple[Tensors, Tensor]:
        """Level ``name``'s hypergradient and loss at the current state (`mlo.hypergradient`);
        buffers are restored afterwards and the estimators' reports kept in ``diagnostics``.
        With ``sync="once"`` the rule runs on this rank's batches alone and only its result is
        averaged across ranks."""
        exact = self.sync == "exact"
        with frozen_buffers(self.program.buffers()), distributed.data_parallel(exact):
            result = (rule or self._rule)(name, self.program.params)
        self.diagnostics.by_edge.update(result.infos)
        if exact:
            return result.gradient, result.loss
        with distributed.data_parallel():
            return distributed.average(result.gradient), result.loss

    def _rule_with(self, estimator: EstimatorSpec | Mapping[Edge, EstimatorSpec] | None, batches: Mapping[str, Any]) -> Rule:
        """The rule with some edges' estimators and some levels' batches replaced."""
        estimators = self.estimators
        if estimator is not None:
            chosen = estimator if isinstance(estimator, Mapping) else dict.fromkeys(self.graph.edges, estimator)
            estimators = self._resolve_estimators({**self.estimators, **chosen})
        for level in batches:
            self.graph.require(level)
        losses = {
            level: self._loss(level, (batches[level],) if level in batches else None) for level in self.graph.levels
        }
        return Rule(self.graph, estimators, losses, self.program.problems, self.program.derive)

    def _loss(self, name: str, fixed: tuple[Any] | None = None) -> Loss:
        """Level ``name``'s loss on its current batch (or on ``fixed[0]``), at any point, in the
        level's precision (the forward pass under autocast, the loss returned in float32)."""
        problem_loss = self.program.loss
        prec, device = self.precision[name], self.program.params[name][0].device

        def batch() -> Any:
            return fixed[0] if fixed is not None else self._streams[name].batch

        if prec.dtype is None:

            def loss(point: Point) -> Tensor:  # widened only if a caller's autocast narrowed it
                return precisions.widen(problem_loss(name, batch(), point))

            return loss

        scaler, params = self._scalers.get(name), self.program.params

        def low_precision_loss(point: Point) -> Tensor:
            with prec.autocast(device):
                if scaler is None:
                    return precisions.widen(problem_loss(name, batch(), point))
                # fp16: backward passes scaled between the loss and every level's values it reads
                return precisions.scale_backward(
                    lambda at: precisions.widen(problem_loss(name, batch(), at)), {**params, **point}, scaler
                )

        return low_precision_loss

    # ------------------------------------------------------------------ helpers

    def _draw(self, name: str) -> None:
        self._streams[name].draw()

    def _check(self, loss: Tensor, grads: Tensors, name: str) -> None:
        """Raise `NonFiniteError` naming the level and round if the loss or a gradient is not
        finite: one fused check on the common path, the details only when it fails."""
        if not self.check_finite or autodiff.all_finite((loss, *grads)):
            return
        if not autodiff.all_finite((loss,)):
            shown = f" = {float(loss.detach()):.4g}" if loss.numel() == 1 else ""
            raise NonFiniteError(f"level {name!r}: loss is not finite{shown} at round {self.round}")
        raise NonFiniteError(f"level {name!r}: hypergradient is not finite at round {self.round}")

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume exactly, as values ``torch.load(weights_only=True)`` reads:

        - ``round``: the rounds done;
        - ``levels``: per level, its module, optimizer, scheduler, gradient-transform state,
          data position (`mlo.streams.Stream`: a seek for data with ``state_dict``, else a
          replay of the current pass only) and, where an estimator reads it (``sama`` under
          Adam), the gradient of its last step (``Problem.last_gradient``; the estimators
          themselves are frozen and keep nothing between rounds);
        - ``rng``: the global generators (torch CPU and CUDA, numpy, python);
        - ``scalers``: the gradient scaler of each fp16 level;
        - ``hooks``: each hook's ``state_dict()`` (``None`` for hooks without state; those with
          state are matched in order when loading).

        `mlo.checkpoint.save` / `mlo.checkpoint.load` write and read it atomically."""
        levels = {}
        for name, problem in self.program.problems.items():
            levels[name] = {
                "module": problem.module.state_dict(),
                "optimizer": problem.optimizer.state_dict(),
                "scheduler": problem.scheduler.state_dict() if problem.scheduler is not None else None,
                "data": self._streams[name].state_dict(),
                "transform": self._transform_states.get(name),
                "last_gradient": problem.last_gradient if name in self._keep_gradient else None,
            }
        return {
            "round": self.round,
            "levels": levels,
            "rng": rng.get_state(),
            "hooks": [hook.state_dict() for hook in self.hooks],
            "scalers": {name: scaler.state_dict() for name, scaler in self._scalers.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a ``state_dict`` of an engine built on the same program. Each level's data goes
        back to its saved position (`mlo.streams.Stream`); the random generators are restored
        last, so that what the data does on the way does not move them."""
        levels = state["levels"]
        missing = set(self.program.problems) ^ set(levels)
        if missing:
            raise ProgramError(f"state does not match the program's levels: {sorted(missing)}")
        # hooks with state are matched in order; hooks without state (progress, checkpoints) may differ
        saved_hooks = [h for h in state.get("hooks", []) if h is not None]
        stateful = [hook for hook in self.hooks if hook.state_dict() is not None]
        if len(saved_hooks) != len(stateful):
            raise ProgramError(
                f"state holds {len(saved_hooks)} hook state(s) but the engine has {len(stateful)} hook(s) with state: "
                f"{[type(h).__name__ for h in stateful]}"
            )
        for name, problem in self.program.problems.items():
            saved = levels[name]
            problem.module.load_state_dict(saved["module"])
            problem.optimizer.load_state_dict(saved["optimizer"])
            if problem.scheduler is not None and saved["scheduler"] is not None:
                problem.scheduler.load_state_dict(saved["scheduler"])
            if problem.transform is not None and saved.get("transform") is not None:
                self._transform_states[name] = saved["transform"]
            self._streams[name].load_state_dict(saved["data"])
            if name in self._keep_gradient:
                last = saved.get("last_gradient")
                problem.last_gradient = None if last is None else tuple(last)
        for hook, hook_state in zip(stateful, saved_hooks):
            hook.load_state_dict(hook_state)
        for name, scaler_state in state.get("scalers", {}).items():
            if name in self._scalers:
                self._scalers[name].load_state_dict(scaler_state)
        self.round = int(state["round"])
        if "rng" in state:
            rng.set_state(state["rng"])
