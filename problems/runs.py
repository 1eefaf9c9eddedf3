"""What the small programs of `mlo run` share: seeded batches, test error, and a results table of
mean ± std over seeds written as JSON, with each method's paired difference to the baselines
(`paired_difference`: seed s gives every method the same data, corruption and initialisation, so
the per-seed differences carry the comparison). LFM-CW has its own runner, with search and
evaluation phases, and its benchmark reports the same paired differences."""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table
from torch import nn
from torch.utils.data import DataLoader, Dataset

from mlo.config import ConfigError

from .data import balanced_error, error

__all__ = ["loader", "evaluate", "compare", "compare_config", "paired_difference", "markdown", "output_dir"]


def loader(dataset: Dataset, batch_size: int, seed: int) -> DataLoader:
    """Shuffled batches of ``dataset``, in an order fixed by ``seed``; the last partial batch dropped."""
    return DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=True,
                      generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def evaluate(model: nn.Module, dataset: Dataset, num_classes: int) -> dict[str, float]:
    """Test error and balanced (mean per-class) error of ``model`` on ``dataset``, in percent."""
    x, y = next(iter(DataLoader(dataset, batch_size=len(dataset))))  # type: ignore[arg-type]
    was_training = model.training
    model.eval()
    preds = model(x).argmax(1)
    model.train(was_training)
    return {"test_error": error(preds, y), "balanced_error": balanced_error(preds, y, num_classes)}


def compare_config(title: str, config: Any, run_one: Callable[[Any, str, int], dict[str, float]],
                   baselines: Sequence[str] = ()) -> dict[str, Any]:
    """`compare` driven by a program's config dataclass, whose fields ``methods``, ``seeds``, ``out``
    and ``threads`` (0: torch's default) it reads; ``run_one(config, method, seed)``."""
    if config.threads:
        torch.set_num_threads(config.threads)
    return compare(title, config.methods, config.seeds, lambda m, s: run_one(config, m, s), config.out,
                   dataclasses.asdict(config), baselines=baselines)


def paired_difference(values: Sequence[float], reference: Sequence[float]) -> dict[str, float]:
    """Mean, std and 95 % confidence interval (Student t, n - 1 degrees of freedom) of
    ``values[i] - reference[i]`` over paired seeds (NaN interval for one pair)."""
    if len(values) != len(reference) or not values:
        raise ValueError(f"paired_difference needs equal, non-empty lists, got {len(values)} and {len(reference)}")
    diffs = [a - b for a, b in zip(values, reference)]
    n = len(diffs)
    mean = statistics.fmean(diffs)
    std = statistics.stdev(diffs) if n > 1 else float("nan")
    if n > 1:
        from scipy.stats import t  # scipy comes with scikit-learn

        half = float(t.ppf(0.975, n - 1)) * std / math.sqrt(n)
    else:
        half = float("nan")
    return {"mean": mean, "std": std, "ci_low": mean - half, "ci_high": mean + half, "n": float(n)}


def compare(
    title: str,
    methods: Sequence[str],
    seeds: int,
    run_one: Callable[[str, int], dict[str, float]],
    out: str | None,
    config: dict[str, Any],
    console: Console | None = None,
    baselines: Sequence[str] = (),
) -> dict[str, Any]:
    """``run_one(method, seed)`` for every method and seed 0..seeds-1; prints the mean ± std of each
    metric per method and, for each of ``baselines`` that was run, every other method's paired
    difference ``method - baseline`` per metric (mean [95 % CI] over the seeds); writes
    ``results.json`` (config, per-run metrics, summary) to ``out``. Methods may report different
    metrics (a diagnostic only one method has): each is summarised where present."""
    console = console or Console()
    folder = output_dir(out) if out is not None else None  # refused before any run, not after
    runs: list[dict[str, Any]] = []
    for method in methods:
        for seed in range(seeds):
            start = time.perf_counter()
            metrics = run_one(method, seed)
            runs.append({"method": method, "seed": seed, "seconds": time.perf_counter() - start, **metrics})
            console.log(f"{title}: {method} seed {seed}: " + ", ".join(f"{k} {v:.2f}" for k, v in metrics.items()))
    names = _metric_names(runs)
    summary = [_summary(method, [r for r in runs if r["method"] == method], names,
                        {b: [r for r in runs if r["method"] == b] for b in baselines if b in methods and b != method})
               for method in methods]
    table = Table(title=title)
    for col in _columns(names, summary):
        table.add_column(col, justify="left" if col == "method" else "right")
    for row in _cells(names, summary):
        table.add_row(*row)
    console.print(table)
    result = {"config": config, "runs": runs, "summary": summary}
    console.print(markdown(result), markup=False, highlight=False, soft_wrap=True)
    if folder is not None:
        path = folder / "results.json"
        path.write_text(json.dumps(result, indent=2))
        console.print(f"results: {path}")
    return result


def _metric_names(runs: list[dict[str, Any]]) -> list[str]:
    return list(dict.fromkeys(k for r in runs for k in r if k not in ("method", "seed")))


def _summary(method: str, mine: list[dict[str, Any]], names: list[str], baselines: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    row: dict[str, Any] = {"method": method, "seeds": len(mine)}
    for key in names:
        values = [float(r[key]) for r in mine if key in r]
        if values:
            row[key] = statistics.fmean(values)
            row[key + "_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
    paired: dict[str, dict[str, dict[str, float]]] = {}
    for baseline, theirs in baselines.items():
        by_seed = {r["seed"]: r for r in theirs}
        shared = [r for r in mine if r["seed"] in by_seed]
        paired[baseline] = {
            key: paired_difference([float(r[key]) for r in shared], [float(by_seed[r["seed"]][key]) for r in shared])
            for key in names if key != "seconds" and shared and all(key in r and key in by_seed[r["seed"]] for r in shared)
        }
    if paired:
        row["paired"] = paired
    return row


def _delta_columns(names: list[str], summary: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """(baseline, metric) of the paired differences shown: the first metric against each baseline."""
    first = next((k for k in names if k != "seconds"), None)
    baselines = list(dict.fromkeys(b for row in summary for b in row.get("paired", {})))
    return [(b, first) for b in baselines] if first is not None else []


def _columns(names: list[str], summary: list[dict[str, Any]]) -> list[str]:
    return ["method", "seeds", *names, *(f"Δ {k} vs {b} [95 % CI]" for b, k in _delta_columns(names, summary))]


def _cells(names: list[str], summary: list[dict[str, Any]]) -> list[list[str]]:
    def delta(row: dict[str, Any], baseline: str, key: str) -> str:
        d = row.get("paired", {}).get(baseline, {}).get(key)
        return f"{d['mean']:+.2f} [{d['ci_low']:+.2f}, {d['ci_high']:+.2f}]" if d else "—"

    return [
        [row["method"], str(row["seeds"]),
         *(f"{row[k]:.2f} ± {row[k + '_std']:.2f}" if k in row else "—" for k in names),
         *(delta(row, b, k) for b, k in _delta_columns(names, summary))]
        for row in summary
    ]


def markdown(result: dict[str, Any]) -> str:
    """What `compare` returned as a Markdown table (the rows of its printed table)."""
    names, summary = _metric_names(result["runs"]), result["summary"]
    columns = _columns(names, summary)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in _cells(names, summary)])


def output_dir(out: str) -> Path:
    """``out`` created; a folder that already holds ``results.json`` is refused (no overwriting)."""
    path = Path(out)
    if (path / "results.json").exists():
        raise ConfigError(f"out: {str(path)!r} already holds results.json; choose another --out")
    path.mkdir(parents=True, exist_ok=True)
    return path
