"""What one round of learned per-layer rates costs in plain SGD steps (`mlo run hpo`'s ``cost``).

``python -m mlo.benchmarks.hpo_cost``: the learned-rates Engine (a step, a differentiable
look-ahead step and the validation pass through it) and the plain one (the model level alone)
run in alternating blocks of ``--rounds`` rounds; the CPU time (one thread, so other processes
on a shared machine inflate it less than wall time) per round of each, and the median over blocks
of their ratio, are printed.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from mlo.problems import hpo

__all__ = ["round_cost", "main"]


def round_cost(config: hpo.HPOConfig, blocks: int, rounds: int) -> dict[str, float]:
    """Median CPU seconds per round, learned and plain, and the median per-block ratio."""
    s = hpo.splits(config, 0)
    engines = {learn: hpo.engine(config, s, 0, hpo.Rates(config.layers + 1, config.init_lr, config.init_weight_decay), learn)
               for learn in (True, False)}
    times: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(blocks):
        for learn, e in engines.items():
            start = time.process_time()
            e.run(rounds)
            times[learn].append((time.process_time() - start) / rounds)
    return {"learned_s": statistics.median(times[True]), "plain_s": statistics.median(times[False]),
            "ratio": statistics.median(a / b for a, b in zip(times[True], times[False]))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=50)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    r = round_cost(hpo.HPOConfig(), args.blocks, args.rounds)
    print(f"learned round {r['learned_s'] * 1e3:.2f} ms, plain step {r['plain_s'] * 1e3:.2f} ms, "
          f"ratio (median over {args.blocks} blocks) {r['ratio']:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
