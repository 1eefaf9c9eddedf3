"""The ``speed`` suite: time per round and peak memory of mlo beside a hand-written loop and its peers.

Workloads (`benchmarks.workloads`): (a) ridge HPO, (b) Meta-Weight-Net reweighting on digits,
(c) one DARTS supernet round at 8x8 and at 32x32 on digits and at 14x14 and 28x28 on
Fashion-MNIST; on a GPU also on DARTS's own search network (`GPU_CASES`). Each program is built once; each
implementation runs its own copy of it. For every program and algorithm, the implementations
that can run it are timed interleaved in one run (`benchmarks.timing`), then compared:

- mlo / hand-written: target <= 1.0 where the hand-engine loop runs the row too (the bilevel
  programs), <= 1.10 elsewhere (the hand-written loop does the same passes and gives the same
  numbers: see tests/test_benchmarks.py).
- mlo / Betty: time <= 0.90 on ridge with Neumann, <= 0.8 on ridge's other rows (framework
  overhead dominates there), < 1.0 on the others; peak memory <= 1.0. Betty's rounds are timed as the body of its own training loop
  (`BettyProgram.iterate`), so it is not charged for being called one round at a time. Where
  Betty's method is not mlo's (its CG, its "darts" finite difference), the row says so: the
  times are still those of one round of each library's method.
- mlo / hand-engine: target <= 1.05; the hand-written loop taking its gradients through
  autograd's engine directly, as mlo does. It is the floor for any framework running the same
  passes, so this ratio is what is left of mlo's own overhead, and hand-engine / hand bounds what
  any framework can gain over the hand-written loop.

Devices: everything runs on ``device`` (``mlo bench speed --device cuda``): the programs' modules
and batches are moved there, every round is timed between two synchronisations, and peak memory
is the CUDA allocator's. ``--compile`` adds ``mlo-compile``: mlo with the lower module under
``torch.compile``, on the rows whose estimator takes first-order gradients only (a compiled
backward is not differentiated again: ``Estimator.double_backward``), compared with mlo's own round.

The targets the tables show are the bounds ``--check`` holds the rows to where it holds them
(`CHECK_BOUNDS`, `BETTY_CHECK_BOUNDS`), so a row marked missed is a row the check fails.

MAML and iMAML (`benchmarks.maml`): one meta-step on 16 sinusoid tasks, mlo (the tasks as one
level, vmapped) against per-task loops: MAML against higher's (target: mlo / higher <= 1/3) and a
hand-written one; iMAML against a hand-written per-task loop (proximal inner steps and a CG per
task; target: mlo / loop <= 1/3, as for MAML).

Algorithms: ridge with Neumann (10 terms), CG (10 iterations) and unroll (5 steps);
reweighting with Neumann (5 terms) and unroll (1 step, the original Meta-Weight-Net update);
Meta-Weight-Net with a 3.2M-weight classifier ("reweighting-large") with ``sama`` against
Neumann, CG and unroll, all timed interleaved in one measurement: mlo's sama against Betty's
(targets time <= 1.0, memory <= 1.0) and against mlo's other estimators (memory <= 0.5);
DARTS with finite differences (second order) and first order.
"""

from __future__ import annotations

import cProfile
import dataclasses
import functools
import io
import math
import pstats
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from mlo import estimators
from mlo.errors import ConfigError

from . import maml as maml_bench
from . import workloads
from . import supernet as supernet_bench
from .implementations import NotApplicable, build_round, mlo_compiled_round
from .report import Ratio, make_console, print_tables, ratio, ratios_table, results_table
from .timing import MEMORY_METHOD, Contender, Result, measure, write_json

__all__ = ["Case", "cases", "run", "check", "check_bound", "resolve_device", "TARGETS", "CHECK_BOUNDS",
           "BETTY_CHECK_BOUNDS"]

IMPLS = ("mlo", "hand", "hand-engine", "betty", "higher", "torchopt")

#: problem kind -> (mlo/Betty time target, strict "<" comparison)
TARGETS: dict[str, tuple[float, bool]] = {"ridge": (0.8, False), "reweighting": (1.0, True), "hpo": (1.0, True), "darts": (1.0, True)}
HAND_TARGET = 1.10
#: mlo's MAML meta-step (tasks batched with vmap) against higher's per-task loop: at least 3x faster
MAML_TARGET = 1 / 3
MEMORY_TARGET = 1.0

#: the bounds ``mlo bench speed --check`` holds mlo's time ratios to, by peer: against the
#: hand-engine floor on every row, against the hand-written loop where both run the program
CHECK_BOUNDS: dict[str, float] = {"hand-engine": 1.05, "hand": 1.0}
#: (program, algorithm prefix) -> bound of mlo / Betty under ``--check``
BETTY_CHECK_BOUNDS: dict[tuple[str, str], float] = {("ridge", "neumann"): 0.90}


@dataclass(frozen=True)
class Case:
    """One program, the algorithms to run on it, and how many interleaved repetitions."""

    kind: str
    build: Callable[[], workloads.Bilevel]
    algorithms: tuple[str, ...]
    repeats: int
    warmup: int = 2
    #: time every algorithm's contenders interleaved in one measurement, and compare mlo's run
    #: of this algorithm against mlo's runs of the others (time and peak memory)
    focus: str | None = None


def cases(quick: bool = False, device: torch.device | str = "cpu") -> list[Case]:
    """The suite's programs; ``quick`` shrinks every size for a run of seconds (used in tests).
    On a GPU (``device`` cuda) the suite adds `GPU_CASES`."""
    if quick:
        return [
            Case("ridge", lambda: workloads.ridge(n=100, dim=10), ("neumann:iterations=5,alpha=0.1", "unroll:steps=2"), 5, 1),
            Case("reweighting", lambda: workloads.reweighting(hidden=16, batch=50),
                 ("sama", "neumann:iterations=2,alpha=0.1", "unroll:steps=1"), 3, 1, focus="sama"),
            Case("darts", lambda: workloads.darts(size=8, C=4, layers=1, batch=2), ("finite_difference",), 2, 1),
        ]
    return [
        # rounds of a few milliseconds: many repetitions, so that the median ratio settles to
        # about +-0.01 (the --check bounds are 5 % apart from parity)
        Case("ridge", lambda: workloads.ridge(n=1000, dim=100),
             ("neumann:iterations=10,alpha=0.1", "cg:iterations=10", "unroll:steps=5"), 200),
        Case("reweighting", lambda: workloads.reweighting(hidden=100, batch=100),
             ("neumann:iterations=5,alpha=0.1", "unroll:steps=1"), 150),
        Case("hpo", lambda: workloads.hpo(hidden=100, batch=100), ("cg:iterations=5,damping=1.0", "neumann:iterations=5,alpha=0.1"), 150),
        # Meta-Weight-Net at a size where the second-order estimators' memory shows (3.2M weights)
        Case("reweighting", lambda: workloads.reweighting(hidden=1024, layers=4, batch=256, name="reweighting-large"),
             ("sama", "neumann:iterations=5,alpha=0.1", "cg:iterations=5", "unroll:steps=1"), 6, 1, focus="sama"),
        Case("darts", lambda: workloads.darts(size=8, C=8, layers=3, batch=32), ("finite_difference", "first_order"), 12, 1),
        Case("darts", lambda: workloads.darts(size=32, C=8, layers=2, batch=16), ("finite_difference", "first_order"), 6, 1),
        *(Case("darts", build, algorithms, repeats, 1) for build, algorithms, repeats in supernet_bench.speed_programs()),
        *(GPU_CASES if torch.device(device).type == "cuda" else []),
    ]


#: rows only a GPU runs in reasonable time: DARTS's own search network (CIFAR-sized 3x32x32
#: images, C=16, 8 cells, batch 64), the size of Betty's DARTS example
GPU_CASES = [
    Case("darts", lambda: workloads.darts(size=32, C=16, layers=8, batch=64, name="darts-search32"),
         ("finite_difference", "first_order"), 50, 3),
]


def _contenders(program: workloads.Bilevel, spec: str, impls: Sequence[str],
                compile_backend: str = "inductor") -> tuple[list[Contender], dict[str, str]]:
    est = estimators.parse(spec)
    label = _label(spec)
    built, skipped = [], {}
    for impl in impls:
        build = functools.partial(mlo_compiled_round, backend=compile_backend) if impl == "mlo-compile" \
            else functools.partial(build_round, impl)
        try:
            step, note = build(program.instantiate(), est)
        except NotApplicable as why:
            skipped[impl] = str(why)
            continue
        built.append(Contender(program.name, impl, step, label, note))
    return built, skipped


def _label(spec: str) -> str:
    name, _, opts = spec.partition(":")
    return name if not opts else f"{name}({opts})"


def check_bound(problem: str, algorithm: str, peer: str, has_floor: bool) -> float | None:
    """The bound ``--check`` holds mlo / ``peer`` to on a row, or None where it holds none: the
    hand-engine floor on every row, the hand-written loop where the floor runs the row too
    (``has_floor``: the bilevel programs; MAML's per-task loops have their own targets), Betty
    where `BETTY_CHECK_BOUNDS` names the row."""
    if peer == "hand-engine" or (peer == "hand" and has_floor):
        return CHECK_BOUNDS[peer]
    if peer == "betty":
        return next((b for (p, prefix), b in BETTY_CHECK_BOUNDS.items() if problem == p and algorithm.startswith(prefix)), None)
    return None


def _ratios(kind: str, results: Sequence[Result]) -> list[Ratio]:
    by_impl = {r.impl: r for r in results}
    mine = by_impl.get("mlo")
    if mine is None:
        return []
    floor = "hand-engine" in by_impl

    def bound(peer: str) -> float | None:
        return check_bound(mine.problem, mine.algorithm, peer, floor)

    out = []
    if "hand" in by_impl:
        out.append(ratio(mine, by_impl["hand"], bound("hand") or HAND_TARGET))
    if "betty" in by_impl:
        target, strict = TARGETS[kind]
        checked = bound("betty")
        if checked is not None:
            target, strict = checked, False
        betty = by_impl["betty"]
        note = "Betty runs a different method (see its note)" if betty.note else ""
        out.append(ratio(mine, betty, target, strict, MEMORY_TARGET, note))
    for peer in ("hand-engine", "higher", "torchopt"):
        if peer in by_impl:
            out.append(ratio(mine, by_impl[peer], bound(peer)))
    if "mlo-compile" in by_impl:  # what torch.compile changes in mlo's own round
        out.append(ratio(by_impl["mlo-compile"], mine))
    return out


#: peak memory of the focus estimator (sama) against neumann's on the same program
ESTIMATOR_MEMORY_TARGET = 0.5


def _estimator_ratios(results: Sequence[Result], focus: str) -> list[Ratio]:
    """mlo running ``focus`` against mlo running each other algorithm (measured interleaved):
    ``num`` and ``den`` are the two algorithms."""
    mine = [r for r in results if r.impl == "mlo"]
    chosen = next((r for r in mine if r.algorithm == focus), None)
    if chosen is None:
        return []
    out = []
    for other in mine:
        if other is not chosen:
            target = ESTIMATOR_MEMORY_TARGET if other.algorithm.startswith("neumann") else None
            q = ratio(chosen, other, memory_target=target)
            out.append(dataclasses.replace(q, algorithm=focus, num=focus, den=other.algorithm))
    return out


def check(ratios: Sequence[Ratio]) -> list[str]:
    """The rows whose time ratio is past its ``--check`` bound, each named with its ratio and
    bound (`CHECK_BOUNDS`, `BETTY_CHECK_BOUNDS`); empty when every row is within. The bound on
    the hand-written loop applies where the hand-engine loop runs the same row (the bilevel
    programs; MAML's per-task loops have their own targets)."""
    floors = {(q.problem, q.algorithm) for q in ratios if q.num == "mlo" and q.den == "hand-engine"}
    failed = []
    for q in ratios:
        if q.num != "mlo" or math.isnan(q.time_ratio):
            continue
        bound = check_bound(q.problem, q.algorithm, q.den, (q.problem, q.algorithm) in floors)
        if bound is not None and q.time_ratio > bound:
            failed.append(f"{q.problem} {q.algorithm}: mlo / {q.den} = {q.time_ratio:.3f} > {bound:.2f}")
    return failed


def profile_rounds(contender: Contender, rounds: int, top: int = 15) -> str:
    """cProfile of ``rounds`` untimed rounds of ``contender``: the ``top`` functions by own time."""
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(rounds):
        contender.step()
    profiler.disable()
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(top)
    return out.getvalue()


def resolve_device(name: str | torch.device) -> torch.device:
    """The device the suite runs on, checked before anything is built: ``cpu`` or ``cuda[:N]``
    with that GPU present (`ConfigError` naming the option otherwise)."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device {str(name)!r} is not a device: the speed suite runs on cpu or cuda[:N]") from None
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device {str(name)!r}: the speed suite runs on cpu or cuda[:N]")
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError(f"--device {str(name)!r}: this machine has no CUDA GPU (torch.cuda.is_available() is "
                              "False); the suite's GPU rows need one")
        if device.index is not None and device.index >= count:
            raise ConfigError(f"--device {str(name)!r}: this machine has {count} CUDA GPU(s), numbered from 0")
    return device


def run(quick: bool = False, json_path: str | Path | None = None, repeats: int | None = None,
        console: Console | None = None, impls: Sequence[str] = IMPLS,
        profile: bool = False, only: Sequence[str] | None = None, device: str | torch.device = "cpu",
        compile_backend: str | None = None) -> tuple[list[Result], list[Ratio]]:
    """Run the suite, print its tables, write JSON to ``json_path`` if given. ``profile``: also
    print (and keep in the JSON) a cProfile of mlo's rounds for every program and algorithm.
    ``only``: the programs to run, by name (``ridge``, ``reweighting``, ``hpo``, ``reweighting-large``,
    ``darts8x8``, ``darts32x32``, ``darts-fmnist14``, ``darts-fmnist28``, ``maml``, and on a GPU
    ``darts-search32``); all by default.
    ``device``: where every program runs (``cuda`` for the GPU rows; rounds are timed between
    synchronisations and peak memory is the CUDA allocator's). ``compile_backend``: also time mlo
    with each program's lower module compiled by ``torch.compile(backend=...)`` (``mlo-compile``;
    the first-order algorithms, as the compiled backward is not differentiated again)."""
    device = resolve_device(device)
    if device.type == "cuda":  # peers that place modules on "the" GPU (Betty) place them on this one
        torch.cuda.set_device(device)
    console = console or make_console()
    if compile_backend is not None:
        impls = (*impls, "mlo-compile")
    results: list[Result] = []
    ratios: list[Ratio] = []
    versus: list[Ratio] = []  # one estimator against the others, all run by mlo
    skipped: dict[str, dict[str, str]] = {}
    programs_config: dict[str, Any] = {}
    profiles: dict[str, str] = {}
    for case in cases(quick, device):
        program = case.build()
        if only is not None and program.name not in only:
            continue
        if device.type != "cpu":
            program = program.to(device)
        programs_config[program.name] = program.config
        groups: list[list[Contender]] = []
        for spec in case.algorithms:
            contenders, missing = _contenders(program, spec, impls, compile_backend or "inductor")
            if missing:
                skipped[f"{program.name} {_label(spec)}"] = missing
            console.log(f"speed: {program.name} {_label(spec)}: {', '.join(c.impl for c in contenders)}")
            groups.append(contenders)
        batches = [[c for group in groups for c in group]] if case.focus else groups
        for batch in batches:
            measured = measure(batch, repeats or case.repeats, case.warmup, device)
            results.extend(measured)
            for algorithm in dict.fromkeys(r.algorithm for r in measured):
                ratios.extend(_ratios(case.kind, [r for r in measured if r.algorithm == algorithm]))
            if case.focus:
                versus.extend(_estimator_ratios(measured, _label(case.focus)))
            if profile:  # every algorithm measured in this batch, not only the last one built
                for c in batch:
                    if c.impl == "mlo":
                        key = f"{program.name} {c.algorithm}"
                        profiles[key] = profile_rounds(c, max(2, (repeats or case.repeats) // 2))
                        console.rule(f"cProfile of mlo: {key}")
                        console.print(profiles[key], markup=False, highlight=False)
    # MAML: the tasks of a meta-batch as one vmapped level against per-task loops (higher's, by hand)
    measured = [] if only is not None and "maml" not in only else measure(
        maml_bench.contenders(quick, device), 3 if quick else (repeats or 15), 1, device)
    results.extend(measured)
    for problem in dict.fromkeys(r.problem for r in measured):
        by_impl = {r.impl: r for r in measured if r.problem == problem}
        # the target is against higher's loop for MAML; iMAML has no higher, its peer is the per-task loop
        target_peer = "higher" if "higher" in by_impl else "hand"
        for peer in ("higher", "hand"):
            if peer in by_impl and "mlo" in by_impl:
                ratios.append(ratio(by_impl["mlo"], by_impl[peer], MAML_TARGET if peer == target_peer else None))
    programs_config["maml"] = maml_bench.CONFIG
    tables = [results_table(results, "speed: time per round (interleaved) and peak memory"),
              ratios_table(ratios, "speed: ratios (time: median of per-repetition ratios)")]
    if versus:
        tables.append(ratios_table(versus, "speed: one estimator against the others, each run by mlo (num/den: algorithms)"))
    print_tables(*tables, console=console)
    if json_path is not None:
        config = {
            "quick": quick,
            "repeats": repeats,
            "programs": programs_config,
            "cases": [{"kind": c.kind, "algorithms": list(c.algorithms), "repeats": repeats or c.repeats,
                       "warmup": c.warmup} for c in cases(quick, device)],
            "timing": "interleaved round-robin, a seeded random order per repetition, after warm-up; perf_counter",
            "memory": MEMORY_METHOD,
            "torch_threads": torch.get_num_threads(),
            "device": str(device),
            "compile_backend": compile_backend,
        }
        write_json(json_path, "speed", config, results, ratios=[q.as_dict() for q in ratios], skipped=skipped,
                   profiles=profiles, estimator_ratios=[q.as_dict() for q in versus])
    return results, ratios
