"""`mlo.check` (defined here, in `mlo.checking`): how far is a program's hypergradient from the
truth, at its current state?

    report = mlo.check(engine, "hyper")          # against cg to a tight tolerance, in float64
    print(report)                                # a table (rich)
    report.rel_error, report.cosine, report.reference_converged, report.edges

The configured hypergradient of ``level`` (the engine's estimators, in the program's dtype) is
compared with a reference computed at the same parameters and the same batches:

- ``reference`` (default ``DEFAULT_REFERENCE``): conjugate gradient to a relative residual of
  1e-12 with the exact rule through middle levels (``hessian="total"``), in ``dtype`` (float64 by
  default), stopping at negative curvature. Any estimator can be the reference instead:
  ``"unroll:steps=500"``, ``mlo.estimators.CG(...)``.
- Per edge: the hypergradient of ``level`` with that edge on its configured estimator and every
  other edge on the reference, against the reference: the error that edge alone brings.
- ``reference_converged``: whether every solve of the reference reached its tolerance (``None``
  when the reference has no such notion, as ``unroll``). An unconverged cg reference (an
  indefinite lower Hessian) is reported as such: its errors are not errors against the truth.

For ``dtype``, every level module's floating parameters and buffers (all levels': a loss may read
any of them, e.g. a generator that makes another level's data) and the current batches are
converted for the length of the call, new tensors created inside losses default to ``dtype``, and
the original tensors are put back afterwards (the same objects). A module that a loss reaches
but that belongs to no level stays as it is. Before the reference is computed, every involved
level's loss is evaluated once in ``dtype`` (no gradient): if one raises there (it mixes such a
tensor with converted ones) the reference is computed in the program's dtype instead, and the
report's ``notes`` say so. ``dtype=None`` asks for the program's dtype from the start.

Nothing moves: every parameter, buffer, optimizer state, data position, the round counter, the
engine's diagnostics and torch's random number generators are as they were. Each evaluation
starts from the same generator state, so a loss that draws random numbers draws the same ones
first; a loss with dropout is still stochastic across its calls, so check it in eval mode.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from rich.console import Console
from rich.table import Table
from torch import Tensor, nn

from .errors import CheckWarning, ConfigError, ConvergenceWarning, EstimatorError, ProgramError
from .estimators import Estimator, resolve
from .functional import frozen_buffers

if TYPE_CHECKING:
    from .engine import Engine, EstimatorSpec
    from .graph import Edge

__all__ = ["check", "CheckReport", "EdgeCheck", "DEFAULT_REFERENCE", "describe"]

#: The default reference: cg (exact rule at any depth) to a relative residual of 1e-12, at most
#: 500 iterations, stopping at the first direction of negative curvature: an indefinite lower
#: Hessian makes the reference unconverged, and the report says so.
DEFAULT_REFERENCE = "cg:iterations=500,tol=1e-12,indefinite=stop"


@dataclass(frozen=True)
class EdgeCheck:
    """One edge's share of the error: ``level``'s hypergradient with this edge on its configured
    estimator and every other edge on the reference, against the reference."""

    upper: str
    lower: str
    estimator: Estimator
    rel_error: float
    cosine: float
    #: what the configured estimator and the reference reported on this edge
    diagnostics: dict[str, float]
    reference_diagnostics: dict[str, float]

    @property
    def reference_converged(self) -> bool | None:
        """Whether the reference's solve on this edge reached its tolerance (None: no such notion)."""
        flag = self.reference_diagnostics.get("converged")
        return None if flag is None else bool(flag)


@dataclass(frozen=True)
class CheckReport:
    """What `check` found. ``print(report)`` shows it as a table."""

    level: str
    reference: Estimator
    dtype: torch.dtype
    rel_error: float
    cosine: float
    estimator_seconds: float
    reference_seconds: float
    reference_converged: bool | None
    edges: tuple[EdgeCheck, ...]
    #: the configured hypergradient (program dtype) and the reference (``dtype``)
    hypergradient: tuple[Tensor, ...]
    reference_hypergradient: tuple[Tensor, ...]
    #: anything the reader should know about how the reference was computed
    notes: tuple[str, ...] = ()

    def table(self) -> Table:
        ref = describe(self.reference)
        notes = list(self.notes)
        if self.reference_converged is False:
            notes.insert(0, 
                f"[bold red]the {ref} reference did not converge[/] (see its residual): these errors are "
                "not against the truth; an indefinite lower Hessian is the usual cause"
            )
        caption = "\n".join(notes) or None
        table = Table(
            title=f"mlo check: hypergradient of {self.level!r} against {ref} ({_dtype_name(self.dtype)})",
            caption=caption,
        )
        for column in ("edge", "estimator", "rel. error", "cosine", "estimator reports", "reference reports"):
            table.add_column(column, justify="right" if column in ("rel. error", "cosine") else "left")
        for e in self.edges:
            table.add_row(
                f"{e.upper} -> {e.lower}", describe(e.estimator), f"{e.rel_error:.2e}", f"{e.cosine:.6f}",
                _info(e.diagnostics), _info(e.reference_diagnostics),
            )
        table.add_section()
        converged = {True: "converged", False: "NOT converged", None: "no convergence test"}[self.reference_converged]
        table.add_row(
            "[bold]all edges[/]", f"{self.estimator_seconds:.3g} s", f"[bold]{self.rel_error:.2e}[/]", f"{self.cosine:.6f}",
            "", f"{self.reference_seconds:.3g} s, {converged}",
        )
        return table

    def __rich__(self) -> Table:
        return self.table()

    def __str__(self) -> str:
        console = Console(width=140, record=True, force_terminal=False, color_system=None)
        with console.capture() as captured:
            console.print(self.table())
        return captured.get().rstrip()


def check(
    engine: "Engine",
    level: str,
    reference: "EstimatorSpec" = DEFAULT_REFERENCE,
    warn_above: float = 0.1,
    dtype: torch.dtype | None = torch.float64,
    estimator: "EstimatorSpec | Mapping[Edge, EstimatorSpec] | None" = None,
) -> CheckReport:
    """Compare ``level``'s configured hypergradient with ``reference`` at the current state.

    Args:
        engine: the program, after at least one round (every level involved must be on a batch).
        level: a level with lower levels.
        reference: an estimator (name, ``"name:options"`` string or object) used on every edge.
        warn_above: warn (`mlo.CheckWarning`) when ``rel_error`` exceeds this.
        dtype: the reference's dtype; ``None`` keeps the program's.
        estimator: check this estimator instead of the configured one, at the same state: one for
            every edge, or ``{edge: estimator}`` for some edges (the others keep theirs), as in
            `Engine.hypergradient`. E.g. ``estimator="cg:hessian=partial"`` measures the per-hop
            rule where the program trains with the exact one.

    Returns a `CheckReport`; see the module docstring for what is measured and what is kept.
    """
    engine.graph.require(level)
    if not engine.graph.lowers_of[level]:
        with_lowers = [name for name in engine.graph.levels if engine.graph.lowers_of[name]]
        raise ProgramError(f"level {level!r} has no lower levels, so no hypergradient to check; levels with lowers: {with_lowers}")
    if isinstance(warn_above, bool) or not isinstance(warn_above, (int, float)) or not warn_above >= 0:
        raise ConfigError(f"warn_above must be a number >= 0, got {warn_above!r}")
    ref = resolve(reference)
    involved = (level, *engine.graph.descendants(level))
    edges = [(v, low) for v in involved for low in engine.graph.lowers_of[v]]
    batches = {name: engine.batch(name) for name in involved}
    chosen: Mapping["Edge", "EstimatorSpec"] = {}
    if estimator is not None:
        chosen = estimator if isinstance(estimator, Mapping) else dict.fromkeys(edges, estimator)
        stray = [e for e in chosen if e not in edges]
        if stray:
            raise EstimatorError(f"estimator names edge(s) {stray} that {level!r}'s hypergradient does not use; edges: {edges}")
    configured = {e: resolve(chosen[e]) if e in chosen else engine.estimators[e] for e in edges}
    for (_, lower), est in configured.items():
        est.check(engine.program.problems[lower])

    with _untouched(engine), warnings.catch_warnings():
        # the report carries the solvers' diagnostics; their warnings would only repeat them
        warnings.simplefilter("ignore", ConvergenceWarning)
        estimate, estimator_seconds, estimator_info = _evaluate(engine, level, configured, batches)
        notes: list[str] = []
        failure = None if dtype is None else _fails_in(engine, involved, batches, dtype)
        if dtype is not None and failure is not None:
            notes.append(
                f"level {failure[0]!r}'s loss fails in {_dtype_name(dtype)} ({failure[1][:120]}): it reads tensors that belong "
                "to no level's module or batch (data in a closure?); the reference is in the program's dtype"
            )
            dtype = None
        truth, reference_seconds, reference_info, per_edge = _reference(engine, level, ref, configured, batches, dtype)
        if len(edges) == 1:  # the one edge's share is the whole: no second evaluation
            per_edge = [EdgeCheck(*edges[0], configured[edges[0]], *_compare(estimate, truth), estimator_info.get(edges[0], {}), reference_info.get(edges[0], {}))]

    flags = [e.reference_converged for e in per_edge if e.reference_converged is not None]
    rel_error, cosine = _compare(estimate, truth)
    report = CheckReport(
        level, ref, estimate[0].dtype if dtype is None else dtype, rel_error, cosine, estimator_seconds,
        reference_seconds, all(flags) if flags else None, tuple(per_edge), tuple(estimate), tuple(truth), tuple(notes),
    )
    _warn(report, warn_above)
    return report


def describe(estimator: Estimator) -> str:
    """``"name:option=value,..."`` with the options that differ from their defaults."""
    default = type(estimator)()
    changed = [f"{k}={v}" for k, v in estimator.options().items() if getattr(default, k) != v]
    return estimator.name + (":" + ",".join(changed) if changed else "")


# ---------------------------------------------------------------------------------------------- helpers


def _reference(
    engine: "Engine",
    level: str,
    ref: Estimator,
    configured: Mapping["Edge", Estimator],
    batches: Mapping[str, Any],
    dtype: torch.dtype | None,
) -> tuple[list[Tensor], float, dict["Edge", dict[str, float]], list[EdgeCheck]]:
    """The reference in ``dtype``, its time and diagnostics, and each edge's share of the error
    (that edge on its configured estimator, the others on the reference; several edges only)."""
    edges = list(configured)
    with _converted(engine, engine.graph.levels, dtype):  # every level: a loss may read any of them
        wide = _convert(batches, dtype)
        truth, seconds, info = _evaluate(engine, level, dict.fromkeys(edges, ref), wide)
        per_edge = []
        for edge in edges if len(edges) > 1 else ():
            mixed = {e: (configured[e] if e == edge else ref) for e in edges}
            alone, _, alone_info = _evaluate(engine, level, mixed, wide)
            per_edge.append(EdgeCheck(*edge, configured[edge], *_compare(alone, truth), alone_info.get(edge, {}), info.get(edge, {})))
    return truth, seconds, info, per_edge


def _fails_in(
    engine: "Engine", levels: Sequence[str], batches: Mapping[str, Any], dtype: torch.dtype
) -> tuple[str, str] | None:
    """The first of ``levels`` whose loss raises when its modules and batch are in ``dtype`` (every
    level's modules converted, as for the reference), with the error's message; ``None`` when
    every loss evaluates. The losses already ran in the program's dtype (the configured estimate),
    so a failure here is the conversion's. Nothing moves: every buffer is put back."""
    rng = _rng_state()
    try:
        with frozen_buffers(engine.program.buffers()), _converted(engine, engine.graph.levels, dtype), torch.no_grad():
            for name in levels:
                try:
                    engine.program.problems[name].loss(_convert(batches[name], dtype))
                except RuntimeError as err:
                    return name, " ".join(str(err).split())
    finally:
        _set_rng_state(rng)
    return None


def _evaluate(
    engine: "Engine", level: str, estimators: Mapping["Edge", Estimator], batches: Mapping[str, Any]
) -> tuple[list[Tensor], float, dict["Edge", dict[str, float]]]:
    """The hypergradient with ``estimators`` on ``batches``, its wall time, and the diagnostics it
    left; each evaluation starts from the same random generator state (restored by the caller)."""
    rng = _rng_state()
    engine.diagnostics.by_edge.clear()  # so that what is read below is this evaluation's
    _synchronize(engine)
    start = time.perf_counter()
    grads = engine.hypergradient(level, estimator=dict(estimators), batches=batches)
    _synchronize(engine)
    seconds = time.perf_counter() - start
    info = {edge: dict(engine.diagnostics.by_edge.get(edge, {})) for edge in estimators}
    _set_rng_state(rng)
    return grads, seconds, info


def _compare(got: Sequence[Tensor], want: Sequence[Tensor]) -> tuple[float, float]:
    """Relative error ``|got - want| / |want|`` and cosine of the flattened lists, in float64."""
    g = torch.cat([t.detach().reshape(-1).to(torch.float64).cpu() for t in got])
    w = torch.cat([t.detach().reshape(-1).to(torch.float64).cpu() for t in want])
    gn, wn = float(g.norm()), float(w.norm())
    diff = float((g - w).norm())
    rel = diff / wn if wn > 0 else (0.0 if diff == 0 else math.inf)
    cos = float(g @ w) / (gn * wn) if gn > 0 and wn > 0 else (1.0 if gn == wn else 0.0)
    return rel, cos


def _warn(report: CheckReport, threshold: float) -> None:
    ref = describe(report.reference)
    if report.reference_converged is False:
        warnings.warn(
            f"mlo.check: the {ref} reference for level {report.level!r} did not converge, so the errors measured "
            "against it are not errors against the truth; an indefinite lower Hessian is the usual cause "
            "(try reference='unroll:steps=500', or a reference with damping)",
            CheckWarning,
            stacklevel=3,
        )
    elif report.rel_error > threshold:
        worst = max(report.edges, key=lambda e: e.rel_error)
        warnings.warn(
            f"mlo.check: the hypergradient of level {report.level!r} is {report.rel_error:.3g} off the {ref} "
            f"reference in relative norm (threshold {threshold:g}, cosine {report.cosine:.3f}); edge "
            f"{worst.upper!r} -> {worst.lower!r} with {describe(worst.estimator)} contributes the most ({worst.rel_error:.3g})",
            CheckWarning,
            stacklevel=3,
        )


def _info(info: dict[str, float]) -> str:
    shown = []
    for key, value in info.items():
        if key in ("converged", "negative_curvature"):
            if value:
                shown.append(key.replace("_", " ") if key != "converged" else "converged")
            elif key == "converged":
                shown.append("NOT converged")
        else:
            shown.append(f"{key} {value:.3g}")
    return ", ".join(shown)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _synchronize(engine: "Engine") -> None:
    devices = {p.device for params in engine.program.params.values() for p in params if p.device.type == "cuda"}
    for device in devices:
        torch.cuda.synchronize(device)


def _rng_state() -> tuple[Tensor, list[Tensor]]:
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    return torch.get_rng_state(), cuda


def _set_rng_state(state: tuple[Tensor, list[Tensor]]) -> None:
    torch.set_rng_state(state[0])
    if state[1]:
        torch.cuda.set_rng_state_all(state[1])


@contextmanager
def _untouched(engine: "Engine") -> Iterator[None]:
    """Put back what evaluating hypergradients can change besides parameters and buffers (which
    the engine restores itself): the engine's diagnostics and the random generators."""
    diagnostics = dict(engine.diagnostics.by_edge)
    rng = _rng_state()
    try:
        yield
    finally:
        engine.diagnostics.by_edge.clear()
        engine.diagnostics.by_edge.update(diagnostics)
        _set_rng_state(rng)


def _convert(value: Any, dtype: torch.dtype | None) -> Any:
    """``value`` with every floating-point tensor in it (through tuples, lists and dicts) as
    ``dtype``; other values as they are."""
    if dtype is None:
        return value
    if isinstance(value, Tensor):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # a named tuple
        return type(value)(*(_convert(v, dtype) for v in value))
    if isinstance(value, (tuple, list)):
        return type(value)(_convert(v, dtype) for v in value)
    if isinstance(value, dict):
        return {k: _convert(v, dtype) for k, v in value.items()}
    return value


@contextmanager
def _converted(engine: "Engine", levels: Sequence[str], dtype: torch.dtype | None) -> Iterator[None]:
    """The modules of ``levels`` (parameters and buffers) in ``dtype``, and ``dtype`` the default,
    inside the block; the original tensors are put back on exit."""
    if dtype is None:
        yield
        return
    modules: dict[int, nn.Module] = {}
    for name in levels:
        for sub in engine.program.problems[name].module.modules():
            modules.setdefault(id(sub), sub)
    params: dict[int, tuple[nn.Parameter, Tensor]] = {}
    buffers: list[tuple[nn.Module, str, Tensor]] = []
    default = torch.get_default_dtype()
    try:
        for sub in modules.values():
            for p in sub._parameters.values():
                if p is not None and p.is_floating_point() and id(p) not in params:
                    params[id(p)] = (p, p.data)
                    p.data = p.data.to(dtype)
            for key, b in sub._buffers.items():
                if b is not None and b.is_floating_point():
                    buffers.append((sub, key, b))
                    sub._buffers[key] = b.to(dtype)
        torch.set_default_dtype(dtype)
        yield
    finally:
        torch.set_default_dtype(default)
        for p, data in params.values():
            p.data = data
        for sub, key, b in buffers:
            sub._buffers[key] = b
