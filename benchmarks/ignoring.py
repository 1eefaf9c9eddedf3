"""The ``ignoring`` suite: `mlo.check` of the weights' hypergradient in learning by ignoring
(`mlo.problems.ignoring`), the exact rule (``cg``, ``hessian="total"``) against the per-hop rule
(``hessian="partial"``), each against the exact float64 reference (cg to a relative residual of
1e-12, exact rule), at the state the program reaches when it trains with the exact rule: after
its warm-up and one round, and after ``rounds`` rounds; several seeds, median and max.

Besides the program's graph (``weights -> target -> source``, ``weights -> source``), the same
hypergradient is evaluated with the levels declared in data-flow order (``weights -> source ->
target``: the target level below the source level whose best response it follows), at the same
state and on the same batches: there the source level's loss does not read the target level, so
the per-hop rule has nothing to drop.
"""

from __future__ import annotations

import dataclasses
import statistics
import warnings
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

import mlo
from mlo.problems import ignoring

from .timing import write_json

__all__ = ["ESTIMATORS", "run"]

#: label -> (graph, estimator on the weights' edges)
ESTIMATORS = {
    "cg 10, total": ("program", "cg:iterations=10"),
    "cg 30, total": ("program", "cg:iterations=30"),
    "cg 30, partial": ("program", "cg:iterations=30,hessian=partial"),
    "cg 30, partial, data-flow graph": ("data-flow", "cg:iterations=30,hessian=partial"),
}
DATA_FLOW = {"weights": ["source"], "source": ["target"]}


def _measure(built: ignoring.Built) -> dict[str, tuple[float, float]]:
    """(relative error, cosine) of each of `ESTIMATORS` against the reference, at the current state."""
    engine = built.engine
    out = {}
    reference: Any = None
    for label, (graph, spec) in ESTIMATORS.items():
        if graph == "program":
            report = mlo.check(engine, "weights", estimator=ignoring.estimators(spec))
            reference = report.reference_hypergradient
            out[label] = (report.rel_error, report.cosine)
        else:  # the same levels and batches, declared in data-flow order
            flow = mlo.Engine(list(engine.program.problems.values()), DATA_FLOW, spec)
            got = flow.hypergradient("weights", batches={name: engine.batch(name) for name in DATA_FLOW | {"target": []}})
            g, w = (torch.cat([t.detach().double().reshape(-1) for t in ts]) for ts in (got, reference))
            out[label] = (float((g - w).norm() / w.norm()), float(g @ w / (g.norm() * w.norm())))
    return out


def run(json_path: str | Path, seeds: int = 5, rounds: int = 40, quick: bool = False, console: Console | None = None) -> dict[str, Any]:
    """Measure, print the table, write ``json_path``; returns what was written."""
    console = console or Console()
    config = ignoring.IgnoringConfig(rounds=rounds)
    if quick:
        config, seeds = dataclasses.replace(config, warmup=2, rounds=2, target_fraction=0.9), 1
    rows: list[dict[str, Any]] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", mlo.ConvergenceWarning)
        warnings.simplefilter("ignore", mlo.CheckWarning)  # the per-hop rule is off by design; the table says how far
        for seed in range(seeds):
            built = ignoring.build(config, seed)
            done = 0
            for when in (1, config.rounds):
                built.engine.run(when - done)
                done = when
                for label, (error, cosine) in _measure(built).items():
                    rows.append({"seed": seed, "rounds": when, "estimator": label, "rel_error": error, "cosine": cosine})
                console.log(f"ignoring check: seed {seed}, {when} rounds")
    table = Table(title=f"learning by ignoring: the weights' hypergradient against the exact float64 reference ({seeds} seeds)")
    for col in ("estimator", "rounds", "rel. error, median (max)", "cosine, median (min)"):
        table.add_column(col, justify="left" if col == "estimator" else "right")
    summary = []
    for label in ESTIMATORS:
        for when in sorted({r["rounds"] for r in rows}):
            mine = [r for r in rows if r["estimator"] == label and r["rounds"] == when]
            rel, cos = [r["rel_error"] for r in mine], [r["cosine"] for r in mine]
            entry = {"estimator": label, "rounds": when, "rel_error_median": statistics.median(rel), "rel_error_max": max(rel),
                     "cosine_median": statistics.median(cos), "cosine_min": min(cos)}
            summary.append(entry)
            table.add_row(label, str(when), f"{entry['rel_error_median']:.2e} ({entry['rel_error_max']:.2e})",
                          f"{entry['cosine_median']:.6f} ({entry['cosine_min']:.6f})")
    console.print(table)
    extra = {"rows": rows, "summary": summary}
    write_json(json_path, "ignoring", {**dataclasses.asdict(config), "seeds": seeds}, [], **extra)
    return extra
