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

The engine's state is explicit. Each level's runtime state is in one place, its
`mlo.state.LevelState` (``engine.levels[name]``): the batch in use and the data position, the
last gradient (where an estimator reads it), the gradient-transform state and the gradient
scaler; the engine hands the hypergradient rule what it needs of it as arguments
(`mlo.hypergradient`). With the modules, optimizers, schedulers, random generators, hooks'
state and the round counter, that is what ``state_dict`` / ``load_state_dict`` save and restore
(`mlo.checkpoint` saves and loads it atomically).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from typing import Any

import torch
from torch import Tensor

from . import autodiff, distributed, rng
from . import precision as precisions
from .autodiff import Tensors
from .errors import DisconnectedEdgeWarning, DivergenceWarning, NonFiniteError, ProgramError, ZeroGradientWarning
from .estimators import Estimator, Info
from .estimators.base import read_info
from .functional import Program, frozen_buffers
from .graph import Edge, Graph
from .hooks import Hook
from .rule import SYNCS, Rule, level_losses, resolve_edges
from .problem import Problem, batches_in_use
from .state import LevelState
from .streams import Stream

__all__ = ["Engine"]

EstimatorSpec = str | Estimator
PrecisionSpec = str | precisions.Precision


class Diagnostics:
    """What the estimators reported at the last hypergradient of each edge: ``by_edge[edge]``,
    a dict of floats. Values an estimator left as tensors (`mlo.estimators.Info`) are read when
    ``by_edge`` is, so that steps whose diagnostics nobody reads pay no host read for them."""

    def __init__(self) -> None:
        self._read: dict[Edge, dict[str, float]] = {}
        self._unread: dict[Edge, Info] = {}

    @property
    def by_edge(self) -> dict[Edge, dict[str, float]]:
        if self._unread:
            self._read.update({edge: read_info(info) for edge, info in self._unread.items()})
            self._unread.clear()
        return self._read

    def record(self, infos: Mapping[Edge, Info]) -> None:
        """Keep ``infos`` (per edge, the last evaluation's), replacing those edges' reports."""
        self._unread.update(infos)


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
        divergence_factor: give a ``DivergenceWarning`` (once per level) when a level's loss
            exceeds this many times its first value in magnitude: an optimizer diverging is
            seen long before anything is infinite. ``None``: no such watch. Read in the same host
            read as the finiteness check, so it costs nothing more.
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
        divergence_factor: float | None = 1e6,
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
        self.estimators = resolve_edges(self.graph, estimator, self.program.problems)
        self.precision = precisions.per_level(precision, list(self.program.problems))
        self._check_starts()
        self.hooks = list(hooks)
        for hook in self.hooks:
            if not isinstance(hook, Hook):
                raise ProgramError(f"hooks must be mlo.Hook instances, got {type(hook).__name__}: {hook!r}")
        self.check_finite = check_finite
        if divergence_factor is not None and not (isinstance(divergence_factor, (int, float)) and divergence_factor > 1):
            raise ProgramError(f"divergence_factor must be a number > 1 or None, got {divergence_factor!r}")
        self.divergence_factor = divergence_factor
        #: each level's loss at its first evaluation, and the levels already warned of divergence
        self._first_loss: dict[str, float] = {}
        self._diverged: set[str] = set()
        self._edges_checked: set[str] = set()
        self.round = 0
        self.diagnostics = Diagnostics()
        for p in problems:  # every rank starts from rank 0's state, as DDP does
            distributed.broadcast_module(p.module)
        #: each level's runtime state (`mlo.state.LevelState`): batch, data position, last
        #: gradient, transform state, gradient scaler
        self.levels: dict[str, LevelState] = {name: self._level_state(name) for name in self.graph.levels}
        scalers = {name: state.scaler for name, state in self.levels.items() if state.scaler is not None}
        self._rule = Rule(self.program, self.graph, self.estimators, level_losses(self.program, self.precision, scalers))

    def _level_state(self, name: str) -> LevelState:
        problem, params = self.program.problems[name], self.program.params[name]
        return LevelState(
            stream=Stream(problem),
            keep_gradient=any(
                est.reads_last_gradient(problem) for (_, low), est in self.estimators.items() if low == name
            ),
            transform=problem.transform.init(params) if problem.transform is not None else None,
            scaler=self.precision[name].scaler(params[0].device),
        )

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

    # ------------------------------------------------------------------ running

    def run(self, rounds: int) -> None:
        """Run ``rounds`` rounds; each steps every level bottom-up. Hooks hear ``on_run_start``
        before the first and ``on_run_end`` after the last (also when the run raises)."""
        if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 0:
            raise ProgramError(f"rounds must be an int >= 0, got {rounds!r}")
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
        if self.program.problems[name].init is None or self.levels[name].stream.drawn == 0:
            self._draw(name)
        if name not in self._edges_checked:
            self._check_edges(name)
        grads, loss = self._gradient(name)
        scaler = self.levels[name].scaler
        overflow = False
        if scaler is not None:
            grads, overflow = self._unscale(name, grads, scaler)
        update = None
        if not overflow:
            self._watch(name, loss, grads, stepping=True)
            for hook in self.hooks:
                hook.on_gradient(self, name, grads)
            update = self._transform(name, grads)
        if scaler is not None:
            self._scaled_step(name, update, overflow, scaler)
        elif update is not None:
            self._optimizer_step(name, update, self.program.problems[name].optimizer.step)
        loss = loss.detach()
        for hook in self.hooks:
            hook.on_step(self, name, loss)
        return loss

    def _gradient(self, name: str) -> tuple[Tensors, Tensor]:
        """Level ``name``'s gradient (a level without lowers) or hypergradient, and its loss, on
        the current batches at the current state."""
        with distributed.data_parallel() if distributed.active() else nullcontext():
            batches = self._batches()
            if self.graph.lowers_of[name]:
                return self._evaluate(name, self._rule, batches)
            with batches_in_use(batches, self._rule.differentiated[name]):
                loss = self._rule.losses[name](batches[name], {})
            return autodiff.grad(loss, self.program.params[name]), loss

    def _unscale(self, name: str, grads: Tensors, scaler: torch.amp.GradScaler) -> tuple[Tensors, bool]:
        """fp16: ``grads`` through the scaler's own inf check; the unscaled gradients and whether
        they overflowed. The level's loss scaled its backward passes itself
        (`mlo.precision.scale_backward`), so ``grads`` are unscaled; they go back into .grad at
        the scale they were taken at (a power of two: exact both ways) for GradScaler's check,
        skip and back-off."""
        params = self.program.params[name]
        for p, g in zip(params, scaler.scale(list(grads))):
            p.grad = g
        scaler.unscale_(self.program.problems[name].optimizer)
        grads = tuple(p.grad for p in params)  # type: ignore[misc]
        return grads, not autodiff.all_finite(grads)

    def _transform(self, name: str, grads: Tensors) -> Tensors | None:
        """The update the optimizer gets: ``grads`` through the level's gradient transform, if it
        has one (``None``: the transform absorbed the step)."""
        transform = self.program.problems[name].transform
        if transform is None:
            return grads
        state = self.levels[name]
        update, state.transform = transform.update(tuple(g.detach() for g in grads), state.transform, self.program.params[name])
        return update

    def _optimizer_step(self, name: str, update: Tensors, step: Any) -> None:
        """Hand ``update`` to the optimizer in .grad and run ``step``; keep the gradient where an
        estimator reads it, release .grad, step the scheduler."""
        params, state = self.program.params[name], self.levels[name]
        for p, g in zip(params, update):
            p.grad = g.detach() if g.requires_grad else g
        step()
        if state.keep_gradient:  # as the optimizer left it (Betty's sama reads it so)
            state.last_gradient = tuple(p.grad.detach() if p.grad is not None else torch.zeros_like(p) for p in params)
        for p in params:
            p.grad = None
        scheduler = self.program.problems[name].scheduler
        if scheduler is not None:
            scheduler.step()

    def _scaled_step(self, name: str, update: Tensors | None, overflow: bool, scaler: torch.amp.GradScaler) -> None:
        """fp16: the optimizer step through the scaler (skipped after an overflow), then the
        scaler's update (its scale lowered after an overflow)."""
        optimizer = self.program.problems[name].optimizer
        if update is not None:
            self._optimizer_step(name, update, lambda: scaler.step(optimizer))
        else:
            if overflow:
                scaler.step(optimizer)  # records the skipped step
            for p in self.program.params[name]:
                p.grad = None
        scaler.update()

    def hypergradient(
        self,
        name: str,
        estimator: EstimatorSpec | Mapping[Edge, EstimatorSpec] | None = None,
        batches: Mapping[str, Any] | None = None,
    ) -> list[Tensor]:
        """Level ``name``'s hypergradient at the current state, one tensor per parameter of its
        module (``module.parameters()`` order, trainable ones), as the configured estimators
        compute it (`mlo.hypergradient` with this engine's batches and state). Steps nothing and
        leaves every parameter and buffer as it was; a level that has drawn no batch yet draws
        its first.

        ``estimator``: another estimator for every edge, or ``{edge: estimator}`` for some edges
        (the others keep theirs), for this evaluation only. ``batches``: ``{level: batch}`` used
        instead of those levels' current batches, for this evaluation only."""
        self.graph.require(name)
        for level in batches or {}:
            self.graph.require(level)
        for level in (name, *self.graph.descendants(name)):
            if self.levels[level].stream.drawn == 0 and (batches is None or level not in batches):
                self._draw(level)
        rule = self._rule
        if estimator is not None:
            chosen = estimator if isinstance(estimator, Mapping) else dict.fromkeys(self.graph.edges, estimator)
            estimators = resolve_edges(self.graph, {**self.estimators, **chosen}, self.program.problems)
            rule = Rule(self.program, self.graph, estimators, self._rule.losses)
        with distributed.data_parallel():
            grads, loss = self._evaluate(name, rule, {**self._batches(), **(batches or {})})
        self._watch(name, loss, grads, stepping=False)
        return [g.detach() for g in grads]

    def batch(self, name: str) -> Any:
        """The batch level ``name`` is on (the last it drew); ``ProgramError`` when it has drawn
        none yet (a level without data is always on ``None``)."""
        self.graph.require(name)
        stream = self.levels[name].stream
        if stream.drawn == 0 and self.program.problems[name].data is not None:
            raise ProgramError(f"level {name!r} has drawn no batch yet: run a round (or engine.step({name!r})) first")
        return stream.batch

    def _batches(self) -> dict[str, Any]:
        """Every level's batch in use."""
        return {name: state.stream.batch for name, state in self.levels.items()}

    def _last_gradients(self) -> dict[str, Tensors]:
        """The last step's gradient of every level whose estimator reads it (and that has stepped)."""
        return {name: s.last_gradient for name, s in self.levels.items() if s.last_gradient is not None}

    def _evaluate(self, name: str, rule: Rule, batches: Mapping[str, Any]) -> tuple[Tensors, Tensor]:
        """Level ``name``'s hypergradient and loss at the current state (`mlo.hypergradient`),
        the estimators' reports kept in ``diagnostics``."""
        result = rule.evaluate(name, self.program.params, batches, self._last_gradients(), self.sync)
        self.diagnostics.record(result.infos)
        return result.gradient, result.loss

    # ------------------------------------------------------------------ helpers

    def _draw(self, name: str) -> None:
        """Level ``name`` draws its next batch; ``Problem.batch`` shows it to users."""
        self.program.problems[name].batch = self.levels[name].stream.draw()

    def _watch(self, name: str, loss: Tensor, grads: Tensors, stepping: bool) -> None:
        """The safety of one evaluation of level ``name``, from one host read: at the level's
        first evaluation, of its loss and its gradients' norms (`_read`); after it, of its loss
        and a finiteness probe of its gradients (`mlo.autodiff.finite_probe`):

        - ``NonFiniteError`` naming the level and round if the loss or a gradient is not finite
          (``check_finite``);
        - a ``ZeroGradientWarning`` if every gradient is exactly zero at the level's first
          evaluation;
        - a ``DivergenceWarning``, once, if a step's loss exceeds ``divergence_factor`` times
          the first in magnitude (``stepping``: steps only, not ``Engine.hypergradient``)."""
        first = name not in self._first_loss
        growth = stepping and self.divergence_factor is not None and name not in self._diverged
        if not (self.check_finite or first or growth):
            return
        if first:  # the zero test reads every gradient's norm
            value, *norms = _read(loss, grads)  # value: |loss|
            finite = math.isfinite(value) and all(map(math.isfinite, norms))
        else:
            value, *probes = autodiff.read(loss, *autodiff.finite_probe(grads))
            finite = math.isfinite(value) and all(map(math.isfinite, probes))
            value = abs(value)
        if not finite:  # a non-finite element, or only an overflow in a norm or a sum
            if self.check_finite:
                self._raise_non_finite(name, loss, grads)
            value = abs(float(loss.detach()))
        if first:
            self._first_loss[name] = value
            if grads and all(n == 0.0 for n in norms):
                self._warn_zero(name)
        elif growth:
            base = self._first_loss[name]
            assert self.divergence_factor is not None
            if base != 0.0 and not value <= self.divergence_factor * base:
                self._diverged.add(name)
                warnings.warn(
                    f"level {name!r}: its loss has magnitude {value:.4g} at round {self.round}, more than "
                    f"{self.divergence_factor:.3g} x its first {base:.4g}: its optimizer is likely diverging "
                    "(a learning rate too large for the curvature its upper level set); "
                    "Engine(divergence_factor=...) sets the factor, None turns the watch off",
                    DivergenceWarning,
                    stacklevel=4,
                )

    def _raise_non_finite(self, name: str, loss: Tensor, grads: Tensors) -> None:
        """Raise `NonFiniteError` for level ``name``, unless only a norm or a sum overflowed on
        finite elements (past the dtype's range), which the exact test tells apart."""
        if not autodiff.all_finite((loss,)):
            raise NonFiniteError(f"level {name!r}: loss is not finite = {float(loss.detach()):.4g} at round {self.round}")
        if not autodiff.all_finite(grads):
            raise NonFiniteError(f"level {name!r}: hypergradient is not finite at round {self.round}")

    def _warn_zero(self, name: str) -> None:
        what = "hypergradient" if self.graph.lowers_of[name] else "gradient"
        hint = (
            "nothing reaches its parameters: its loss does not read them, nor through its lower levels"
            if self.graph.lowers_of[name]
            else "its loss does not read its own parameters; a level optimized through another level's "
            "response needs an edge in the graph (e.g. graph={" + repr(name) + ": [lower]})"
        )
        warnings.warn(
            f"level {name!r}: its {what} is exactly zero at its first evaluation (round {self.round}): {hint}",
            ZeroGradientWarning,
            stacklevel=5,
        )

    def _check_edges(self, name: str) -> None:
        """Once per level with lowers, at its first step: a `DisconnectedEdgeWarning` for each
        edge whose lower level's loss does not read ``name``'s parameters (its mixed derivative
        is zero by construction). Edges whose dependence runs elsewhere are not judged: an
        attached look-ahead or a lower level with ``init`` (through its start), a lower with
        lowers of its own (through them), a first-order edge (which ignores it). The loss is
        evaluated with the random generators and buffers put back, so the run is unchanged."""
        self._edges_checked.add(name)
        upper = self.program.params[name]
        for low in self.graph.lowers_of[name]:
            est, problem = self.estimators[(name, low)], self.program.problems[low]
            if not est.uses_adjoint or est.attached or problem.init is not None or self.graph.lowers_of[low]:
                continue
            if self.levels[low].stream.drawn == 0:
                self._draw(low)
            batches = self._batches()
            cuda = sorted({p.device.index or 0 for p in upper if p.device.type == "cuda"})
            with frozen_buffers(self.program.buffers()), torch.random.fork_rng(devices=cuda), batches_in_use(batches):
                loss = self.program.loss(low, batches[low])
                reached = (
                    torch.autograd.grad(loss, upper, allow_unused=True) if loss.requires_grad else (None,) * len(upper)
                )
            if all(g is None for g in reached):
                warnings.warn(
                    f"edge {name!r} -> {low!r}: the loss of {low!r} does not read the parameters of {name!r}, so "
                    f"{low!r}'s best response does not depend on them and the edge adds exactly zero to {name!r}'s "
                    f"hypergradient; make the loss of {low!r} read {name!r} (a closure over its module), or drop the edge",
                    DisconnectedEdgeWarning,
                    stacklevel=4,
                )


    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume exactly, as values ``torch.load(weights_only=True)`` reads:

        - ``round``: the rounds done;
        - ``levels``: per level, its module, optimizer, scheduler, gradient-transform state,
          data position (`mlo.streams.Stream`: a seek for data with ``state_dict``, else a
          replay of the current pass only) and, where an estimator reads it (``sama`` under
          Adam), the gradient of its last step (``LevelState.last_gradient``; the estimators
          themselves are frozen and keep nothing between rounds);
        - ``rng``: the global generators (torch CPU and CUDA, numpy, python);
        - ``scalers``: the gradient scaler of each fp16 level;
        - ``hooks``: each hook's ``state_dict()`` (``None`` for hooks without state; those with
          state are matched in order when loading).

        `mlo.checkpoint.save` / `mlo.checkpoint.load` write and read it atomically."""
        levels = {}
        for name, problem in self.program.problems.items():
            state = self.levels[name]
            levels[name] = {
                "module": problem.module.state_dict(),
                "optimizer": problem.optimizer.state_dict(),
                "scheduler": problem.scheduler.state_dict() if problem.scheduler is not None else None,
                "data": state.stream.state_dict(),
                "transform": state.transform,
                "last_gradient": state.last_gradient if state.keep_gradient else None,
            }
        return {
            "round": self.round,
            "levels": levels,
            "rng": rng.get_state(),
            "hooks": [hook.state_dict() for hook in self.hooks],
            "scalers": {name: s.scaler.state_dict() for name, s in self.levels.items() if s.scaler is not None},
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
            saved, level = levels[name], self.levels[name]
            problem.module.load_state_dict(saved["module"])
            problem.optimizer.load_state_dict(saved["optimizer"])
            if problem.scheduler is not None and saved["scheduler"] is not None:
                problem.scheduler.load_state_dict(saved["scheduler"])
            if problem.transform is not None and saved.get("transform") is not None:
                level.transform = saved["transform"]
            level.stream.load_state_dict(saved["data"])
            problem.batch = level.stream.batch
            if level.keep_gradient:
                last = saved.get("last_gradient")
                level.last_gradient = None if last is None else tuple(last)
        for hook, hook_state in zip(stateful, saved_hooks):
            hook.load_state_dict(hook_state)
        for name, scaler_state in state.get("scalers", {}).items():
            scaler = self.levels[name].scaler if name in self.levels else None
            if scaler is not None:
                scaler.load_state_dict(scaler_state)
        self.round = int(state["round"])
        if "rng" in state:
            rng.set_state(state["rng"])


def _read(loss: Tensor, grads: Tensors) -> list[float]:
    """``[|loss|, norm of each gradient]`` as floats: one fused norm over them all and one host read."""
    with torch.no_grad():
        return torch.stack(torch._foreach_norm([loss.detach(), *grads])).tolist()  # stack promotes dtypes
