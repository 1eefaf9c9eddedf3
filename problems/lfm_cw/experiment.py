"""`mlo run`: search, derive the genotype, evaluate it, for each method and seed; then report.

Everything lands in the output directory as it is produced (results.json is rewritten after
every run, atomically), so an interrupted command keeps what it finished:

    results.json                      the config, and ``runs``: method, seed, test_error, ...
    genotype-<method>-seed<k>.json    the derived genotype
    class-weights-<method>-seed<k>.json   the class weights c after every search round
    log-<method>-seed<k>.json         per round: level losses, class weights c, W1's per-class
                                      mistakes m(W1), the norm of the class weights' hypergradient
    generators/<data>-seed<k>.pt      the pretrained conditional VAE (state dict), shared by every
                                      method of this seed; gate-<data>-seed<k>.json its gate figures
    warmups/seed<k>-<level>.pt        the state after a warm-up (W1 alone; W2 alone on uniformly
                                      weighted synthetic data), shared by every method of this
                                      seed that trains the same level on the same data
    *.png                             class weights, architecture weights, training curves

Runs go seed by seed (every method of seed 0, then of seed 1, ...), so an interrupted comparison
keeps complete pairs.

Resume is exact at every phase boundary: each phase (generator, W1's warm-up, W2's warm-up, each
search stage, the evaluation) starts from a state that is either saved on disk (a cached
generator or warm-up, a phase's checkpoint) or rebuilt from the seed, never from what an earlier
phase left in memory; a killed run resumed with ``--resume`` ends bit for bit where an
uninterrupted one ends.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from torch import Tensor

import mlo

from .. import data as datasets
from ..darts import PDARTS_STAGES, PRIMITIVES, Genotype, Stage, SuperNet, pdarts_next_stage, train_from_scratch
from ..darts.stem import stem_for
from . import plots
from .config import ConfigError, RunConfig
from .augment import AugmentedReal
from .cvae import ConditionalVAE, pretrain_cvae
from .gate import GateReport, quality_gate
from .generator import load_generator
from .class_weights import ClassWeights
from .methods import METHODS
from .program import LFMCW, Constants, MistakesHook, Optimizers, RetrainLoss, WithValidation, augmented_real_source, batches, build

__all__ = [
    "run", "resume", "default_out", "prepare", "build_program", "warm_up", "generator_for", "checked_engine", "prepare_output",
    "genotype_distance", "evaluate",
]


class _Recorder(mlo.Hook):
    """Per round: each level's mean loss, the class weights c, and how far the architecture has
    moved from where this stage's search started (saved in checkpoints)."""

    def __init__(self, program: LFMCW, max_skip: int | None = None) -> None:
        self.program, self.max_skip = program, max_skip
        self.losses: dict[str, list[float]] = defaultdict(list)
        self.class_weights: list[list[float]] = []
        self.mistakes: list[list[float]] = []
        self.phi_grad_norm: list[float | None] = []
        self.arch_distance: list[float] = []
        self.genotype_changes: list[int] = []
        self._round: dict[str, list[Tensor]] = defaultdict(list)
        self._norms_seen = 0
        arch = program.architecture
        self._initial = [t.detach().clone() for t in arch.parameters()]
        self._initial_genotype = arch.genotype(max_skip=max_skip)

    def on_step(self, engine: mlo.Engine, level: str, loss: Tensor) -> None:
        self._round[level].append(loss)

    def on_round(self, engine: mlo.Engine) -> None:
        for level, values in self._round.items():
            self.losses[level].append(float(torch.stack(values).mean()))
        self._round.clear()
        arch = self.program.architecture
        with torch.no_grad():
            moved = sum(float((t - t0).pow(2).sum()) for t, t0 in zip(arch.parameters(), self._initial))
        self.arch_distance.append(moved**0.5)
        self.genotype_changes.append(genotype_distance(arch.genotype(max_skip=self.max_skip), self._initial_genotype))
        if self.program.class_weights is not None:
            with torch.no_grad():
                self.class_weights.append([float(v) for v in self.program.class_weights().cpu()])
                self.mistakes.append([float(v) for v in self.program.class_weights.mistakes.cpu()])
            norms = self.program.phi_grad_norms[self._norms_seen:]
            self._norms_seen = len(self.program.phi_grad_norms)
            self.phi_grad_norm.append(float(torch.stack(norms).mean()) if norms else None)

    def adopt(self, earlier: "_Recorder") -> None:
        """Continue ``earlier``'s history (P-DARTS stages share one)."""
        self.losses, self.class_weights = earlier.losses, earlier.class_weights
        self.mistakes, self.phi_grad_norm = earlier.mistakes, earlier.phi_grad_norm
        self.arch_distance, self.genotype_changes = earlier.arch_distance, earlier.genotype_changes

    def log(self) -> list[dict[str, Any]]:
        rounds = max([len(v) for v in self.losses.values()] + [len(self.class_weights)], default=0)
        return [
            {
                "round": i + 1,
                "losses": {k: v[i] for k, v in self.losses.items() if i < len(v)},
                "class_weights": self.class_weights[i] if i < len(self.class_weights) else None,
                "w1_mistakes": self.mistakes[i] if i < len(self.mistakes) else None,
                "phi_hypergradient_norm": self.phi_grad_norm[i] if i < len(self.phi_grad_norm) else None,
                "arch_distance": self.arch_distance[i] if i < len(self.arch_distance) else None,
                "genotype_changes": self.genotype_changes[i] if i < len(self.genotype_changes) else None,
            }
            for i in range(rounds)
        ]

    def state_dict(self) -> dict[str, Any]:
        return {"losses": dict(self.losses), "class_weights": self.class_weights, "mistakes": self.mistakes,
                "phi_grad_norm": self.phi_grad_norm, "arch_distance": self.arch_distance,
                "genotype_changes": self.genotype_changes}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.losses = defaultdict(list, {k: list(v) for k, v in state["losses"].items()})
        self.class_weights = [list(v) for v in state["class_weights"]]
        self.mistakes = [list(v) for v in state["mistakes"]]
        self.phi_grad_norm = list(state["phi_grad_norm"])
        self.arch_distance = [float(v) for v in state.get("arch_distance", [])]
        self.genotype_changes = [int(v) for v in state.get("genotype_changes", [])]


def genotype_distance(a: Genotype, b: Genotype) -> int:
    """How many of ``a``'s edges (input, op) ``b`` lacks, node by node, in both cells: 0 for the
    same genotype, at most 2 edges x nodes x 2 cells (the order of a node's two edges is ignored)."""
    if a.steps != b.steps:
        raise ConfigError(f"genotypes with {a.steps} and {b.steps} nodes per cell cannot be compared")
    differ = 0
    for ours, theirs in ((a.normal, b.normal), (a.reduce, b.reduce)):
        for node in range(a.steps):
            left = list(ours[2 * node: 2 * node + 2])
            for edge in theirs[2 * node: 2 * node + 2]:
                if edge in left:
                    left.remove(edge)
            differ += len(left)
    return differ


def _run_phase(engine: mlo.Engine, rounds: int, saver: mlo.checkpoint.Checkpoint | None) -> None:
    """``rounds`` rounds of ``engine``; with checkpoints, from the newest one of this phase (a
    finished phase runs no round) and saving at its end, so a later resume skips it."""
    if saver is None:
        engine.run(rounds)
        return
    mlo.checkpoint.load_latest(engine, saver.directory, saver.prefix)  # skips a damaged newest one, saying so
    engine.run(rounds - engine.round)
    if not saver.path(engine.round).exists():
        saver.save(engine)


def prepare_output(out: str | None, methods: list[str], resume: bool = False) -> Path:
    """The output directory: a new timestamped folder under runs/ by default. An existing folder
    that already holds results is refused, so earlier results are never overwritten (unless the
    run resumes there)."""
    path = default_out(methods) if out is None else Path(out)
    if (path / "results.json").exists() and not resume:
        raise ConfigError(f"output directory {str(path)!r} already holds results.json; choose another --out (or --resume it)")
    if mlo.distributed.is_main():
        path.mkdir(parents=True, exist_ok=True)
    mlo.distributed.barrier()
    return path


def default_out(methods: list[str]) -> Path:
    """The output folder of a run given no ``out``: ``runs/<methods>-<date>-<time>``."""
    return Path("runs") / f"{'+'.join(methods)}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def _write_json(path: Path, data: Any) -> None:
    """Write ``data`` atomically and durably (rank 0 only): a temporary file, fsync, rename."""
    if not mlo.distributed.is_main():
        return
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w") as f:
        f.write(json.dumps(data, indent=2))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _supernet_factory(config: RunConfig, splits: datasets.DataSplits, stage: Stage | None, mask: Any) -> Any:
    layers = stage.layers if stage is not None else config.layers
    pc = config.space == "pc-darts"
    return lambda: SuperNet(
        C=config.channels, num_classes=splits.num_classes, layers=layers, in_channels=splits.input_shape[0],
        steps=config.cell_steps, multiplier=config.cell_steps,
        pc_k=config.pc_k if pc else 1, edge_norm=pc, op_mask=mask, stem=stem_for(splits.input_shape),
    )


def _stages(config: RunConfig) -> list[tuple[Stage | None, int]]:
    """(stage, rounds) pairs: one stage for DARTS/PC-DARTS; P-DARTS deepens by 2 cells per stage
    from ``layers`` while keeping 8, 5, then 3 ops per edge, the rounds split evenly."""
    if config.space != "p-darts":
        return [(None, config.search_rounds)]
    n = len(PDARTS_STAGES)
    rounds = [config.search_rounds // n + (1 if i < config.search_rounds % n else 0) for i in range(n)]
    return [(Stage(config.layers + 2 * i, s.ops_per_edge), r) for i, (s, r) in enumerate(zip(PDARTS_STAGES, rounds))]


def _saver(config: RunConfig, out: Path | None, tag: str) -> mlo.checkpoint.Checkpoint | None:
    every = config.checkpoint_every
    return mlo.checkpoint.Checkpoint(out, every, prefix=f"checkpoint-{tag}") if every and out is not None else None


def _precision(config: RunConfig, program: LFMCW) -> dict[str, str]:
    """The run's precision, the same on every level (fp16: each level with its gradient scaler,
    the upper levels' hypergradients loss-scaled; `mlo.precision`)."""
    return {p.name: config.precision for p in program.problems}


def search_engine(config: RunConfig, program: LFMCW, hooks: list[mlo.Hook]) -> mlo.Engine:
    """The engine of a search phase: ``program``'s levels, graph and estimators, the run's
    precision and sync; `mlo run` and `mlo check` both build it here."""
    return mlo.Engine(program.problems, program.graph, program.estimators, hooks=hooks,
                      precision=_precision(config, program), sync=config.sync)


def build_program(
    config: RunConfig, method: str, seed: int, splits: datasets.DataSplits, generator: Any, rounds: int,
    index: int = 0, stage: Stage | None = None, mask: Any = None,
) -> LFMCW:
    """The program ``method`` searches with in stage ``index`` under ``config``: its levels, graph,
    per-edge estimators (``config.estimator`` and ``config.edge_estimators`` applied) and hooks.
    In the first stage the weights' schedules start with their warm-ups (`build`)."""
    spec = METHODS[method]
    constants = Constants(
        config.lam, config.gamma, config.beta, config.synthetic_per_step, config.mistakes,
        learn_total=config.learn_total, finetune_generator=config.finetune_generator, mistakes_grad=config.mistakes_grad,
    )
    optim = Optimizers(w_lr=config.w_lr, arch_lr=config.arch_lr, phi_lr=config.phi_lr,
                       w_grad_clip=config.w_grad_clip, arch_grad_clip=config.arch_grad_clip)
    program = build(
        splits.train, splits.val, splits.num_classes, splits.input_shape,
        _supernet_factory(config, splits, stage, mask), spec.variant, constants, optim,
        rounds=rounds, batch_size=config.batch_size,
        estimator=config.estimator or spec.estimator, generator=generator, device=config.device, seed=seed,
        workers=config.workers, w1_warmup=config.w1_warmup if index == 0 and config.warms_up(method) else 0,
        w2_warmup=config.w2_warmup if index == 0 and config.warms_up(method) else 0,
    )
    for edge, est in config.edge_estimators.items():  # checked against every method's edges
        upper, _, lower = (s.strip() for s in edge.partition("->"))
        if (upper, lower) in program.estimators:  # methods without this edge ignore it
            program.estimators[(upper, lower)] = est
    return program


def _mistakes_hook(config: RunConfig, program: LFMCW, splits: datasets.DataSplits, seed: int) -> MistakesHook:
    """The hook that measures W1's mistakes during its warm-up: the program's own, or (a method
    without one) a hook on class weights of its own that the search never reads, so that every
    method's W1 warm-up is the same engine and one cached warm-up serves them all."""
    for hook in program.hooks:
        if isinstance(hook, MistakesHook):
            return hook
    device = torch.device(config.device)
    weights = ClassWeights(splits.num_classes, config.beta, Constants().mistakes_momentum).to(device)
    val = batches(splits.val, config.batch_size, seed * 1000 + 2, device, config.workers)  # the stream `build` gives its hook
    return MistakesHook(program.w1, program.architecture, weights, val, config.mistakes)


def _uniform_w2(program: LFMCW) -> mlo.Problem:
    """W2's level for its warm-up: its loss, optimizer, schedule and data, with the class weights
    held at 1 (uniform), so that the warm-up is the same for every method with this data source."""
    w2 = next(p for p in program.problems if p.name == "w2")
    assert isinstance(w2, RetrainLoss) and program.w2 is not None
    uniform = ClassWeights(w2.weights.num_classes, beta=0.0).to(next(program.w2.parameters()).device)  # c = 1, fixed
    # on the mistakes path W2's batches carry a validation batch for W1's mistakes: not read here
    data = w2.data.base if isinstance(w2.data, WithValidation) else w2.data
    return RetrainLoss(program.w2, w2.arch, uniform, w2.generator, w2.lam, optimizer=w2.optimizer, data=data,
                       scheduler=w2.scheduler, transform=w2.transform)


def _source(config: RunConfig, method: str) -> str:
    """The name of the data W2 trains on besides the real data (the key of W2's cached warm-up)."""
    variant = METHODS[method].variant
    if not variant.generator:
        return "real"
    if variant.augmented_real:
        return "aug"
    if config.generator == "cgan":
        return f"cgan-{method}"  # trained as levels of this method's program: not shared
    return "cvae" if config.generator == "cvae" else "file"


def _warm_up_phase(
    config: RunConfig, problem: mlo.Problem, hooks: list[mlo.Hook], precision: str, steps: int, name: str,
    out: Path | None, progress: Progress | None,
) -> None:
    """``steps`` steps of one level alone, or their end state cached in ``OUT/warmups/<name>.pt``
    by an earlier method of this seed. With checkpoints a killed warm-up resumes from its newest
    ``checkpoint-<name>-<step>.pt``; the cache is written when it ends."""
    saver = _saver(config, out, name)
    shown: list[mlo.Hook] = [mlo.logs.Progress(steps, name, progress)] if progress is not None else []
    engine = mlo.Engine([problem], {}, hooks=[*hooks, *shown, *([saver] if saver else [])], precision={problem.name: precision})
    cache = out / "warmups" / f"{name}.pt" if out is not None else None
    if cache is not None and cache.exists():
        mlo.checkpoint.load(engine, cache)
        return
    _run_phase(engine, steps, saver)
    if cache is not None:
        mlo.checkpoint.save(engine, cache)


def _warm_ups(
    config: RunConfig, method: str, seed: int, splits: datasets.DataSplits, program: LFMCW, precision: dict[str, str],
    out: Path | None, progress: Progress | None,
) -> None:
    """Before the search: the GAN levels alone (a cGAN trained as levels), then W1 alone (its
    mistakes measured), then W2 alone on uniformly weighted synthetic data; each level's
    learning rate is constant here and its cosine starts with the search (`build`)."""
    tag = f"{method}-seed{seed}"
    if config.generator_warmup and any(p.name == "generator" for p in program.problems) and config.generator == "cgan":
        gan = [p for p in program.problems if p.name in ("discriminator", "generator")]
        saver = _saver(config, out, f"{tag}-warmup")
        shown = [mlo.logs.Progress(config.generator_warmup, f"generator warm-up seed {seed}", progress)] if progress else []
        warm = mlo.Engine(gan, {}, hooks=[*shown, *([saver] if saver else [])], precision={p.name: precision[p.name] for p in gan})
        _run_phase(warm, config.generator_warmup, saver)
    if config.w1_warmup and config.warms_up(method):  # W1 learns before its mistakes steer the class weights
        w1 = next(p for p in program.problems if p.name == "w1")
        balanced = "-balanced" if METHODS[method].variant.balanced_loss else ""
        _warm_up_phase(config, w1, [_mistakes_hook(config, program, splits, seed)], precision["w1"], config.w1_warmup,
                       f"seed{seed}-warmup-w1{balanced}", out, progress)
    if config.w2_warmup and config.warms_up(method) and program.w2 is not None:  # W2 too, so that its validation loss means something
        _warm_up_phase(config, _uniform_w2(program), [], precision["w2"], config.w2_warmup,
                       f"seed{seed}-warmup-w2-{_source(config, method)}", out, progress)


def warm_up(config: RunConfig, program: LFMCW, splits: datasets.DataSplits, seed: int = 0) -> None:
    """The warm-ups of ``program`` (`_warm_ups`), in memory: what `mlo check` runs before its rounds."""
    _warm_ups(config, config.methods[0], seed, splits, program, _precision(config, program), None, None)


def _search(
    config: RunConfig, method: str, seed: int, splits: datasets.DataSplits, generator: Any, progress: Progress,
    out: Path | None = None,
) -> tuple[LFMCW, _Recorder, float]:
    """The search phases of one run; with an ``out`` folder they write metrics and checkpoints there."""
    mask = None
    recorder: _Recorder | None = None
    start = time.perf_counter()
    arch_prev = None
    max_skip = 2 if config.space == "p-darts" else None
    for index, (stage, rounds) in enumerate(_stages(config)):
        if stage is not None and arch_prev is not None:  # P-DARTS: prune before deepening
            _, mask = pdarts_next_stage(arch_prev, stage)
        program = build_program(config, method, seed, splits, generator, rounds, index, stage, mask)
        new_recorder = _Recorder(program, max_skip)
        if recorder is not None:  # keep one history across P-DARTS stages
            new_recorder.adopt(recorder)
        recorder = new_recorder
        tag = f"{method}-seed{seed}"
        precision = _precision(config, program)
        if index == 0:
            _warm_ups(config, method, seed, splits, program, precision, out, progress)
        phase = "search" + (f"-stage{index + 1}" if stage is not None else "")
        label = f"search {method} seed {seed}" + (f" stage {index + 1}" if stage is not None else "")
        if config.engine == "betty":
            from mlo.engines.betty import run_on_betty

            task = progress.add_task(label, total=rounds, losses="")
            run_on_betty(program.problems, program.graph, program.estimators, rounds, config.allow_inexact)
            progress.update(task, completed=rounds, losses="(on Betty's engine: no per-level losses)")
        else:
            saver = _saver(config, out, f"{tag}-{phase}")
            logs: list[mlo.Hook] = [mlo.logs.JSONLines(out / f"metrics-{tag}-{phase}.jsonl")] if out is not None else []
            if config.tensorboard and out is not None:
                logs.append(mlo.logs.TensorBoard(out / "tensorboard" / f"{tag}-{phase}"))
            hooks = [*program.hooks, recorder, mlo.logs.Progress(rounds, label, progress), *logs, *([saver] if saver else [])]
            engine = search_engine(config, program, hooks)
            _run_phase(engine, rounds, saver)
        arch_prev = program.architecture
        if generator is None and program.generator is not None:  # P-DARTS: later stages keep the trained GAN
            generator = program.generator
    assert recorder is not None
    return program, recorder, time.perf_counter() - start


def evaluate(
    config: RunConfig, genotype: Genotype, splits: datasets.DataSplits, seeds: list[int], progress: Progress | None = None,
    label: str = "evaluate",
) -> dict[str, Any]:
    """Train ``genotype`` from scratch once per evaluation seed in ``seeds`` (config's evaluation
    network and budget) and average: ``test_error`` and ``balanced_error`` are the means over the
    seeds, ``evaluations`` each seed's result and training history."""
    runs: list[dict[str, Any]] = []
    for eval_seed in seeds:
        task = progress.add_task(f"{label} (evaluation seed {eval_seed})", total=config.eval_epochs, losses="") if progress else None

        def shown(r: Any, task: Any = task) -> None:
            if progress is not None:
                progress.update(task, advance=1, losses=f"train loss {r.train_loss:.3f}  test error {r.test_error:.2f}%")

        result = train_from_scratch(
            genotype, splits, epochs=config.eval_epochs, batch_size=config.eval_batch_size, lr=config.eval_lr,
            C=config.eval_channels, layers=config.eval_layers, weight_decay=config.eval_weight_decay,
            lr_schedule=config.eval_lr_schedule, lr_decay=config.eval_lr_decay, label_smoothing=config.eval_label_smoothing,
            auxiliary=config.auxiliary_weight > 0,
            auxiliary_weight=config.auxiliary_weight, drop_path_prob=config.drop_path, device=config.device, seed=eval_seed,
            num_workers=config.workers if torch.device(config.device).type == "cuda" else 0, progress_callback=shown,
            test_every_epoch=config.eval_test_every_epoch,
        )
        runs.append({"seed": eval_seed, "test_error": result.test_error, "balanced_error": result.balanced_error,
                     "params": result.params, "history": [vars(r) for r in result.history]})
    return {
        "test_error": statistics.fmean(r["test_error"] for r in runs),
        "balanced_error": statistics.fmean(r["balanced_error"] for r in runs),
        "params": runs[0]["params"],
        "evaluations": runs,
    }


def _genotype_key(genotype: Genotype, seeds: list[int]) -> str:
    """What an evaluation depends on besides the config: the genotype and the evaluation seeds."""
    return json.dumps({"genotype": dataclasses.asdict(genotype), "seeds": seeds}, sort_keys=True)


def _run_one(
    config: RunConfig, method: str, seed: int, splits: datasets.DataSplits, generator: Any, out: Path, progress: Progress,
    eval_splits: datasets.DataSplits | None = None, evaluated: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Search on ``splits``, then train the genotype from scratch on ``eval_splits`` (default: the
    same; for CIFAR the evaluation data adds Cutout, which the search never sees) with each
    evaluation seed (0 .. ``config.eval_seeds`` - 1, else the search seed). ``evaluated`` maps a genotype
    and its evaluation seeds to the evaluation already done: a genotype found again is not
    trained again (same genotype, same seeds: the same result)."""
    torch.manual_seed(seed)
    if config.finetune_generator and generator is not None:  # its fine-tuning must not reach the next method
        generator = copy.deepcopy(generator)
    program, recorder, search_seconds = _search(config, method, seed, splits, generator, progress, out)
    arch = program.architecture
    genotype = arch.genotype(max_skip=2 if config.space == "p-darts" else None)
    tag = f"{method}-seed{seed}"
    main = mlo.distributed.is_main()  # every rank evaluates (identically); rank 0 writes
    if main:
        genotype.save(out / f"genotype-{tag}.json")

    seeds = list(range(config.eval_seeds)) or [seed]
    key = _genotype_key(genotype, seeds)
    evaluated = {} if evaluated is None else evaluated
    reused = key in evaluated
    if not reused:
        evaluated[key] = evaluate(config, genotype, eval_splits or splits, seeds, progress, f"evaluate {method} seed {seed}")
    result = evaluated[key]
    if main:
        _plots(config, method, seed, splits, program, recorder, result, out)
    return {
        "method": method,
        "seed": seed,
        "test_error": result["test_error"],
        "balanced_error": result["balanced_error"],
        "search_seconds": search_seconds,
        "params": result["params"],
        "genotype": f"genotype-{tag}.json",
        "eval_seeds": seeds,
        "evaluation_reused": reused,
        "evaluations": result["evaluations"],
        "arch_distance": recorder.arch_distance[-1] if recorder.arch_distance else 0.0,
        "genotype_changes": recorder.genotype_changes[-1] if recorder.genotype_changes else 0,
        "final_class_weights": recorder.class_weights[-1] if recorder.class_weights else None,
        "final_total_weight": sum(recorder.class_weights[-1]) if recorder.class_weights else None,
        "final_w1_mistakes": recorder.mistakes[-1] if recorder.mistakes else None,
        "history": result["evaluations"][0]["history"],
    }


def _plots(
    config: RunConfig, method: str, seed: int, splits: datasets.DataSplits, program: LFMCW, recorder: _Recorder,
    result: Any, out: Path,
) -> None:
    """The run's plots and class-weight history."""
    arch, tag = program.architecture, f"{method}-seed{seed}"
    with torch.no_grad():
        weights = arch()
    edge_names = [f"{j}->{i + 2}" for i in range(arch.steps) for j in range(i + 2)]
    plots.architecture(
        {"normal": weights.normal.cpu().numpy(), "reduction": weights.reduce.cpu().numpy()},
        PRIMITIVES, edge_names, out / f"architecture-{tag}.png", f"{method} (seed {seed}): architecture weights per edge",
    )
    history = result["evaluations"][0]["history"]
    plots.curves(
        dict(recorder.losses), [r["train_loss"] for r in history], [r["test_error"] for r in history],
        out / f"curves-{tag}.png", f"{method} (seed {seed})",
    )
    if program.generator is not None:
        gen = torch.Generator().manual_seed(seed)
        k = min(splits.num_classes, 20)  # the first 20 classes: ImageNet's 1000 rows would pass matplotlib's size limit
        z = torch.randn(k * 8, getattr(program.generator, "noise_dim", Constants().noise_dim), generator=gen)
        labels = torch.arange(k).repeat_interleave(8)
        with torch.no_grad():
            fake = program.generator(z.to(config.device), labels.to(config.device)).cpu().numpy()
        plots.samples(fake.reshape(k, 8, *fake.shape[1:]), out / f"synthetic-{tag}.png", f"{method} (seed {seed}): generated images per class")
    _write_json(out / f"log-{tag}.json", recorder.log())
    if recorder.class_weights:
        _write_json(out / f"class-weights-{tag}.json", recorder.class_weights)
        plots.class_weights(
            recorder.class_weights, [str(k) for k in range(splits.num_classes)],
            out / f"class-weights-{tag}.png", f"{method} (seed {seed}): class weights over the search",
        )


def augmented_real(splits: datasets.DataSplits, config: RunConfig) -> AugmentedReal:
    """The ``lfm-cw-aug`` source of this data set: mirrored too, except on digits (whose classes
    are not left-right symmetric)."""
    flip = not splits.name.startswith("digits")
    return augmented_real_source(splits.train, splits.num_classes, splits.input_shape, flip).to(config.device)


def cached_cvae(
    config: RunConfig, splits: datasets.DataSplits, seed: int, out: Path, console: Console
) -> tuple[ConditionalVAE, GateReport]:
    """The conditional VAE of this data set and seed: loaded from ``out/generators/`` when a
    previous method pretrained it, else pretrained and saved there; then its quality gate, printed
    (loudly when it fails) and saved next to it."""
    folder = out / "generators"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{splits.name}-seed{seed}.pt"
    vae = ConditionalVAE(splits.num_classes, splits.input_shape, Constants().noise_dim)
    workers = config.workers if torch.device(config.device).type == "cuda" else 0  # image decoding, as the search's loaders
    if path.is_file():
        vae.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        vae.eval()
    else:
        start = time.perf_counter()
        vae = pretrain_cvae(
            splits.train, splits.num_classes, splits.input_shape, seed=seed, steps=config.generator_warmup,
            noise_dim=Constants().noise_dim, kl_weight=config.kl_weight(), device="cpu", workers=workers,
        )
        if mlo.distributed.is_main():  # atomic: a run killed while writing leaves no half file to load
            mlo.checkpoint.write_atomic(vae.state_dict(), path)
        console.print(f"generator: conditional VAE pretrained on {splits.name} (seed {seed}) in {time.perf_counter() - start:.1f} s -> {path}")
    gate = quality_gate(vae, splits.train, splits.val, splits.num_classes, vae.noise_dim, seed=seed, workers=workers)
    _write_json(folder / f"gate-{splits.name}-seed{seed}.json", gate.to_dict())
    if gate.passed:
        console.print(f"[green]{gate.summary()}[/]")
    else:
        console.print(f"[bold red]WARNING: {gate.summary()}. The synthetic data W2 trains on is not trustworthy; "
                      "LFM-CW's class weights will weight it anyway.[/]")
    return vae.to(config.device), gate


def _summary(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for method in dict.fromkeys(r["method"] for r in runs):
        mine = [r for r in runs if r["method"] == method]

        def stats(key: str) -> tuple[float, float]:
            values = [float(r[key]) for r in mine]
            return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0

        row: dict[str, Any] = {"method": method, "seeds": len(mine)}
        for key in ("test_error", "balanced_error", "search_seconds", "params"):
            row[key], row[key + "_std"] = stats(key)
        rows.append(row)
    return rows


def _table(summary: list[dict[str, Any]], imbalanced: bool) -> Table:
    table = Table(title="mlo run: searched architectures, trained from scratch")
    for col in ("method", "seeds", "search time (s)", "params", "test error (%)") + (("balanced error (%)",) if imbalanced else ()):
        table.add_column(col, justify="left" if col == "method" else "right")
    for row in summary:
        spread = row["seeds"] > 1  # one seed has no spread to show

        def error(key: str, row: dict[str, Any] = row, spread: bool = spread) -> str:
            return f"{row[key]:.2f} ± {row[key + '_std']:.2f}" if spread else f"{row[key]:.2f} ± —"

        cells = [row["method"], str(row["seeds"]), f"{row['search_seconds']:.1f}", f"{row['params'] / 1e3:.1f}k",
                 error("test_error")]
        if imbalanced:
            cells.append(error("balanced_error"))
        table.add_row(*cells)
    return table


def prepare(config: RunConfig) -> tuple[datasets.DataSplits, Any]:
    """Check every option, then load the search data and the generator checkpoint (if one is
    named): what every search of ``config`` shares."""
    config.validate()  # every option checked before any data is read
    if config.engine == "betty" and mlo.distributed.active():
        raise ConfigError("engine 'betty' does not run data-parallel; run it without torchrun (or use engine 'mlo')")
    if config.threads:
        torch.set_num_threads(config.threads)
    if torch.device(config.device).type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input sizes: let cuDNN pick its fastest kernels once
    splits = datasets.load(config.dataset, config.data_root, config.imbalance, seed=0, **config.data_options(search=True))
    loaded = None
    if config.generator not in ("cgan", "cvae"):
        loaded = load_generator(config.generator, splits.num_classes, splits.input_shape, allow_pickle=config.unsafe_pickle)
    return splits, loaded


def generator_for(
    config: RunConfig, method: str, seed: int, splits: datasets.DataSplits, loaded: Any, sources: dict[str, Any],
    out: Path, console: Console, gates: dict[str, Any],
) -> Any:
    """The fixed data source of ``method``'s W2 (``None``: none, or a GAN trained as levels):
    augmented real data, the cached conditional VAE (its quality gate recorded in ``gates``) or
    the loaded checkpoint; ``sources`` keeps those shared by the methods of one seed."""
    variant = METHODS[method].variant
    if not (variant.second_model and variant.generator):
        return None
    if variant.augmented_real:
        if "aug" not in sources:
            sources["aug"] = augmented_real(splits, config)
        return sources["aug"]
    if config.generator == "cvae":
        if "cvae" not in sources:
            sources["cvae"], gate = cached_cvae(config, splits, seed, out, console)
            gates[f"seed{seed}"] = gate.to_dict()
        return sources["cvae"]
    return loaded


def checked_engine(config: RunConfig, console: Console | None = None) -> mlo.Engine:
    """The engine of the first method's search under ``config`` (seed 0, stage 1, after its
    warm-ups), after ``config.search_rounds`` rounds: what `mlo check lfm-cw` inspects. A
    generator it has to pretrain is kept in a temporary folder."""
    console = console or Console(stderr=True)
    splits, loaded = prepare(config)
    method = config.methods[0]
    with tempfile.TemporaryDirectory() as folder:
        generator = generator_for(config, method, 0, splits, loaded, {}, Path(folder), console, {})
    torch.manual_seed(0)
    program = build_program(config, method, 0, splits, generator, config.search_rounds)
    console.print(f"[bold]mlo check[/] {method} on {splits}: {config.search_rounds} rounds", highlight=False)
    warm_up(config, program, splits)
    engine = search_engine(config, program, list(program.hooks))
    engine.run(config.search_rounds)
    return engine


def run(config: RunConfig, console: Console | None = None, resume: bool = False) -> dict[str, Any]:
    """Run every method and seed of ``config``; returns (and writes) the results.

    Its config is written to ``OUT/config.json`` first. With ``checkpoint_every`` every engine
    phase (generator warm-up, search stages) writes ``OUT/checkpoint-<method>-seed<k>-<phase>-<round>.pt``.
    ``resume=True`` continues a run in ``config.out``: finished (method, seed) runs are read from
    results.json, and each phase starts from its newest checkpoint, so the run ends where an
    uninterrupted one ends. Under a process group (torchrun) every rank runs the program on its
    share of each batch, and only rank 0 writes files and prints."""
    main = mlo.distributed.is_main()
    console = console or Console(quiet=not main)
    splits, loaded = prepare(config)
    eval_options = config.data_options()
    eval_splits = (
        splits if eval_options == config.data_options(search=True)
        else datasets.load(config.dataset, config.data_root, config.imbalance, seed=0, **eval_options)
    )
    out = prepare_output(config.out, config.methods, resume)
    config = config.updated({"out": str(out)})
    _write_json(out / "config.json", config.to_dict())
    console.print(f"[bold]mlo run[/] {', '.join(config.methods)} on {splits} -> {out}"
                  + (f" ({mlo.distributed.world_size()} ranks)" if mlo.distributed.active() else ""))
    results: dict[str, Any] = {
        "config": config.to_dict(),
        "data": {"name": splits.name, "num_classes": splits.num_classes, "input_shape": list(splits.input_shape),
                 "sizes": {k: len(getattr(splits, k)) for k in ("train", "val", "test")}},
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "mlo": mlo.__version__,
                    "platform": platform.platform(), "ranks": mlo.distributed.world_size()},
        "runs": [],
        "gates": {},
    }
    if resume and (out / "results.json").exists():
        results["runs"] = json.loads((out / "results.json").read_text())["runs"]
    done = {(r["method"], r["seed"]) for r in results["runs"]}
    evaluated = {  # genotypes already evaluated (on resume: by the finished runs)
        _genotype_key(Genotype.load(out / r["genotype"]), list(r["eval_seeds"])): r
        for r in results["runs"] if "eval_seeds" in r
    }
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("{task.fields[losses]}"))
    with Progress(*columns, console=console, transient=False, disable=not main) as progress:
        for seed in range(config.first_seed, config.first_seed + config.seeds):
            sources: dict[str, Any] = {}
            for method in config.methods:
                if (method, seed) in done:
                    continue
                generator = generator_for(config, method, seed, splits, loaded, sources, out, console, results["gates"])
                results["runs"].append(_run_one(config, method, seed, splits, generator, out, progress, eval_splits, evaluated))
                results["summary"] = _summary(results["runs"])
                _write_json(out / "results.json", results)
    results["summary"] = _summary(results["runs"])
    console.print(_table(results["summary"], imbalanced=config.imbalance is not None))
    console.print(f"results: {out / 'results.json'}")
    return results


def resume(out: str | Path, device: str | None = None, console: Console | None = None) -> dict[str, Any]:
    """Continue the run whose output folder is ``out``, with the config it saved there (on
    ``device`` when given: each rank's own under torchrun)."""
    path = Path(out) / "config.json"
    if not path.is_file():
        raise ConfigError(f"--resume {str(out)!r}: no config.json there (not an output folder of `mlo run`)")
    config = RunConfig().updated(json.loads(path.read_text()), source=str(path))
    if config.out is not None and Path(config.out).resolve() != Path(out).resolve():  # a copied or moved folder
        if mlo.distributed.is_main():
            print(f"mlo run: --resume {str(out)!r}: its config.json names the folder {config.out!r}; "
                  f"resuming in {str(out)!r}, where its checkpoints are read and its results written", file=sys.stderr)
    config = config.updated({"out": str(out)})
    if device is not None:
        config = config.updated({"device": device})
    return run(config, console, resume=True)
