"""The ``lfm-cw`` suite: LFM-CW against DARTS second order and its ablations, balanced and long-
tailed (rho = 10), several paired seeds, on the same budget and code path (`mlo run`).

Paired: seed s gives every method the same data split, the same initialisation and the same
pretrained generator (`mlo run` caches it per data set and seed). So the suite reports, besides
each method's mean ± std, the paired difference ``method - lfm-cw`` over seeds with its 95 %
confidence interval (Student t on n - 1 degrees of freedom), for the test error and the balanced
(mean per-class) error. A difference whose interval lies above zero means ``lfm-cw`` is better.

``--dataset digits`` (default) or ``fashion-mnist`` picks the data set; the runs land in
``out/lfm-cw/<data>``. Each (data set, method) becomes one `Result`: ``median_s`` is the median
search time of a run, ``extra`` the errors (every seed's), and the paired differences.
``--quick``: 2 methods, 1 seed, a few rounds (the tests).
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
from mlo.problems.runs import paired_difference

from .timing import Result, summary, write_json

__all__ = [
    "run", "METHODS_COMPARED", "FASHION_CPU", "FASHION_TRAIN_PER_CLASS", "paired_difference", "markdown", "results_of", "report",
]

REFERENCE = "lfm-cw"
METHODS_COMPARED = ["lfm-cw", "darts-2nd", "lfm-cw-uniform", "lfm-cw-aug"]
QUICK = dict(
    search_rounds=2, batch_size=16, layers=1, eval_epochs=1, eval_layers=1, eval_channels=4,
    synthetic_per_step=8, generator_warmup=20, w1_warmup=2,
)
#: The CPU budget of the Fashion-MNIST comparison (5 seeds x 4 methods x 2 data sets in about 1.5
#: hours on one thread of a shared, busy 2-core machine): 14x14 images, 200 test images per class,
#: DARTS cells with 2 intermediate nodes (5 edges), 6 search rounds after 100 steps of W1 alone
#: (about 6 epochs of the long-tailed set: after 10 steps W1's mistakes were still at chance),
#: the cVAE pretrained for 1500 batches, evaluation 2 epochs of an 8-channel 3-cell network.
#: Training data: the long-tailed set starts from 250 images per class (125 search-train + 125
#: search-val, then rho = 10: 1010 images); the balanced set has 100 per class (1000 images), so
#: both have the same size and differ only in their class profile.
FASHION_CPU = dict(
    seeds=5, search_rounds=6, batch_size=32, synthetic_per_step=32, cell_steps=2, w1_warmup=100,
    test_per_class=200, generator_warmup=1500, eval_epochs=2, eval_channels=8, eval_layers=3,
)
FASHION_TRAIN_PER_CLASS = {"long-tailed": 250, "balanced": 100}


def _stats(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _config(quick: bool, dataset: str, imbalance: float | None, out: Path, overrides: dict[str, Any]) -> RunConfig:
    base = RunConfig(methods=list(METHODS_COMPARED), dataset=dataset, imbalance=imbalance, out=str(out))
    if quick:
        base = dataclasses.replace(base, methods=["lfm-cw", "darts-1st"], seeds=1, **QUICK)  # type: ignore[arg-type]
    elif dataset == "fashion-mnist":
        per_class = FASHION_TRAIN_PER_CLASS["balanced" if imbalance is None else "long-tailed"]
        base = dataclasses.replace(base, **FASHION_CPU, train_per_class=per_class)  # type: ignore[arg-type]
    else:
        base = dataclasses.replace(base, seeds=5)
    return base.updated(overrides, source="--set")


def _fmt(d: dict[str, float]) -> str:
    return f"{d['mean']:+.2f} [{d['ci_low']:+.2f}, {d['ci_high']:+.2f}]"


def markdown(results: list[Result]) -> str:
    """The comparison as a Markdown table (for the README)."""
    lines = [
        "| data | method | seeds | test error % | balanced error % | Δ test vs lfm-cw [95 % CI] | Δ balanced vs lfm-cw [95 % CI] |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        e = r.extra
        dt, db = e.get("paired_test"), e.get("paired_balanced")
        lines.append(
            f"| {r.problem} | {r.impl} | {e['seeds']} | {e['test_error_mean']:.2f} ± {e['test_error_std']:.2f} | "
            f"{e['balanced_error_mean']:.2f} ± {e['balanced_error_std']:.2f} | {_fmt(dt) if dt else '—'} | {_fmt(db) if db else '—'} |"
        )
    return "\n".join(lines)


def results_of(name: str, runs: list[dict[str, Any]], methods: list[str], estimator: str | None = None,
               gates: dict[str, Any] | None = None) -> list[Result]:
    """One `Result` per method from the ``runs`` of `mlo run` on data set ``name`` (also on a partial
    results.json: paired differences use the seeds both methods finished)."""
    by_method = {m: {int(r["seed"]): r for r in runs if r["method"] == m} for m in methods}
    reference = by_method.get(REFERENCE)
    results = []
    for method in methods:
        mine = [by_method[method][k] for k in sorted(by_method[method])]
        if not mine:
            continue
        seconds = [float(r["search_seconds"]) for r in mine]
        test = [float(r["test_error"]) for r in mine]
        balanced = [float(r["balanced_error"]) for r in mine]
        median, q1, q3 = summary(seconds)
        (tm, ts), (bm, bs) = _stats(test), _stats(balanced)
        extra: dict[str, Any] = {
            "test_error_mean": tm, "test_error_std": ts, "balanced_error_mean": bm, "balanced_error_std": bs,
            "test_errors": test, "balanced_errors": balanced, "seeds": len(mine), "gates": gates or {},
        }
        shared = sorted(set(by_method[method]) & set(reference or {}))
        if reference is not None and method != REFERENCE and shared:
            for key, label in (("test_error", "paired_test"), ("balanced_error", "paired_balanced")):
                extra[label] = paired_difference(
                    [float(by_method[method][k][key]) for k in shared], [float(reference[k][key]) for k in shared]
                )
        results.append(Result(
            problem=name, impl=method, algorithm=estimator or METHODS[method].estimator,
            median_s=median, q1_s=q1, q3_s=q3, iqr_s=q3 - q1, peak_mb=float("nan"), samples_s=seconds, extra=extra,
        ))
    return results


def report(results: list[Result], console: Console) -> None:
    """Print the comparison table and its Markdown version."""
    table = Table(title="mlo bench lfm-cw: error of the searched architecture (%), mean ± std over seeds; "
                        "paired difference to lfm-cw, mean [95 % CI] (> 0: lfm-cw better)")
    for col in ("data", "method", "seeds", "test error", "balanced error", "Δ test", "Δ balanced", "search s"):
        table.add_column(col, justify="left" if col in ("data", "method") else "right")
    for r in results:
        e = r.extra
        dt, db = e.get("paired_test"), e.get("paired_balanced")
        table.add_row(r.problem, r.impl, str(e["seeds"]), f"{e['test_error_mean']:.2f} ± {e['test_error_std']:.2f}",
                      f"{e['balanced_error_mean']:.2f} ± {e['balanced_error_std']:.2f}",
                      _fmt(dt) if dt else "—", _fmt(db) if db else "—", f"{r.median_s:.1f}")
    console.print(table)
    console.print(markdown(results), markup=False, highlight=False)


def run(quick: bool = False, json_path: str | Path | None = None, out: str | Path | None = None,
        console: Console | None = None, overrides: dict[str, Any] | None = None, dataset: str = "digits") -> list[Result]:
    """Run the suite on ``dataset``, long-tailed first (the comparison that matters), then balanced;
    print the tables; write ``json_path``. ``overrides``: options of every run's `RunConfig`."""
    console = console or Console()
    root = Path(out or "runs/bench") / "lfm-cw"
    results: list[Result] = []
    configs: dict[str, Any] = {}
    for name, rho in ((f"{dataset}-lt10", 5.0 if quick else 10.0), (dataset, None)):
        config = _config(quick, dataset, rho, root / name, overrides or {})
        configs[name] = config.to_dict()
        outcome = run_experiment(config, console)
        results += results_of(name, outcome["runs"], config.methods, config.estimator, outcome.get("gates"))
    report(results, console)
    if json_path is not None:
        write_json(json_path, "lfm-cw", {"quick": quick, "dataset": dataset, "runs": configs}, results)
    return results
