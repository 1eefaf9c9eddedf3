"""What the small programs of `mlo run` share: seeded batches, test error, and a results table of
mean ± std over seeds written as JSON. (LFM-CW has its own, with search and evaluation phases.)"""

from __future__ import annotations

import dataclasses
import json
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

__all__ = ["loader", "evaluate", "compare", "output_dir"]


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
    """`compare` driven by a program's config dataclass, whose fields ``methods``, ``seeds``, ``out``
    and ``threads`` (0: torch's default) it reads; ``run_one(config, method, seed)``."""
    if config.threads:
        torch.set_num_threads(config.threads)
    return compare(title, config.methods, config.seeds, lambda m, s: run_one(config, m, s), config.out,
                   dataclasses.asdict(config))


def compare(
    title: str,
    methods: Sequence[str],
    seeds: int,
    run_one: Callable[[str, int], dict[str, float]],
    out: str | None,
    config: dict[str, Any],
    console: Console | None = None,
) -> dict[str, Any]:
    """``run_one(method, seed)`` for every method and seed 0..seeds-1; prints the mean ± std of each
    metric per method, and writes ``results.json`` (config, per-run metrics, summary) to ``out``."""
    console = console or Console()
    runs: list[dict[str, Any]] = []
    for method in methods:
        for seed in range(seeds):
            start = time.perf_counter()
            metrics = run_one(method, seed)
            runs.append({"method": method, "seed": seed, "seconds": time.perf_counter() - start, **metrics})
            console.log(f"{title}: {method} seed {seed}: " + ", ".join(f"{k} {v:.2f}" for k, v in metrics.items()))
    metrics_names = [k for k in runs[0] if k not in ("method", "seed")]
    summary = []
    for method in methods:
        mine = [r for r in runs if r["method"] == method]
        row: dict[str, Any] = {"method": method, "seeds": len(mine)}
        for key in metrics_names:
            values = [float(r[key]) for r in mine]
            row[key] = statistics.fmean(values)
            row[key + "_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        summary.append(row)
    table = Table(title=title)
    for col in ("method", "seeds", *metrics_names):
        table.add_column(col, justify="left" if col == "method" else "right")
    for row in summary:
        table.add_row(row["method"], str(row["seeds"]), *(f"{row[k]:.2f} ± {row[k + '_std']:.2f}" for k in metrics_names))
    console.print(table)
    result = {"config": config, "runs": runs, "summary": summary}
    if out is not None:
        path = output_dir(out) / "results.json"
        path.write_text(json.dumps(result, indent=2))
        console.print(f"results: {path}")
    return result


def output_dir(out: str) -> Path:
    """``out`` created; a folder that already holds ``results.json`` is refused (no overwriting)."""
    path = Path(out)
    if (path / "results.json").exists():
        raise ConfigError(f"out: {str(path)!r} already holds results.json; choose another --out")
    path.mkdir(parents=True, exist_ok=True)
    return path
