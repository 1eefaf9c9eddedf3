"""Where mlo's time goes in one round of a small program: a per-piece cost breakdown.

For each (program, algorithm) it runs mlo's round under ``cProfile`` and reports, per round, the
cumulative time of the pieces below (a function counts toward the first piece that names it; the
pieces do not nest), scaled to the round's unprofiled wall-clock time (the profiler inflates
Python-heavy code, so the shares, not the absolute profiled times, are kept). The rest is
``other`` (the engine's and the rule's own Python). The hand-engine loop is timed beside it,
interleaved, for the ratio.

    python -m benchmarks.breakdown [--rounds N]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from mlo import estimators

from . import workloads
from .implementations import build_round

__all__ = ["PIECES", "breakdown", "main"]

#: piece name -> (file suffix, function name) pairs whose cumulative time it is
PIECES: dict[str, tuple[tuple[str, str], ...]] = {
    "optimizer step": (("torch/optim/optimizer.py", "wrapper"),),
    "finiteness check": (("mlo/engine.py", "_watch"), ("mlo/autodiff.py", "all_finite")),
    "divergence test": (("mlo/estimators/solvers.py", "_term_norms"),),
    "diagnostics": (("mlo/estimators/base.py", "lookahead_info"), ("mlo/estimators/unroll.py", "lookahead_info")),
    "autograd passes": (("mlo/autodiff.py", "_engine"),),
    "loss forward": (("mlo/functional.py", "loss"),),
    "data": (("mlo/streams.py", "draw"),),
    "hooks": (("mlo/hooks.py", "on_step"), ("mlo/hooks.py", "on_gradient")),
}

CASES: dict[str, tuple[Callable[[], workloads.Bilevel], tuple[str, ...]]] = {
    "ridge": (lambda: workloads.ridge(n=1000, dim=100), ("neumann:iterations=10,alpha=0.1", "cg:iterations=10")),
    "reweighting": (lambda: workloads.reweighting(hidden=100, batch=100), ("neumann:iterations=5,alpha=0.1", "unroll:steps=1")),
    "hpo": (lambda: workloads.hpo(hidden=100, batch=100), ("cg:iterations=5,damping=1.0",)),
}


def _interleaved(steps: dict[str, Callable[[], Any]], rounds: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {k: [] for k in steps}
    keys = list(steps)
    for r in range(rounds):
        for k in keys if r % 2 else keys[::-1]:
            t0 = time.perf_counter()
            steps[k]()
            times[k].append(time.perf_counter() - t0)
    return times


def _cumulative(stats: pstats.Stats, piece: Sequence[tuple[str, str]]) -> float:
    """The cumulative time of the functions of ``piece``, each call counted once: the time of a
    call made from another function of the piece (an override calling its base) is in its
    caller's already."""

    def matches(key: tuple[str, int, str]) -> bool:
        file, _, func = key
        return any(file.endswith(suffix) and func == name for suffix, name in piece)

    total = 0.0
    for key, row in stats.stats.items():  # type: ignore[attr-defined]
        if matches(key):
            total += row[3] - sum(timing[3] for caller, timing in row[4].items() if matches(caller))
    return total


def breakdown(kind: str, spec: str, rounds: int = 60) -> dict[str, float]:
    """ms per round of each piece of mlo's round, ``other``, ``total``, ``hand-engine`` and the ratio."""
    program = CASES[kind][0]()
    est = estimators.parse(spec)
    steps = {impl: build_round(impl, program.instantiate(), est)[0] for impl in ("mlo", "hand-engine")}
    for step in steps.values():
        for _ in range(5):
            step()
    times = _interleaved(steps, rounds)
    wall = statistics.median(times["mlo"])
    profiler = cProfile.Profile()
    profiler.enable()
    t0 = time.perf_counter()
    for _ in range(rounds):
        steps["mlo"]()
    profiled = time.perf_counter() - t0
    profiler.disable()
    stats = pstats.Stats(profiler)
    out = {name: _cumulative(stats, piece) / profiled * wall * 1e3 for name, piece in PIECES.items()}
    out["other"] = wall * 1e3 - sum(out.values())
    out["total"] = wall * 1e3
    out["hand-engine"] = statistics.median(times["hand-engine"]) * 1e3
    out["ratio"] = statistics.median(a / b for a, b in zip(times["mlo"], times["hand-engine"]))
    return out


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=60)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    columns = [*PIECES, "other", "total", "hand-engine", "ratio"]
    print("ms per round | " + " | ".join(columns))
    for kind, (_, specs) in CASES.items():
        for spec in specs:
            row = breakdown(kind, spec, args.rounds)
            print(f"{kind} {spec} | " + " | ".join(f"{row[c]:.3f}" for c in columns))


if __name__ == "__main__":
    main()
