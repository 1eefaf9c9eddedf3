"""Data-parallel scaling: LFM-CW search rounds per second with 1 and 2 ranks (torchrun, gloo, one
thread each), the same global batch, and the scaling efficiency ``rate_2 / (2 * rate_1)``.

    python -m mlo.benchmarks.scaling [--rounds 6] [--repeats 3] [--batch 64]

Each measurement is one ``torchrun --nproc_per_node K`` process group that builds the LFM-CW
program on digits (`mlo.problems.lfm_cw.program.build`), runs 1 round to warm up, then times
``--rounds`` rounds; runs alternate between 1 and 2 ranks, ``--repeats`` times each, and the
medians are reported. On a machine with fewer free cores than ranks the efficiency says so.
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

import torch

from .timing import write_json

__all__ = ["main"]


def _worker(rounds: int, batch: int, out: str) -> None:
    import torch.distributed as dist

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
    engine = mlo.Engine(program.problems, program.graph, program.estimators, hooks=program.hooks)
    engine.run(1)
    mlo.distributed.barrier()
    start = time.perf_counter()
    engine.run(rounds)
    mlo.distributed.barrier()
    seconds = time.perf_counter() - start
    if mlo.distributed.is_main():
        Path(out).write_text(json.dumps({"ranks": mlo.distributed.world_size(), "rounds_per_second": rounds / seconds}))
    if dist.is_initialized():
        dist.destroy_process_group()


def _measure(ranks: int, rounds: int, batch: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rate.json")
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks),
               "-m", "mlo.benchmarks.scaling", "--worker", "--rounds", str(rounds), "--batch", str(batch), "--out", out]
        subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
        return float(json.loads(Path(out).read_text())["rounds_per_second"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=64, help="global batch of every level")
    parser.add_argument("--json", default="runs/bench/scaling.json")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        _worker(args.rounds, args.batch, args.out)
        return 0
    rates: dict[int, list[float]] = {1: [], 2: []}
    for _ in range(args.repeats):
        for ranks in (1, 2):
            rates[ranks].append(_measure(ranks, args.rounds, args.batch))
            print(f"{ranks} rank(s): {rates[ranks][-1]:.3f} rounds/s", flush=True)
    one, two = statistics.median(rates[1]), statistics.median(rates[2])
    print(f"median rounds/s: 1 rank {one:.3f}, 2 ranks {two:.3f}; speed-up {two / one:.2f}x, "
          f"scaling efficiency {two / (2 * one):.0%} (load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)")
    write_json(args.json, "scaling", {"rounds": args.rounds, "repeats": args.repeats, "batch": args.batch}, [],
               rounds_per_second={"1": one, "2": two}, all=rates, efficiency=two / (2 * one), speedup=two / one,
               load_average=os.getloadavg())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
