"""The ``lfm-cw`` suite: LFM-CW against DARTS first and second order and its ablations, on digits
and on long-tailed digits, several seeds, on the same budget and code path (`mlo run`).

Each (data set, method) becomes one `Result`: ``median_s`` is the median search time of a run,
``samples_s`` the search time of every seed, and ``extra`` the mean and standard deviation of the
test error and the balanced (mean per-class) error in percent, with every seed's values.
Memory is not measured here (the runs share one process); ``peak_mb`` is null.

Full size: 6 methods x 3 seeds x 2 data sets at `mlo run`'s digits budget (about 3-4 minutes a
run on a 2-core CPU, so about 2 hours). ``--quick``: 2 methods, 1 seed, a few rounds.
"""

from __future__ import annotations

import dataclasses
import statistics
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from mlo.problems.lfm_cw.config import RunConfig
from mlo.problems.lfm_cw.experiment import run as run_experiment
from mlo.problems.lfm_cw.methods import METHODS

from .timing import Result, summary, write_json

__all__ = ["run", "DATASETS"]

#: (name in the results, imbalance factor rho or None)
DATASETS: tuple[tuple[str, float | None], ...] = (("digits", None), ("digits-lt10", 10.0))
QUICK = dict(
    search_rounds=2, batch_size=16, layers=1, eval_epochs=1, eval_layers=1, eval_channels=4,
    synthetic_per_step=8, generator_warmup=2,
)


def _config(quick: bool, imbalance: float | None, out: Path, overrides: dict[str, Any]) -> RunConfig:
    methods = ["lfm-cw", "darts-1st"] if quick else list(METHODS)
    base = RunConfig(methods=methods, seeds=1 if quick else 3, imbalance=imbalance, out=str(out))
    base = dataclasses.replace(base, **QUICK) if quick else base
    return base.updated(overrides, source="--set")


def _stats(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def run(quick: bool = False, json_path: str | Path | None = None, out: str | Path | None = None,
        console: Console | None = None, overrides: dict[str, Any] | None = None) -> list[Result]:
    """Run the suite; print a table; write ``json_path``. Each data set's runs go to ``out/lfm-cw/<name>``.
    ``overrides``: options of every run's `RunConfig` (budget, seeds, methods, ...)."""
    console = console or Console()
    root = Path(out or "runs/bench") / "lfm-cw"
    results: list[Result] = []
    configs: dict[str, Any] = {}
    for name, rho in DATASETS:
        config = _config(quick, 5.0 if (quick and rho) else rho, root / name, overrides or {})
        configs[name] = config.to_dict()
        runs = run_experiment(config, console)["runs"]
        for method in config.methods:
            mine = [r for r in runs if r["method"] == method]
            seconds = [float(r["search_seconds"]) for r in mine]
            test = [float(r["test_error"]) for r in mine]
            balanced = [float(r["balanced_error"]) for r in mine]
            median, q1, q3 = summary(seconds)
            (tm, ts), (bm, bs) = _stats(test), _stats(balanced)
            results.append(Result(
                problem=name, impl=method, algorithm=config.estimator or METHODS[method].estimator,
                median_s=median, q1_s=q1, q3_s=q3, iqr_s=q3 - q1, peak_mb=float("nan"), samples_s=seconds,
                extra={"test_error_mean": tm, "test_error_std": ts, "balanced_error_mean": bm, "balanced_error_std": bs,
                       "test_errors": test, "balanced_errors": balanced, "seeds": len(mine)},
            ))
    table = Table(title="mlo bench lfm-cw: test error of the searched architecture (%), mean ± std over seeds")
    for col in ("data", "method", "seeds", "test error", "balanced error", "search s (median)"):
        table.add_column(col, justify="left" if col in ("data", "method") else "right")
    for r in results:
        e = r.extra
        table.add_row(r.problem, r.impl, str(e["seeds"]), f"{e['test_error_mean']:.2f} ± {e['test_error_std']:.2f}",
                      f"{e['balanced_error_mean']:.2f} ± {e['balanced_error_std']:.2f}", f"{r.median_s:.1f}")
    console.print(table)
    if json_path is not None:
        write_json(json_path, "lfm-cw", {"quick": quick, "runs": configs}, results)
    return results
