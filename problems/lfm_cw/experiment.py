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
    *.png                             class weights, architecture weights, training curves

Runs go seed by seed (every method of seed 0, then of seed 1, ...), so an interrupted comparison
keeps complete pairs.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
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
from ..darts import PDARTS_STAGES, PRIMITIVES, Stage, SuperNet, pdarts_next_stage, train_from_scratch
from ..darts.stem import stem_for
from . import plots
from .config import ConfigError, RunConfig
from .augment import AugmentedReal
from .cvae import ConditionalVAE, pretrain_cvae
from .gate import GateReport, quality_gate
from .generator import load_generator
from .methods import METHODS
from .program import LFMCW, Constants, Optimizers, augmented_real_source, build

__all__ = ["run", "resume", "prepare", "build_program", "warm_up", "generator_for", "checked_engine", "prepare_output"]


class _Recorder(mlo.Hook):
    """Per round: each level's mean loss, and the class weights c (saved in checkpoints)."""

    def __init__(self, program: LFMCW) -> None:
        self.program = program
        self.losses: dict[str, list[float]] = defaultdict(list)
        self.class_weights: list[list[float]] = []
        self.mistakes: list[list[float]] = []
        self.phi_grad_norm: list[float | None] = []
        self._round: dict[str, list[Tensor]] = defaultdict(list)
        self._norms_seen = 0

    def on_step(self, engine: mlo.Engine, level: str, loss: Tensor) -> None:
        self._round[level].append(loss)

    def on_round(self, engine: mlo.Engine) -> None:
        for level, values in self._round.items():
            self.losses[level].append(float(torch.stack(values).mean()))
        self._round.clear()
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

    def log(self) -> list[dict[str, Any]]:
        rounds = max([len(v) for v in self.losses.values()] + [len(self.class_weights)], default=0)
        return [
            {
                "round": i + 1,
                "losses": {k: v[i] for k, v in self.losses.items() if i < len(v)},
                "class_weights": self.class_weights[i] if i < len(self.class_weights) else None,
                "w1_mistakes": self.mistakes[i] if i < len(self.mistakes) else None,
                "phi_hypergradient_norm": self.phi_grad_norm[i] if i < len(self.phi_grad_norm) else None,
            }
            for i in range(rounds)
        ]

    def state_dict(self) -> dict[str, Any]:
        return {"losses": dict(self.losses), "class_weights": self.class_weights, "mistakes": self.mistakes,
                "phi_grad_norm": self.phi_grad_norm}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.losses = defaultdict(list, {k: list(v) for k, v in state["losses"].items()})
        self.class_weights = [list(v) for v in state["class_weights"]]
        self.mistakes = [list(v) for v in state["mistakes"]]
        self.phi_grad_norm = list(state["phi_grad_norm"])


def _run_phase(engine: mlo.Engine, rounds: int, saver: mlo.checkpoint.Checkpoint | None) -> None:
    """``rounds`` rounds of ``engine``; with checkpoints, from the newest one of this phase (a
    finished phase runs no round) and saving at its end, so a later resume skips it."""
    if saver is None:
        engine.run(rounds)
        return
    path = mlo.checkpoint.latest(saver.directory, saver.prefix)
    if path is not None:
        mlo.checkpoint.load(engine, path)
    engine.run(rounds - engine.round)
    if not saver.path(engine.round).exists():
        saver.save(engine)


def prepare_output(out: str | None, methods: list[str], resume: bool = False) -> Path:
    """The output directory: a new timestamped folder under runs/ by default. An existing folder
    that already holds results is refused, so earlier results are never overwritten (unless the
    run resumes there)."""
    if out is None:
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        path = Path("runs") / f"{'+'.join(methods)}-{stamp}"
    else:
        path = Path(out)
    if (path / "results.json").exists() and not resume:
        raise ConfigError(f"output directory {str(path)!r} already holds results.json; choose another --out (or --resume it)")
    if mlo.distributed.is_main():
        path.mkdir(parents=True, exist_ok=True)
    mlo.distributed.barrier()
    return path


def _write_json(path: Path, data: Any) -> None:
    """Write ``data`` atomically (rank 0 only)."""
    if not mlo.distributed.is_main():
        return
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
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


def build_program(
    config: RunConfig, method: str, seed: int, splits: datasets.DataSplits, generator: Any, rounds: int,
    index: int = 0, stage: Stage | None = None, mask: Any = None,
) -> LFMCW:
    """The program ``method`` searches with in stage ``index`` under ``config``: its levels, graph,
    per-edge estimators (``config.estimator`` and ``config.edge_estimators`` applied) and hooks."""
    spec = METHODS[method]
    constants = Constants(
        config.lam, config.gamma, config.beta, config.synthetic_per_step, config.mistakes,
        learn_total=config.learn_total, finetune_generator=config.finetune_generator,
    )
    optim = Optimizers(w_lr=config.w_lr, arch_lr=config.arch_lr, phi_lr=config.phi_lr)
    program = build(
        splits.train, splits.val, splits.num_classes, splits.input_shape,
        _supernet_factory(config, splits, stage, mask), spec.variant, constants, optim,
        rounds=rounds + (config.w1_warmup if index == 0 and config.warms_up(method) else 0), batch_size=config.batch_size,
        estimator=config.estimator or spec.estimator, generator=generator, device=config.device, seed=seed,
        workers=config.workers,
    )
    for edge, est in config.edge_estimators.items():  # checked against every method's edges
        upper, _, lower = (s.strip() for s in edge.partition("->"))
        if (upper, lower) in program.estimators:  # methods without this edge ignore it
            program.estimators[(upper, lower)] = est
    return program


def warm_up(config: RunConfig, program: LFMCW, gan_hooks: list[mlo.Hook]) -> None:
    """Before the search: ``config.generator_warmup`` steps of the GAN levels alone (if the
    program trains one), then ``config.w1_warmup`` steps of W1, so that it learns before its
    mistakes steer the class weights."""
    gan = [p for p in program.problems if p.name in ("discriminator", "generator")]
    if config.generator_warmup and any(p.name == "generator" for p in gan):
        mlo.Engine(gan, {}, hooks=gan_hooks).run(config.generator_warmup)
    if config.w1_warmup:
        w1 = [p for p in program.problems if p.name == "w1"]
        mlo.Engine(w1, {}, hooks=list(program.hooks)).run(config.w1_warmup)


def _search(
    config: RunConfig, method: str, seed: int, splits: datasets.DataSplits, generator: Any, progress: Progress,
    out: Path | None = None,
) -> tuple[LFMCW, _Recorder, float]:
    """The search phases of one run; with an ``out`` folder they write metrics and checkpoints there."""
    mask = None
    recorder: _Recorder | None = None
    start = time.perf_counter()
    arch_prev = None
    for index, (stage, rounds) in enumerate(_stages(config)):
        if stage is not None and arch_prev is not None:  # P-DARTS: prune before deepening
            _, mask = pdarts_next_stage(arch_prev, stage)
        program = build_program(config, method, seed, splits, generator, rounds, index, stage, mask)
        new_recorder = _Recorder(program)
        if recorder is not None:  # keep one history across P-DARTS stages
            new_recorder.adopt(recorder)
        recorder = new_recorder
        tag = f"{method}-seed{seed}"
        precision = _precision(config, program)
        if index == 0 and config.generator_warmup and any(p.name == "generator" for p in program.problems):
            gan = [p for p in program.problems if p.name in ("discriminator", "generator")]
            saver = _saver(config, out, f"{tag}-warmup")
            shown = mlo.logs.Progress(config.generator_warmup, f"generator warm-up seed {seed}", progress)
            warm = mlo.Engine(gan, {}, hooks=[shown, *([saver] if saver else [])],
                              precision={p.name: precision[p.name] for p in gan})
            _run_phase(warm, config.generator_warmup, saver)
        if index == 0 and config.w1_warmup and config.warms_up(method):  # W1 learns before its mistakes steer the class weights
            w1 = [p for p in program.problems if p.name == "w1"]
            saver = _saver(config, out, f"{tag}-w1warmup")
            first = mlo.Engine(w1, {}, hooks=[*program.hooks, *([saver] if saver else [])], precision={"w1": precision["w1"]})
            _run_phase(first, config.w1_warmup, saver)
        phase = "search" + (f"-stage{index + 1}" if stage is not None else "")
        label = f"search {method} seed {seed}" + (f" stage {index + 1}" if stage is not None else "")
        if config.engine == "betty":
            from mlo.engines.betty import run_on_betty

            task = progress.add_task(label, total=rounds, losses="")
            run_on_betty(program.problems, program.graph, program.estimators, rounds)
            progress.update(task, completed=rounds, losses="(on Betty's engine: no per-level losses)")
        else:
            saver = _saver(config, out, f"{tag}-{phase}")
            logs: list[mlo.Hook] = [mlo.logs.JSONLines(out / f"metrics-{tag}-{phase}.jsonl")] if out is not None else []
            if config.tensorboard and out is not None:
                logs.append(mlo.logs.TensorBoard(out / "tensorboard" / f"{tag}-{phase}"))
            hooks = [*program.hooks, recorder, mlo.logs.Progress(rounds, label, progress), *logs, *([saver] if saver else [])]
            engine = mlo.Engine(program.problems, program.graph, program.estimators, hooks=hooks, precision=precision,
                                sync=config.sync)
            _run_phase(engine, rounds, saver)
        arch_prev = program.architecture
        if generator is None and program.generator is not None:  # P-DARTS: later stages keep the trained GAN
            generator = program.generator
    assert recorder is not None
    return program, recorder, time.perf_counter() - start


def _run_one(
    config: RunConfig, method: str, seed: int, splits: datasets.DataSplits, generator: Any, out: Path, progress: Progress,
    eval_splits: datasets.DataSplits | None = None,
) -> dict[str, Any]:
    """Search on ``splits``, then train the genotype from scratch on ``eval_splits`` (default: the
    same; for CIFAR the evaluation data adds Cutout, which the search never sees)."""
    torch.manual_seed(seed)
    program, recorder, search_seconds = _search(config, method, seed, splits, generator, progress, out)
    arch = program.architecture
    genotype = arch.genotype(max_skip=2 if config.space == "p-darts" else None)
    tag = f"{method}-seed{seed}"
    main = mlo.distributed.is_main()  # every rank evaluates (identically); rank 0 writes
    if main:
        genotype.save(out / f"genotype-{tag}.json")

    task = progress.add_task(f"evaluate {method} seed {seed}", total=config.eval_epochs, losses="")
    result = train_from_scratch(
        genotype, eval_splits or splits, epochs=config.eval_epochs, batch_size=config.eval_batch_size, lr=config.eval_lr,
        C=config.eval_channels, layers=config.eval_layers, weight_decay=config.eval_weight_decay,
        lr_schedule=config.eval_lr_schedule, lr_decay=config.eval_lr_decay, label_smoothing=config.eval_label_smoothing,
        auxiliary=config.auxiliary_weight > 0,
        auxiliary_weight=config.auxiliary_weight, drop_path_prob=config.drop_path, device=config.device, seed=seed,
        num_workers=config.workers if torch.device(config.device).type == "cuda" else 0,
        progress_callback=lambda r: progress.update(
            task, advance=1, losses=f"train loss {r.train_loss:.3f}  test error {r.test_error:.2f}%"
        ),
    )

    if main:
        _plots(config, method, seed, splits, program, recorder, result, out)
    return {
        "method": method,
        "seed": seed,
        "test_error": result.test_error,
        "balanced_error": result.balanced_error,
        "search_seconds": search_seconds,
        "params": result.params,
        "genotype": f"genotype-{tag}.json",
        "final_class_weights": recorder.class_weights[-1] if recorder.class_weights else None,
        "final_total_weight": sum(recorder.class_weights[-1]) if recorder.class_weights else None,
        "final_w1_mistakes": recorder.mistakes[-1] if recorder.mistakes else None,
        "history": [vars(r) for r in result.history],
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
    plots.curves(
        dict(recorder.losses), [r.train_loss for r in result.history], [r.test_error for r in result.history],
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
        if mlo.distributed.is_main():
            torch.save(vae.state_dict(), path)
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
        cells = [
            row["method"], str(row["seeds"]), f"{row['search_seconds']:.1f}", f"{row['params'] / 1e3:.1f}k",
            f"{row['test_error']:.2f} ± {row['test_error_std']:.2f}",
        ]
        if imbalanced:
            cells.append(f"{row['balanced_error']:.2f} ± {row['balanced_error_std']:.2f}")
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
    warm_up(config if config.warms_up(method) else config.updated({"w1_warmup": 0}), program, [])
    engine = mlo.Engine(program.problems, program.graph, program.estimators, hooks=program.hooks)
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
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("{task.fields[losses]}"))
    with Progress(*columns, console=console, transient=False, disable=not main) as progress:
        for seed in range(config.seeds):
            sources: dict[str, Any] = {}
            for method in config.methods:
                if (method, seed) in done:
                    continue
                generator = generator_for(config, method, seed, splits, loaded, sources, out, console, results["gates"])
                results["runs"].append(_run_one(config, method, seed, splits, generator, out, progress, eval_splits))
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
    if device is not None:
        config = config.updated({"device": device})
    return run(config, console, resume=True)
