"""LFM-CW's edges: seconds per search round under each estimator choice, interleaved, and the
`mlo.check` table of the architecture's and the class weights' hypergradients against
``unroll:steps=1`` at chosen rounds.

    python -m benchmarks.lfm_cw_edges time  --rounds 4 --repeats 3 [--set KEY=VALUE ...]
    python -m benchmarks.lfm_cw_edges check --at 1,50 [--set KEY=VALUE ...]
    python -m benchmarks.lfm_cw_edges search --rounds 30 --seeds 3 [--set KEY=VALUE ...]

``search`` runs the first two variants from the same seeds and prints, per seed, how far each
architecture moved from its initialisation, the distance between the two, and how many genotype
edges differ.

Both build the search of `mlo run` (`experiment.build_program`, `experiment.search_engine`) on
the run config given by ``--set`` (default: Fashion-MNIST 14x14, the bench sizes), with an
untrained conditional VAE as the generator: its images cost what a trained one's cost, and the
check compares estimators at one state, whatever the images are.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch

import mlo
from mlo.config import assignments
from mlo.problems import data as datasets
from mlo.problems.lfm_cw.config import RunConfig
from mlo.problems.lfm_cw.cvae import ConditionalVAE
from mlo.problems.lfm_cw.experiment import build_program, search_engine

BENCH = {"dataset": "fashion-mnist", "methods": ["lfm-cw"], "channels": 4, "layers": 3, "batch_size": 64, "w1_warmup": 0}


def engine(config: RunConfig, estimators: dict[str, str], rounds: int, seed: int = 0) -> tuple[mlo.Engine, Any]:
    """The search engine of ``config``'s first method, edges overridden by ``estimators``
    (``"upper->lower": spec``; ``"*"``: every edge), with its W1 warm-up done."""
    splits = datasets.load(config.dataset, config.data_root, config.imbalance, seed=0, **config.data_options(search=True))
    torch.manual_seed(seed)
    generator = ConditionalVAE(splits.num_classes, splits.input_shape)
    program = build_program(config, config.methods[0], seed, splits, generator, rounds)
    for edge in program.estimators:
        spec = estimators.get(f"{edge[0]}->{edge[1]}", estimators.get("*"))
        if spec is not None:
            program.estimators[edge] = spec
    if config.w1_warmup:
        w1 = [p for p in program.problems if p.name == "w1"]
        mlo.Engine(w1, {}, hooks=list(program.hooks)).run(config.w1_warmup)
    return search_engine(config, program, list(program.hooks)), program


def seconds_per_round(config: RunConfig, estimators: dict[str, str], rounds: int) -> tuple[float, float]:
    """Wall and CPU (this process) seconds per round, after one untimed round."""
    eng, _ = engine(config, estimators, rounds + 1)
    eng.run(1)  # first round: allocations
    wall, cpu = time.perf_counter(), time.process_time()
    eng.run(rounds)
    return (time.perf_counter() - wall) / rounds, (time.process_time() - cpu) / rounds


def _softmaxes(program: Any) -> torch.Tensor:
    """The architecture's operation weights, flattened."""
    with torch.no_grad():
        weights = program.architecture()
        return torch.cat([weights.normal.reshape(-1), weights.reduce.reshape(-1)]).double()


def _genotype_difference(a: Any, b: Any) -> int:
    """Genotype edges (op, input) that differ, normal and reduction cells together."""
    return sum(x != y for x, y in zip((*a.normal, *a.reduce), (*b.normal, *b.reduce)))


def _variant(text: str, base: RunConfig) -> tuple[RunConfig, dict[str, str]]:
    """``EDGE=SPEC`` items (EDGE ``upper->lower`` or ``*``) set estimators, other ``KEY=VALUE``
    items set options of the run config."""
    items = dict(s.split("=", 1) for s in text.split(",") if s)
    edges = {k: v for k, v in items.items() if "->" in k or k == "*"}
    return base.updated({k: v for k, v in items.items() if k not in edges}), edges


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.lfm_cw_edges")
    p.add_argument("what", choices=("time", "check", "search"))
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--at", default="1,50", help="rounds at which to check (comma-separated)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--variants", default="fd:*=finite_difference;unroll:*=unroll:steps=1",
                   help="NAME:ITEM,ITEM;... with ITEM = EDGE=SPEC (EDGE 'upper->lower' or '*') or KEY=VALUE (a run option)")
    args = p.parse_args()
    torch.set_num_threads(1)
    config = RunConfig().updated({**BENCH, **assignments(args.set)})
    variants = {}
    for item in args.variants.split(";"):
        name, _, specs = item.partition(":")
        variants[name] = _variant(specs, config)
    if args.what == "time":
        times: dict[str, list[tuple[float, float]]] = {name: [] for name in variants}
        for _ in range(args.repeats):
            for name, (conf, est) in variants.items():
                times[name].append(seconds_per_round(conf, est, args.rounds))
                print(f"{name}: wall {times[name][-1][0]:.3f} s, cpu {times[name][-1][1]:.3f} s per round", flush=True)
        base = next(iter(variants))
        for name, ts in times.items():
            for i, kind in enumerate(("wall", "cpu")):
                mine = [t[i] for t in ts]
                ratios = [t[i] / b[i] for t, b in zip(ts, times[base])]
                print(f"{name:>12} {kind}: median {statistics.median(mine):.3f} s/round {['%.3f' % t for t in mine]}; "
                      f"/ {base} median {statistics.median(ratios):.3f} {['%.3f' % r for r in ratios]}")
        return
    if args.what == "search":
        (name_a, (conf_a, est_a)), (name_b, (conf_b, est_b)) = list(variants.items())[:2]
        for seed in range(args.seeds):
            ends = []
            for conf, est in ((conf_a, est_a), (conf_b, est_b)):
                eng, program = engine(conf, est, args.rounds, seed)
                start = _softmaxes(program)
                wall = time.perf_counter()
                eng.run(args.rounds)
                ends.append((program, float((_softmaxes(program) - start).norm()), time.perf_counter() - wall))
            (pa, moved_a, ta), (pb, moved_b, tb) = ends
            print(f"seed {seed}: moved {name_a} {moved_a:.4f}, {name_b} {moved_b:.4f}; between them "
                  f"{float((_softmaxes(pa) - _softmaxes(pb)).norm()):.4f}; genotype edges differing "
                  f"{_genotype_difference(pa.architecture.genotype(), pb.architecture.genotype())}"
                  f"/{len(pa.architecture.genotype().normal) * 2}; seconds {ta:.1f} / {tb:.1f}", flush=True)
        return
    at = sorted(int(r) for r in args.at.split(","))
    for name, (conf, est) in variants.items():
        eng, _ = engine(conf, est, at[-1])
        done = 0
        for r in at:
            eng.run(r - done)
            done = r
            for level in ("architecture", "class_weights"):
                if level in eng.graph.levels:
                    report = mlo.check(eng, level, reference="unroll:steps=1", warn_above=float("inf"))
                    print(f"[{name}] round {r}")
                    print(report, flush=True)


if __name__ == "__main__":
    main()
