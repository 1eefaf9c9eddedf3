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

``--compare`` (`compare`): the search comparison sized to resolve 1.5 points on long-tailed
Fashion-MNIST (rho = 10): `COMPARE_METHODS` on paired seeds, both weight copies warmed up, 50
rounds, every genotype trained with the same fixed evaluation seeds (averaged) and tested on the
full 10k test set; identical genotypes are evaluated once, so their paired difference is exactly
0. It reports each paired interval's half-width, the seeds that would bring it to 1.5 points, how
far each search moved from its initial architecture, and the genotypes' Hamming distances.

``--eval-noise`` (`eval_noise`): one fixed genotype trained with 3 evaluation seeds at several
lengths; the std over evaluation seeds at each length, and the shortest length on the plateau.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from mlo.problems import data as datasets
from mlo.problems.darts import Genotype
from mlo.problems.lfm_cw.config import ConfigError, RunConfig
from mlo.problems.lfm_cw.experiment import evaluate, genotype_distance
from mlo.problems.lfm_cw.experiment import run as run_experiment
from mlo.problems.lfm_cw.methods import METHODS
from mlo.problems.runs import paired_difference

from .timing import Result, summary, write_json

__all__ = [
    "run", "compare", "compare_report", "eval_noise", "COMPARE", "COMPARE_METHODS", "EVAL_NOISE_GENOTYPE", "seeds_for",
    "METHODS_COMPARED", "FASHION_CPU", "FASHION_TRAIN_PER_CLASS", "paired_difference", "markdown", "results_of", "report",
]

REFERENCE = "lfm-cw"
METHODS_COMPARED = ["lfm-cw", "darts-2nd", "lfm-cw-uniform", "lfm-cw-aug"]
QUICK = dict(
    search_rounds=2, batch_size=16, layers=1, eval_epochs=1, eval_layers=1, eval_channels=4,
    synthetic_per_step=8, generator_warmup=20, w1_warmup=2, w2_warmup=2,
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
    seeds=5, search_rounds=6, batch_size=32, synthetic_per_step=32, cell_steps=2, w1_warmup=100, w2_warmup=100,
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


COMPARE_METHODS = ["lfm-cw", "darts-2nd", "lfm-cw-uniform", "darts-2nd-balanced"]
#: The comparison's budget: long-tailed Fashion-MNIST (rho = 10) at 14x14 from 250 images per
#: class (125 search-train + 125 search-val before the tail is cut), the full 10k test set; DARTS
#: cells with 2 intermediate nodes; 100 warm-up steps of each weight copy, then 50 search rounds;
#: each genotype trained from scratch with evaluation seeds 0 and 1 for ``eval_epochs`` epochs
#: (40: within 0.8 points of 80 epochs in `eval_noise`'s measurement, where 20 stayed 3.3 above),
#: tested once after the last epoch, and averaged.
COMPARE = dict(
    methods=COMPARE_METHODS, dataset="fashion-mnist", imbalance=10.0, seeds=5, search_rounds=50, batch_size=32,
    synthetic_per_step=32, cell_steps=2, w1_warmup=100, w2_warmup=100, train_per_class=250, test_per_class=1000,
    generator_warmup=1500, eval_epochs=40, eval_seeds=2, eval_channels=8, eval_layers=3, eval_test_every_epoch=False,
)
#: The genotype `eval_noise` trains: DARTS-V2's first two nodes of each cell (the comparison's
#: cells have two intermediate nodes).
EVAL_NOISE_GENOTYPE = Genotype(
    normal=(("sep_conv_3x3", 0), ("sep_conv_3x3", 1), ("sep_conv_3x3", 0), ("sep_conv_3x3", 1)), normal_concat=(2, 3),
    reduce=(("max_pool_3x3", 0), ("max_pool_3x3", 1), ("skip_connect", 2), ("max_pool_3x3", 1)), reduce_concat=(2, 3),
)
#: the target half-width of a paired 95 % interval, in points of test error
TARGET = 1.5


def seeds_for(std: float, target: float = TARGET, most: int = 1000) -> int | None:
    """The fewest paired seeds n whose 95 % interval half-width t(0.975, n - 1) * std / sqrt(n)
    is at most ``target`` for paired differences of standard deviation ``std`` (``None``: more
    than ``most``)."""
    from scipy.stats import t

    if std != std:  # NaN: one seed, no estimate
        return None
    for n in range(2, most + 1):
        if float(t.ppf(0.975, n - 1)) * std / n**0.5 <= target:
            return n
    return None


def _half(d: dict[str, float]) -> float:
    return (d["ci_high"] - d["ci_low"]) / 2


def _run_in(config: RunConfig, console: Console | None = None) -> list[dict[str, Any]]:
    """``config``'s runs in its folder: continued there if an earlier call was interrupted (with
    the same config), else started."""
    folder = Path(str(config.out))
    resume = (folder / "config.json").is_file()
    if resume:
        saved = RunConfig().updated(json.loads((folder / "config.json").read_text()))
        if saved != config:
            raise ConfigError(f"{folder} holds a comparison with another config; choose another --out")
    return list(run_experiment(config, console or Console(quiet=True), resume=resume)["runs"])


def _seed_runs(config: RunConfig) -> list[dict[str, Any]]:
    """One seed's runs in a process of its own (`compare` with ``jobs``), genotype paths made
    relative to the comparison's folder."""
    import torch

    torch.set_num_threads(max(config.threads, 1))
    runs = _run_in(config)
    return [{**r, "genotype": f"{Path(str(config.out)).name}/{r['genotype']}"} for r in runs]


def compare(out: str | Path | None = None, console: Console | None = None, overrides: dict[str, Any] | None = None,
            json_path: str | Path | None = None, jobs: int = 1) -> dict[str, Any]:
    """Run the search comparison (`COMPARE`, with ``overrides``) into ``out/lfm-cw-compare`` (an
    interrupted one continues there: `mlo run --resume`), print and return its tables. ``jobs``
    > 1: the seeds run in that many processes at once, each seed in ``seed<k>/`` (one thread
    each: the same results as one process)."""
    console = console or Console()
    folder = Path(out or "runs/bench") / "lfm-cw-compare"
    config = RunConfig(out=str(folder)).updated({**COMPARE, **(overrides or {})}, source="--set")
    config.validate()
    if jobs <= 1:
        runs = _run_in(config, console)
    else:
        import multiprocessing

        seeds = range(config.first_seed, config.first_seed + config.seeds)
        per_seed = [config.updated({"first_seed": s, "seeds": 1, "out": str(folder / f"seed{s}")}) for s in seeds]
        console.print(f"mlo bench lfm-cw --compare: {len(per_seed)} seeds in {jobs} processes -> {folder}/seed<k>")
        with multiprocessing.get_context("spawn").Pool(jobs) as pool:
            runs = [r for chunk in pool.map(_seed_runs, per_seed, chunksize=1) for r in chunk]
    return compare_report(folder, runs, config.methods, console, json_path)


def compare_report(folder: Path, runs: list[dict[str, Any]], methods: list[str], console: Console,
                   json_path: str | Path | None = None) -> dict[str, Any]:
    """The comparison's tables from ``runs`` (a results.json's): per method the errors, paired
    differences to lfm-cw (or, where it has no runs, the first method) with half-widths and the
    seeds 1.5 points would need, how far the search moved; per seed the genotypes' Hamming
    distances between methods."""
    by = {m: {int(r["seed"]): r for r in runs if r["method"] == m} for m in methods}
    anchor = REFERENCE if by.get(REFERENCE) else methods[0]
    reference = by[anchor]
    rows = []
    for method in methods:
        mine = by[method]
        seeds = sorted(mine)
        if not seeds:
            continue
        row: dict[str, Any] = {
            "method": method, "seeds": len(seeds),
            "test_error": _stats([mine[k]["test_error"] for k in seeds]),
            "balanced_error": _stats([mine[k]["balanced_error"] for k in seeds]),
            "arch_distance": statistics.fmean(float(mine[k].get("arch_distance", 0.0)) for k in seeds),
            "genotype_changes": statistics.fmean(float(mine[k].get("genotype_changes", 0)) for k in seeds),
        }
        shared = sorted(set(seeds) & set(reference))
        if method != anchor and len(shared) > 0:
            for key in ("test_error", "balanced_error"):
                d = paired_difference([mine[k][key] for k in shared], [reference[k][key] for k in shared])
                row["paired_" + key] = {**d, "half_width": _half(d), "seeds_for_1.5": seeds_for(d["std"]) if len(shared) > 1 else None}
        rows.append(row)
    hamming: list[dict[str, Any]] = []
    for seed in sorted(reference):
        genotypes = {m: Genotype.load(folder / by[m][seed]["genotype"]) for m in methods if seed in by[m]}
        hamming.append({"seed": seed, **{f"{a} vs {b}": genotype_distance(genotypes[a], genotypes[b])
                                         for i, a in enumerate(genotypes) for b in list(genotypes)[i + 1:]}})
    table = Table(title="mlo bench lfm-cw --compare: long-tailed Fashion-MNIST (rho 10), error (%) mean ± std over seeds; "
                        f"paired Δ to {anchor}, mean [95 % CI] (half-width; seeds for ±1.5)")
    for col in ("method", "seeds", "test error", "balanced error", "Δ test", "Δ balanced", "arch moved", "genotype edges changed"):
        table.add_column(col, justify="left" if col == "method" else "right")
    for row in rows:
        cells = [row["method"], str(row["seeds"]), "{:.2f} ± {:.2f}".format(*row["test_error"]),
                 "{:.2f} ± {:.2f}".format(*row["balanced_error"])]
        for key in ("paired_test_error", "paired_balanced_error"):
            d = row.get(key)
            cells.append(f"{_fmt(d)} (±{d['half_width']:.2f}; n={d['seeds_for_1.5']})" if d and d["n"] > 1 else "—")
        cells += [f"{row['arch_distance']:.3f}", f"{row['genotype_changes']:.1f}"]
        table.add_row(*cells)
    console.print(table)
    if hamming:
        pairs = [k for k in hamming[0] if k != "seed"]
        ham = Table(title="genotype Hamming distance between methods (edges of one not in the other, both cells)")
        ham.add_column("seed")
        for k in pairs:
            ham.add_column(k, justify="right")
        for h in hamming:
            ham.add_row(str(h["seed"]), *[str(h.get(k, "—")) for k in pairs])
        console.print(ham)
    outcome = {"reference": anchor, "rows": rows, "hamming": hamming}
    if json_path is not None:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(outcome, indent=2))
    return outcome


def eval_noise(lengths: list[int], seeds: int = 3, out: str | Path | None = None, console: Console | None = None,
               overrides: dict[str, Any] | None = None, json_path: str | Path | None = None,
               genotype: Genotype = EVAL_NOISE_GENOTYPE) -> list[dict[str, Any]]:
    """Train ``genotype`` from scratch with evaluation seeds 0 .. ``seeds`` - 1 for each number
    of epochs in ``lengths``, on the comparison's data and evaluation network (`COMPARE`, with
    ``overrides``); per length the mean and std of the test error over the seeds and the seconds
    per training. Plateau criterion: the shortest length whose std is at most 0.5 points and
    whose mean is within 0.5 points of the next longer length's."""
    console = console or Console()
    config = RunConfig().updated({**COMPARE, **(overrides or {})}, source="--set")
    config.validate()
    splits = datasets.load(config.dataset, config.data_root, config.imbalance, seed=0, **config.data_options())
    rows = []
    for epochs in lengths:
        start = time.perf_counter()
        result = evaluate(config.updated({"eval_epochs": epochs}), genotype, splits, list(range(seeds)))
        errors = [r["test_error"] for r in result["evaluations"]]
        mean, std = _stats(errors)
        rows.append({"epochs": epochs, "test_errors": errors, "mean": mean, "std": std,
                     "balanced_mean": result["balanced_error"], "seconds_per_run": (time.perf_counter() - start) / seeds})
        console.print(f"eval noise: {epochs} epochs: {mean:.2f} ± {std:.2f} % over {seeds} evaluation seeds "
                      f"({rows[-1]['seconds_per_run']:.0f} s each)")
    for i, row in enumerate(rows):
        later = rows[i + 1] if i + 1 < len(rows) else None
        row["plateau"] = row["std"] <= 0.5 and (later is None or abs(row["mean"] - later["mean"]) <= 0.5)
    table = Table(title=f"evaluation noise: one genotype, {seeds} evaluation seeds, {splits}")
    for col in ("epochs", "test error (%)", "std", "s per run", "on plateau"):
        table.add_column(col, justify="right")
    for row in rows:
        table.add_row(str(row["epochs"]), f"{row['mean']:.2f}", f"{row['std']:.2f}", f"{row['seconds_per_run']:.0f}",
                      "yes" if row["plateau"] else "no")
    console.print(table)
    if json_path is not None:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps({"genotype": dataclasses.asdict(genotype), "rows": rows}, indent=2))
    return rows
