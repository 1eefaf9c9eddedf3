"""The ``estimators`` suite: each registered estimator's accuracy against its cost, on known answers.

Programs (`benchmarks.references`, float64): ridge HPO over several dimensions and condition
numbers, a 3-level quadratic chain (twice: the middle level's loss reading the bottom level or
not; where it does, ``cg`` and ``neumann`` also run with ``hessian="partial"``, the per-hop
rule), and logistic-regression HPO on digits against a reference
from an exact solve. Lower levels sit at their exact optimum, so every estimator is judged on
what it approximates, not on how far the lower level is from converged.

For every registered estimator, its options are swept (iterations of ``cg`` and ``neumann``,
steps of ``unroll``; estimators without such an option run once at their defaults), and each
setting reports: relative error ``||g - g*|| / ||g*||`` and cosine similarity with the exact
hypergradient ``g*``; Hessian-vector products as mlo reports them in
``engine.diagnostics.by_edge`` (summed over edges; absent for estimators that report none);
the number of lower-level loss evaluations (counted by the suite); wall time of
``engine.hypergradient`` (median of repeats) and its peak tensor memory. A table, a JSON file
and a PNG (error against HVPs, and against wall time, per program) come out.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

import mlo
from mlo import estimators

from .references import KnownAnswer, chain_problem, logistic_problem, ridge_problem
from .report import make_console, print_tables, results_table
from .timing import MEMORY_METHOD, Result, peak_memory_mb, summary, write_json

__all__ = ["sweep", "programs", "evaluate", "run"]

#: the option each estimator is swept over (estimators not listed run once at their defaults)
SWEPT = {"cg": "iterations", "neumann": "iterations", "unroll": "steps"}


@dataclass(frozen=True)
class Setting:
    """One estimator configuration; ``alpha_from_lipschitz``: Neumann's step is ``1 / L``."""

    name: str
    options: tuple[tuple[str, Any], ...] = ()

    def estimator(self, known: KnownAnswer) -> mlo.estimators.Estimator:
        options = dict(self.options)
        if self.name == "neumann":
            options.setdefault("alpha", 1.0 / known.lipschitz)
        return estimators.get(self.name, **options)

    def label(self) -> str:
        return self.name if not self.options else f"{self.name}(" + ",".join(f"{k}={v}" for k, v in self.options) + ")"

    @property
    def series(self) -> str:
        """The line this setting belongs to in the figure: its estimator, and the per-hop rule apart."""
        return f"{self.name} (hessian=partial)" if dict(self.options).get("hessian") == "partial" else self.name


def sweep(name: str, known: KnownAnswer, quick: bool = False) -> list[Setting]:
    """The settings of estimator ``name`` to run on ``known``."""
    option = SWEPT.get(name)
    if option is None:
        return [Setting(name)]
    if name == "cg":
        grid = [1, 2, 5, 10, 20, 50, 100, 200, 400]
        grid = sorted({v for v in grid if v < 2 * known.dim} | {known.dim})
    elif name == "neumann":
        grid = [1, 10, 100] if quick else [1, 3, 10, 30, 100, 300, 1000, 3000]
        if known.partial_differs:  # the exact rule nests the series: n terms cost ~2 n^2 products
            grid = [v for v in grid if v <= 30]
    else:  # unroll: its graphs grow with the steps (and nest on chains)
        grid = [1, 10] if quick else [1, 3, 10, 30, 100]
        if known.top == "top":
            grid = [v for v in grid if v <= 10]
    settings = [Setting(name, ((option, v),)) for v in grid]
    if known.partial_differs and name in ("cg", "neumann"):  # the per-hop rule beside the exact one
        settings += [Setting(name, ((option, v), ("hessian", "partial"))) for v in grid]
    return settings


def programs(quick: bool = False) -> list[KnownAnswer]:
    """The known-answer programs; ``quick`` keeps a few small ones."""
    if quick:
        return [ridge_problem(10, 100.0), chain_problem(4, 10.0)]
    return [
        *(ridge_problem(d, c) for d in (5, 20, 50) for c in (10.0, 1000.0)),
        chain_problem(8, 20.0),
        chain_problem(8, 20.0, coupling=1.0),
        logistic_problem(500),
    ]


def _counting(problems: Sequence[mlo.Problem], top: str) -> list[int]:
    """Count loss evaluations of every level but ``top`` (their ``loss`` is wrapped in place)."""
    count = [0]
    for p in problems:
        if p.name == top:
            continue
        inner: Callable[[Any], torch.Tensor] = p.loss

        def loss(batch: Any, inner: Callable[[Any], torch.Tensor] = inner) -> torch.Tensor:
            count[0] += 1
            return inner(batch)

        p.loss = loss  # type: ignore[method-assign]
    return count


def evaluate(known: KnownAnswer, setting: Setting, repeats: int = 3, memory: bool = True) -> Result:
    """Run one estimator setting on one known answer; the Result's ``extra`` holds the accuracy."""
    problems, graph = known.build()
    calls = _counting(problems, known.top)
    engine = mlo.Engine(problems, graph, setting.estimator(known))
    samples = []
    got = engine.hypergradient(known.top)  # warm-up, untimed
    for _ in range(repeats):
        calls[0] = 0
        t0 = time.perf_counter()
        got = engine.hypergradient(known.top)
        samples.append(time.perf_counter() - t0)
    loss_calls = calls[0]
    reported = [info["hvps"] for info in engine.diagnostics.by_edge.values() if "hvps" in info]
    peak = peak_memory_mb(lambda: engine.hypergradient(known.top)) if memory else float("nan")
    g = torch.cat([t.reshape(-1) for t in got])
    ref = torch.cat([t.reshape(-1) for t in known.reference])
    error = float((g - ref).norm() / ref.norm())
    denom = float(g.norm() * ref.norm())
    cosine = float(g @ ref) / denom if denom > 0 else 0.0
    med, q1, q3 = summary(samples)
    extra = {
        "estimator": setting.name,
        "series": setting.series,
        "options": dict(setting.options),
        "relative_error": error,
        "cosine": cosine,
        "hvps": float(sum(reported)) if reported else None,
        "loss_calls": loss_calls,
        "dim": known.dim,
        "condition": known.condition,
    }
    return Result(known.name, setting.label(), setting.name, med, q1, q3, q3 - q1, peak, samples, extra=extra)


def run(quick: bool = False, json_path: str | Path | None = None, png_path: str | Path | None = None,
        console: Console | None = None, names: Sequence[str] | None = None) -> list[Result]:
    """Run the suite over ``names`` (default: every registered estimator); print, write JSON/PNG."""
    console = console or make_console()
    names = list(names) if names is not None else estimators.names()
    results: list[Result] = []
    knowns = programs(quick)
    for known in knowns:
        console.log(f"estimators: {known.name} (dim {known.dim}, condition {known.condition:.3g})")
        for name in names:
            for setting in sweep(name, known, quick):
                try:
                    results.append(evaluate(known, setting, repeats=1 if quick else 3))
                except mlo.MLOError as err:  # e.g. a diverging Neumann series: reported, not fatal
                    results.append(Result(known.name, setting.label(), setting.name, math.nan, math.nan, math.nan,
                                          math.nan, math.nan, [], note=f"{type(err).__name__}: {err}",
                                          extra={"estimator": setting.name, "options": dict(setting.options),
                                                 "relative_error": math.nan, "cosine": math.nan, "hvps": None}))
    print_tables(results_table(results, "estimators: error against cost (lower levels at their optimum)",
                               ("relative_error", "cosine", "hvps", "loss_calls"), show_algorithm=False), console=console)
    if png_path is not None:
        from .plot import error_against_cost

        error_against_cost(results, png_path)
        console.log(f"estimators: plot written to {png_path}")
    if json_path is not None:
        config = {
            "quick": quick,
            "programs": [{"name": k.name, "dim": k.dim, "condition": k.condition, "lipschitz": k.lipschitz}
                         for k in knowns],
            "estimators": names,
            "sweeps": {n: SWEPT.get(n, "defaults") for n in names},
            "neumann_alpha": "1 / L (largest eigenvalue of the lower Hessians)",
            "lower_lr": "1 / L (SGD; the step finite_difference and unroll take)",
            "memory": MEMORY_METHOD,
            "torch_threads": torch.get_num_threads(),
        }
        write_json(json_path, "estimators", config, results, png=str(png_path) if png_path else None)
    return results
