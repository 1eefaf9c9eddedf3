"""What the small programs of `mlo run` share: seeded batches, test error, and a results table of
mean ± std over seeds, paired differences to a reference method (seed s gives every method the
same data, corruption and initialisation), written as JSON and printed as Markdown; how well
learned example weights separate clean from harmful examples. (LFM-CW has its own runner, with
search and evaluation phases; its benchmark reports the same paired differences.)"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
import time
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from mlo.config import ConfigError

from .metrics import balanced_error, error

__all__ = ["loader", "evaluate", "compare", "compare_config", "paired_difference", "interval", "fitted_table", "markdown", "separation",
           "output_dir"]


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


def check_methods(methods: Sequence[str], known: Collection[str], reference: str | None = None) -> None:
    """A config's ``methods`` (non-empty, each one of ``known``) and its ``reference`` (one of
    ``methods``), or `ConfigError` naming what is wrong."""
    unknown = [m for m in methods if m not in known]
    if not methods or unknown:
        raise ConfigError(f"unknown method(s) {unknown or list(methods)}; methods: {', '.join(known)}")
    if reference is not None and reference not in methods:
        raise ConfigError(f"reference {reference!r} is not among the methods {list(methods)}")


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
    console = console or Console(log_path=False)  # log lines without this file's name and line
    folder = output_dir(out) if out is not None else None  # refused before any run, not after
    runs: list[dict[str, Any]] = []
    for method in methods:
        for seed in range(seeds):
            start = time.perf_counter()
            metrics = run_one(method, seed)
            runs.append({"method": method, "seed": seed, "seconds": time.perf_counter() - start, **metrics})
            console.log(f"{title}: {method} seed {seed}: " + ", ".join(f"{k} {v:.2f}" for k, v in metrics.items()))
    metrics_names = _metric_names(runs)
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
    result = {"config": config, "runs": runs, "summary": summary, "reference": reference}
    console.print(fitted_table(title, *_table(result), console))
    console.print(markdown(result), markup=False, highlight=False, soft_wrap=True)
    if folder is not None:
        path = folder / "results.json"
        path.write_text(json.dumps(result, indent=2))
        console.print(f"results: {path}")
    return result


def _metric_names(runs: list[dict[str, Any]]) -> list[str]:
    return list(dict.fromkeys(k for r in runs for k in r if k not in ("method", "seed")))


def _table(result: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """The columns and rows of `compare`'s table: each metric's mean ± std and, with a reference,
    the paired difference of the first metric after ``seconds``."""
    names, reference = _metric_names(result["runs"]), result.get("reference")
    first = next((k for k in names if k != "seconds"), names[0])
    delta = [f"Δ {first} vs {reference} [95 % CI]"] if reference is not None else []
    rows = []
    for row in result["summary"]:
        cells = [(f"{row[k]:.2f} ± {row[k + '_std']:.2f}" if row["seeds"] > 1 else f"{row[k]:.2f} ± —") if k in row else "—"
                 for k in names]
        if reference is not None:
            d = row.get("paired", {}).get(first)
            cells.append(interval(d) if d else "—")
        rows.append([row["method"], str(row["seeds"]), *cells])
    return ["method", "seeds", *names, *delta], rows


def interval(d: dict[str, float]) -> str:
    """A `paired_difference` as ``+mean [low, high]``; ``+mean [—]`` when there is no interval
    (one seed)."""
    if math.isnan(d["ci_low"]) or math.isnan(d["ci_high"]):
        return f"{d['mean']:+.2f} [—]"
    return f"{d['mean']:+.2f} [{d['ci_low']:+.2f}, {d['ci_high']:+.2f}]"


def fitted_table(title: str, columns: list[str], rows: list[list[str]], console: Console) -> Table:
    """``rows`` (a method each, ``columns[0]`` naming it) as a rich Table whose headers stay whole
    words: one row per method when that fits the console's width, else transposed (one row per
    column, one column per method), as in an 80-column pipe; a word longer than its column folds
    onto the next line rather than ending in '…'."""
    if _narrowest(columns, rows) <= console.width:
        return _rich_table(title, columns, rows)
    return _rich_table(title, [columns[0], *(r[0] for r in rows)], [[c, *(r[i] for r in rows)] for i, c in enumerate(columns) if i])


def _narrowest(columns: list[str], rows: list[list[str]]) -> int:
    """The width of a table of these columns where no word is cut: each column as wide as its
    longest word (in its header or cells), plus rich's padding and borders."""
    longest = [max(len(w) for text in (col.replace("_", " "), *(r[i] for r in rows)) for w in text.split() or [""])
               for i, col in enumerate(columns)]
    return sum(n + 3 for n in longest) + 1


def _rich_table(title: str, columns: list[str], rows: list[list[str]]) -> Table:
    table = Table(title=title)
    for i, col in enumerate(columns):
        header = col.replace("_", " ")
        table.add_column(header, justify="left" if i == 0 else "right", overflow="fold", min_width=max(map(len, header.split())))
    for cells in rows:
        table.add_row(*cells)
    return table


def markdown(result: dict[str, Any]) -> str:
    """What `compare` returned, as a Markdown table (the rows of its printed table)."""
    columns, rows = _table(result)
    return "\n".join(["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)] + ["| " + " | ".join(r) + " |" for r in rows])


def separation(weights: Tensor, harmful: Tensor) -> dict[str, float]:
    """Mean weight of the clean and of the harmful examples, and the AUC: the probability
    that a random clean example weighs more than a random harmful one (ties count half)."""
    clean, bad = weights[~harmful], weights[harmful]
    if len(bad) == 0 or len(clean) == 0:
        return {"weight_clean": float(clean.mean()) if len(clean) else float("nan"),
                "weight_harmful": float(bad.mean()) if len(bad) else float("nan"), "auc": float("nan")}
    above = (clean[:, None] > bad[None, :]).double().mean() + 0.5 * (clean[:, None] == bad[None, :]).double().mean()
    return {"weight_clean": float(clean.mean()), "weight_harmful": float(bad.mean()), "auc": float(above)}


def paired_difference(values: list[float], reference: list[float]) -> dict[str, float]:
    """Mean, std and 95 % CI (Student t on n - 1 degrees of freedom) of ``values[i] - reference[i]``
    over paired seeds; with one pair, std and the interval are NaN."""
    if len(values) != len(reference) or not values:
        raise ConfigError(f"paired_difference needs equal, non-empty lists, got {len(values)} and {len(reference)}")
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
