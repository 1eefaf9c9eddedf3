"""Data-parallel scaling: LFM-CW search rounds per second with 1 and 2 ranks (torchrun, gloo, one
thread each), the same global batch, and the scaling efficiency ``rate_2 / (2 * rate_1)``, for
each synchronization mode (``Engine(sync=...)``).

    python -m mlo.benchmarks.scaling [--rounds 6] [--repeats 3] [--batch 64] [--sync exact,once]

Each measurement is one ``torchrun --nproc_per_node K`` process group that builds the LFM-CW
program on digits (`mlo.problems.lfm_cw.program.build`), runs 1 round to warm up, then times
``--rounds`` rounds. Measurements interleave within each repeat (1 rank, then 2 ranks in each
``--sync`` mode), ``--repeats`` times, so every mode sees the same load; medians are reported.
After the timed rounds, the runs of the first repeat count the all-reduces of one more round
(torch's profiler), and its 2-rank runs compare, at their final state, each upper level's hypergradient with
``sync="once"`` against ``sync="exact"`` (relative error, the same random draws for both). On a
machine with fewer free cores than ranks the efficiency says so.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from .timing import write_json

__all__ = ["main"]


def _worker(rounds: int, batch: int, sync: str, out: str, extras: bool) -> None:
    import mlo
    from mlo.problems import data
    from mlo.problems.darts import SuperNet
    from mlo.problems.lfm_cw.program import Constants, build

    torch.set_num_threads(1)
    mlo.distributed.init_from_env("cpu")
    splits = data.load("digits")
    program = build(splits.train, splits.val, splits.num_classes, splits.input_shape,
                    lambda: SuperNet(C=4, layers=3, in_channels=1, num_classes=splits.num_classes),
                    constants=Constants(synthetic_per_step=32), batch_size=batch, estimator="finite_difference")
    engine = mlo.Engine(program.problems, program.graph, program.estimators, hooks=program.hooks, sync=sync)
    engine.run(1)
    mlo.distributed.barrier()
    start = time.perf_counter()
    engine.run(rounds)
    mlo.distributed.barrier()
    seconds = time.perf_counter() - start
    all_reduces, errors = None, {}
    if extras:  # untimed: the same in every repeat
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
            engine.run(1)
        all_reduces = sum(e.count for e in profiler.key_averages() if e.key == "c10d::allreduce_")
        errors = _sync_errors(engine) if mlo.distributed.active() else {}
    if mlo.distributed.is_main():
        Path(out).write_text(json.dumps({"ranks": mlo.distributed.world_size(), "sync": sync, "rounds_per_second": rounds / seconds,
                                         "all_reduces_per_round": all_reduces, "once_vs_exact": errors}))
    mlo.distributed.shutdown()


def _sync_errors(engine: Any) -> dict[str, float]:
    """Per upper level: ``|g_once - g_exact| / |g_exact|`` of its hypergradient at the current
    state, each evaluation from the same random state (synthetic images, dropout)."""
    import mlo

    def hypergradient(level: str, sync: str) -> torch.Tensor:
        state = mlo.rng.get_state()
        engine.sync = sync
        try:
            return torch.cat([g.reshape(-1) for g in engine.hypergradient(level)])
        finally:
            mlo.rng.set_state(state)

    kept, errors = engine.sync, {}
    for level in engine.graph.levels:
        if engine.graph.lowers_of[level]:
            exact = hypergradient(level, "exact")
            if not torch.equal(exact, hypergradient(level, "exact")):
                raise RuntimeError(f"level {level!r}: two exact evaluations differ; the comparison would mean nothing")
            errors[level] = float((hypergradient(level, "once") - exact).norm() / exact.norm())
    engine.sync = kept
    return errors


def _measure(ranks: int, rounds: int, batch: int, sync: str, extras: bool) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        out, log = os.path.join(tmp, "rate.json"), os.path.join(tmp, "worker.log")
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks),
               "-m", "mlo.benchmarks.scaling", "--worker", "--rounds", str(rounds), "--batch", str(batch),
               "--sync", sync, "--out", out, *(["--extras"] if extras else [])]
        with open(log, "w") as f:
            done = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT)
        if done.returncode:
            raise RuntimeError(f"{ranks} rank(s), sync={sync}: the worker failed:\n{Path(log).read_text()[-3000:]}")
        return dict(json.loads(Path(out).read_text()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=64, help="global batch of every level")
    parser.add_argument("--sync", default="exact", help="comma-separated Engine(sync=...) modes to measure with 2 ranks")
    parser.add_argument("--json", default="runs/bench/scaling.json")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--extras", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        _worker(args.rounds, args.batch, args.sync, args.out, args.extras)
        return 0
    from mlo.engine import SYNCS

    syncs = args.sync.split(",")
    if any(s not in SYNCS for s in syncs):
        parser.error(f"--sync: each mode must be one of {SYNCS}, got {args.sync!r}")
    runs: list[dict[str, Any]] = []
    for repeat in range(args.repeats):
        for ranks, sync in [(1, "exact"), *((2, s) for s in syncs)]:  # one rank synchronizes nothing
            runs.append(_measure(ranks, args.rounds, args.batch, sync, extras=repeat == 0))
            print(f"{ranks} rank(s), sync={sync}: {runs[-1]['rounds_per_second']:.3f} rounds/s", flush=True)
    one = statistics.median(r["rounds_per_second"] for r in runs if r["ranks"] == 1)
    summary: dict[str, Any] = {}
    load = os.getloadavg()
    print(f"median rounds/s, global batch {args.batch} (load average {load[0]:.1f} on {os.cpu_count()} cores):")
    print(f"  1 rank: {one:.3f}")
    for sync in syncs:
        mine = [r for r in runs if r["ranks"] == 2 and r["sync"] == sync]
        two = statistics.median(r["rounds_per_second"] for r in mine)
        summary[sync] = {"rounds_per_second": two, "speedup": two / one, "efficiency": two / (2 * one),
                         "all_reduces_per_round": mine[0]["all_reduces_per_round"], "once_vs_exact": mine[0]["once_vs_exact"]}
        print(f"  2 ranks, sync={sync}: {two:.3f}; speed-up {two / one:.2f}x, scaling efficiency {two / (2 * one):.0%}, "
              f"{mine[0]['all_reduces_per_round']} all-reduces per round")
    if "once" in summary:
        shown = ", ".join(f"{level} {e:.3g}" for level, e in summary["once"]["once_vs_exact"].items())
        print(f"  sync='once' against 'exact', relative hypergradient error at the final state: {shown}")
    write_json(args.json, "scaling", {"rounds": args.rounds, "repeats": args.repeats, "batch": args.batch, "sync": syncs}, [],
               rounds_per_second_1=one, by_sync=summary, all=runs, load_average=load)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
