"""What the small programs of `mlo run` share: seeded batches, test error, and a results table of
mean ± std over seeds, paired differences to a reference method, written as JSON. (LFM-CW has
its own, with search and evaluation phases.)"""

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

__all__ = ["loader", "evaluate", "compare", "compare_config", "paired_difference", "output_dir"]


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


def compare_config(title: str, config: Any, run_one: Callable[[Any, str, int], dict[str, float]]) -> dict[str, Any]:
    """`compare` driven by a program's config dataclass, whose fields ``methods``, ``seeds``, ``out``,
    ``threads`` (0: torch's default) and, if it has one, ``reference`` it reads;
    ``run_one(config, method, seed)``."""
    if config.threads:
        torch.set_num_threads(config.threads)
    return compare(title, config.methods, config.seeds, lambda m, s: run_one(config, m, s), config.out,
                   dataclasses.asdict(config), reference=getattr(config, "reference", None))


def compare(
    title: str,
    methods: Sequence[str],
    seeds: int,
    run_one: Callable[[str, int], dict[str, float]],
    out: str | None,
    config: dict[str, Any],
    console: Console | None = None,
    reference: str | None = None,
) -> dict[str, Any]:
    """``run_one(method, seed)`` for every method and seed 0..seeds-1; prints the mean ± std of each
    metric per method (a metric some method does not report is left blank for it), and writes
    ``results.json`` (config, per-run metrics, summary) to ``out``.

    With ``reference`` (one of ``methods``), seeds are paired: every metric of every other method
    gets its difference ``method - reference`` over seeds (`paired_difference`) in the summary
    (``row["paired"][metric]``), and the table shows it for the first metric ``run_one`` reports."""
    if reference is not None and reference not in methods:
        raise ConfigError(f"reference {reference!r} is not among the methods {list(methods)}")
    console = console or Console()
    runs: list[dict[str, Any]] = []
    for method in methods:
        for seed in range(seeds):
            start = time.perf_counter()
            metrics = run_one(method, seed)
            runs.append({"method": method, "seed": seed, "seconds": time.perf_counter() - start, **metrics})
            console.log(f"{title}: {method} seed {seed}: " + ", ".join(f"{k} {v:.2f}" for k, v in metrics.items()))
    metrics_names = list(dict.fromkeys(k for r in runs for k in r if k not in ("method", "seed")))
    by_method = {m: [r for r in runs if r["method"] == m] for m in methods}
    summary = []
    for method in methods:
        mine = by_method[method]
        row: dict[str, Any] = {"method": method, "seeds": len(mine)}
        for key in metrics_names:
            if key not in mine[0]:
                continue
            values = [float(r[key]) for r in mine]
            row[key] = statistics.fmean(values)
            row[key + "_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        if reference is not None and method != reference:
            row["paired"] = {
                key: paired_difference([float(r[key]) for r in mine], [float(r[key]) for r in by_method[reference]])
                for key in metrics_names if key in mine[0] and key in by_method[reference][0]
            }
        summary.append(row)
    first = next((k for k in metrics_names if k != "seconds"), "seconds")  # the first metric run_one reports
    table = Table(title=title)
    delta = [f"Δ {first} vs {reference} [95 % CI]"] if reference is not None else []
    for col in ("method", "seeds", *metrics_names, *delta):
        table.add_column(col, justify="left" if col == "method" else "right")
    for row in summary:
        cells = [f"{row[k]:.2f} ± {row[k + '_std']:.2f}" if k in row else "—" for k in metrics_names]
        if reference is not None:
            d = row.get("paired", {}).get(first)
            cells.append(f"{d['mean']:+.2f} [{d['ci_low']:+.2f}, {d['ci_high']:+.2f}]" if d else "—")
        table.add_row(row["method"], str(row["seeds"]), *cells)
    console.print(table)
    result = {"config": config, "runs": runs, "summary": summary}
    if out is not None:
        path = output_dir(out) / "results.json"
        path.write_text(json.dumps(result, indent=2))
        console.print(f"results: {path}")
    return result


def paired_difference(values: list[float], reference: list[float]) -> dict[str, float]:
    """Mean, std and 95 % CI (Student t on n - 1 degrees of freedom) of ``values[i] - reference[i]``
    over paired seeds; with one pair, std and the interval are NaN."""
    if len(values) != len(reference) or not values:
        raise ValueError(f"paired_difference needs equal, non-empty lists, got {len(values)} and {len(reference)}")
    diffs = [a - b for a, b in zip(values, reference)]
    n = len(diffs)
    mean = statistics.fmean(diffs)
    std = statistics.stdev(diffs) if n > 1 else float("nan")
    if n > 1:
        from scipy.stats import t

        half = float(t.ppf(0.975, n - 1)) * std / math.sqrt(n)
    else:
        half = float("nan")
    return {"mean": mean, "std": std, "ci_low": mean - half, "ci_high": mean + half, "n": float(n)}


def output_dir(out: str) -> Path:
    """``out`` created; a folder that already holds ``results.json`` is refused (no overwriting)."""
    path = Path(out)
    if (path / "results.json").exists():
        raise ConfigError(f"out: {str(path)!r} already holds results.json; choose another --out")
    path.mkdir(parents=True, exist_ok=True)
    return path
