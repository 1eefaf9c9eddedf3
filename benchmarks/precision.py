"""bf16 and fp16 against fp32: the hypergradient error of each estimator on the reweighting MLP.

    python -m mlo.benchmarks.precision [--states 5] [--json runs/bench/precision.json]

The program is Meta-Weight-Net on digits (`mlo.benchmarks.workloads.reweighting`). At each of
``--states`` points of an fp32 run (the lower level trained 20 rounds further each time), the
upper level's hypergradient is computed four ways at the same state and on the same batches:
fp32 (the reference), ``Engine(precision="bf16")`` (every level's forward pass under bf16
autocast, derivatives and solves in float32), a whole call of an fp32 Engine under a user's own
``torch.autocast("cpu", torch.bfloat16)`` (what the issue measured), and
``Engine(precision="fp16")`` (every level in fp16 with its gradient scaler, the upper level's
hypergradient loss-scaled). The table gives the median and the largest relative error
``||h - h_fp32|| / ||h_fp32||`` over the states. Every registered estimator but ``first_order``,
whose hypergradient is zero here (the validation loss does not read the weight net).
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable
from typing import Any

import torch

import mlo

from .workloads import as_mlo, reweighting
from .timing import write_json

__all__ = ["ESTIMATORS", "WAYS", "measure", "main"]

ESTIMATORS = ("finite_difference", "cg:iterations=10,damping=1.0", "neumann:iterations=10,alpha=0.05",
              "unroll:steps=2", "sama")
#: the columns: how the hypergradient is computed against the fp32 reference
WAYS = ("Engine(precision='bf16')", "a user's torch.autocast(bf16) around the call", "Engine(precision='fp16')")


def _engine(estimator: str, precision: str) -> tuple[mlo.Engine, Callable[[], Any]]:
    copy = reweighting().instantiate()
    engine = mlo.Engine(as_mlo(copy), {"upper": ["lower"]}, estimator, precision=precision)
    return engine, lambda: copy


def _relative(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    fa, fb = torch.cat([t.reshape(-1) for t in a]), torch.cat([t.reshape(-1) for t in b])
    return float((fa - fb).norm() / fb.norm())


def measure(estimator: str, states: int, rounds_between: int = 20) -> dict[str, list[float]]:
    """Relative errors against fp32 at ``states`` points, one list per way of `WAYS`."""
    torch.manual_seed(0)
    ref, _ = _engine(estimator, "fp32")
    engines = {WAYS[0]: _engine(estimator, "bf16")[0], WAYS[1]: ref, WAYS[2]: _engine(estimator, "fp16")[0]}
    errors: dict[str, list[float]] = {way: [] for way in WAYS}
    for _ in range(states):
        ref.run(rounds_between)
        want = ref.hypergradient("upper")
        for way, engine in engines.items():
            if engine is not ref:
                engine.load_state_dict(ref.state_dict())  # the same state and batches in use
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=engine is ref):
                errors[way].append(_relative(engine.hypergradient("upper"), want))
    return errors


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--states", type=int, default=5)
    parser.add_argument("--json", default="runs/bench/precision.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"bf16/fp16 vs fp32 hypergradient, reweighting MLP ({args.states} states): relative error median / max")
    for col in ("estimator", *WAYS):
        table.add_column(col, justify="left" if col == "estimator" else "right")
    results = {}
    for est in ESTIMATORS:
        errs = measure(est, args.states)
        results[est] = errs
        table.add_row(est, *(f"{statistics.median(v):.2e} / {max(v):.2e}" for v in errs.values()))
    Console().print(table)
    write_json(args.json, "precision", {"states": args.states, "estimators": list(ESTIMATORS)}, [], errors=results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
