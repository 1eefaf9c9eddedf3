"""LFM-CW: the class-weight formula, the program's graph, its variants, the config checks, and
an end-to-end `mlo run` through the CLI on digits with a tiny budget."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import mlo
from mlo.cli import main
from mlo.problems import data
from mlo.problems.darts import SuperNet
from mlo.problems.lfm_cw.class_weights import ClassWeights, class_mistakes
from mlo.problems.lfm_cw.config import ConfigError, RunConfig
from mlo.problems.lfm_cw.methods import METHODS
from mlo.problems.lfm_cw.program import Variant, build


def test_class_weights_formula_and_a_mistaken_class_gets_more_weight() -> None:
    cw = ClassWeights(3, beta=2.0, momentum=0.0)
    with torch.no_grad():
        cw.phi.copy_(torch.tensor([0.1, -0.2, 0.3]))
    # class 1 is always predicted wrong, classes 0 and 2 right
    logits = torch.tensor([[5.0, 0, 0], [5.0, 0, 0], [0, 0, 5.0], [0, 0, 5.0]])
    labels = torch.tensor([0, 1, 2, 2])
    cw.observe(logits, labels, "error")
    assert torch.equal(cw.mistakes, torch.tensor([0.0, 1.0, 0.0]))
    expected = 3 * torch.softmax(torch.tensor([0.1, -0.2 + 2.0, 0.3]), 0)
    assert torch.allclose(cw(), expected)
    assert float(cw().detach().sum()) == pytest.approx(3.0)
    assert int(cw().detach().argmax()) == 1


def test_class_mistakes_cross_entropy_per_class() -> None:
    logits = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 0, 1, 3, 3, 3])
    m = class_mistakes(logits, labels, 4, "ce")
    ce = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
    assert m[0] == pytest.approx(float(ce[:2].mean()))
    assert m[1] == pytest.approx(float(ce[2]))
    assert m[2] == 0.0  # absent class
    assert m[3] == pytest.approx(float(ce[3:].mean()))


def _small_program(variant: Variant, estimator: str = "finite_difference"):
    splits = data.digits(seed=0)
    return build(
        splits.train, splits.val, splits.num_classes, splits.input_shape,
        lambda: SuperNet(C=4, num_classes=10, layers=1, in_channels=1), variant,
        rounds=2, batch_size=16, estimator=estimator,
    )


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_builds_the_expected_graph_and_steps(method: str, one_thread: None) -> None:
    spec = METHODS[method]
    program = _small_program(spec.variant, spec.estimator)
    names = {p.name for p in program.problems}
    if spec.variant.second_model:
        assert program.graph["architecture"] == ["w1", "w2"]
        assert ("class_weights" in names) == spec.variant.learn_phi
        assert ("generator" in names) == (spec.variant.generator and not spec.variant.augmented_real)
        if spec.variant.augmented_real:  # lfm-cw-aug: real images of the class, not a trained generator
            assert type(program.generator).__name__ == "AugmentedReal"
    else:
        assert names == {"w1", "architecture"} and program.graph == {"architecture": ["w1"]}
    engine = mlo.Engine(program.problems, program.graph, program.estimators, hooks=program.hooks)
    before = [p.detach().clone() for p in program.architecture.parameters()]
    engine.run(1)
    after = list(program.architecture.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(after, before))
    if program.class_weights is not None and spec.variant.use_mistakes:
        assert float(program.class_weights.mistakes.sum()) > 0  # W1's mistakes were measured


def test_class_weights_receive_a_hypergradient_through_w2(one_thread: None) -> None:
    program = _small_program(Variant())
    engine = mlo.Engine(program.problems, program.graph, program.estimators, hooks=program.hooks)
    engine.run(1)
    (g,) = engine.hypergradient("class_weights")
    assert g.shape == (10,) and torch.isfinite(g).all() and float(g.abs().sum()) > 0


def test_config_errors_name_the_option(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown method"):
        RunConfig(methods=["lfm-xx"]).validate()
    with pytest.raises(ConfigError, match="search_rounds"):
        RunConfig(search_rounds=0).validate()
    with pytest.raises(ConfigError, match="known estimators"):
        RunConfig(estimator="newton").validate()
    with pytest.raises(ConfigError, match="option 'lam' must be float"):
        RunConfig().updated({"lam": "big"})
    with pytest.raises(ConfigError, match="unknown option 'lamda'"):
        RunConfig().updated({"lamda": 1})
    bad = tmp_path / "bad.toml"
    bad.write_text("lam = [")
    with pytest.raises(ConfigError, match="not valid TOML"):
        RunConfig.from_toml(bad)


def test_cli_bad_data_root_is_a_clear_error_before_training(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nowhere"
    code = main(["run", "lfm-cw", "--dataset", "cifar10", "--data-root", str(missing), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2
    assert str(missing) in err and "cifar-10-batches-py" in err
    assert not (tmp_path / "o").exists()  # nothing started


def test_cli_refuses_to_overwrite_results(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "o"
    out.mkdir()
    (out / "results.json").write_text("{}")
    assert main(["run", "--out", str(out), "--rounds", "1"]) == 2
    assert "already holds results.json" in capsys.readouterr().err
    assert (out / "results.json").read_text() == "{}"


@pytest.mark.slow
def test_mlo_run_end_to_end_on_digits(tmp_path: Path, one_thread: None) -> None:
    out = tmp_path / "run"
    config = tmp_path / "tiny.toml"
    config.write_text(
        'methods = ["lfm-cw", "darts-1st"]\nseeds = 2\nsearch_rounds = 2\nbatch_size = 16\nlayers = 1\n'
        "eval_epochs = 1\neval_layers = 1\neval_channels = 4\nsynthetic_per_step = 8\ngenerator_warmup = 2\nw1_warmup = 1\n"
    )
    code = main(["run", "--config", str(config), "--imbalance", "5", "--out", str(out)])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["methods"] == ["lfm-cw", "darts-1st"]
    runs = results["runs"]
    # seed by seed, so that an interrupted comparison keeps complete pairs
    assert [(r["method"], r["seed"]) for r in runs] == [("lfm-cw", 0), ("darts-1st", 0), ("lfm-cw", 1), ("darts-1st", 1)]
    assert set(results["gates"]) == {"seed0", "seed1"}  # the cVAE was pretrained and gated once per seed
    assert not results["gates"]["seed0"]["passed"]  # 2 pretraining steps: the gate must say it fails
    assert sorted(p.name for p in (out / "generators").glob("*.pt")) == ["digits-lt5-seed0.pt", "digits-lt5-seed1.pt"]
    log = json.loads((out / "log-lfm-cw-seed1.json").read_text())
    assert [entry["round"] for entry in log] == [1, 2]
    for entry in log:
        assert len(entry["class_weights"]) == 10 and len(entry["w1_mistakes"]) == 10
        assert entry["phi_hypergradient_norm"] > 0 and set(entry["losses"]) >= {"w1", "w2", "class_weights", "architecture"}
    for r in runs:
        assert 0.0 <= r["test_error"] <= 100.0 and 0.0 <= r["balanced_error"] <= 100.0
        assert r["search_seconds"] > 0 and r["params"] > 0
        assert (out / r["genotype"]).is_file()
    weights = json.loads((out / "class-weights-lfm-cw-seed0.json").read_text())
    assert len(weights) == 2 and all(len(w) == 10 and sum(w) == pytest.approx(10.0) for w in weights)
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert "class-weights-lfm-cw-seed0.png" in pngs and "architecture-darts-1st-seed1.png" in pngs
    assert "curves-lfm-cw-seed1.png" in pngs
    for name in pngs:
        image = np.asarray(__import__("matplotlib.image", fromlist=["imread"]).imread(out / name))
        assert image.shape[0] > 300 and image.shape[1] > 500
        assert float(image[..., :3].std()) > 0.05  # not a blank canvas


def test_betty_engine_refuses_an_estimator_betty_computes_differently() -> None:
    pytest.importorskip("betty")
    with pytest.raises(ConfigError, match="cannot run method 'darts-2nd'.*look-ahead"):
        RunConfig(engine="betty", methods=["darts-2nd"]).validate()  # finite_difference: Betty's 'darts' differs
    with pytest.raises(ConfigError, match="cannot run method 'lfm-cw'.*unroll"):
        RunConfig(engine="betty").validate()  # unroll: no working Betty counterpart
    RunConfig(engine="betty", methods=["darts-1st"]).validate()  # first order is the same on both


@pytest.mark.slow
@pytest.mark.parametrize("space", ["pc-darts", "p-darts"])
def test_lfm_cw_runs_on_pc_darts_and_p_darts(space: str, tmp_path: Path, one_thread: None) -> None:
    from mlo.problems.darts import Genotype
    from mlo.problems.lfm_cw.experiment import run

    config = RunConfig(
        space=space, search_rounds=3, batch_size=16, layers=1, eval_epochs=1, eval_layers=1, eval_channels=4,
        synthetic_per_step=8, generator_warmup=1, w1_warmup=0, out=str(tmp_path),
    )
    (record,) = run(config)["runs"]
    genotype = Genotype.load(tmp_path / record["genotype"])
    assert len(genotype.normal) == 8 and 0 <= record["test_error"] <= 100
    if space == "p-darts":  # P-DARTS caps skip connections at 2
        assert sum(op == "skip_connect" for op, _ in genotype.normal) <= 2


@pytest.mark.slow
@pytest.mark.parametrize("generator", ["cvae"])  # "cgan" (trained as levels in stage 1) passes too; ~30 s more
def test_p_darts_later_stages_get_the_trained_generator(generator: str, tmp_path: Path, one_thread: None) -> None:
    from rich.console import Console
    from rich.progress import Progress

    from mlo.problems.lfm_cw import experiment
    from mlo.problems.lfm_cw.cvae import ConditionalVAE
    from mlo.problems.lfm_cw.program import Constants

    config = RunConfig(
        space="p-darts", search_rounds=3, batch_size=16, layers=1, synthetic_per_step=8, generator=generator,
        generator_warmup=5, w1_warmup=0, out=str(tmp_path),
    )
    splits = data.digits(seed=0)
    source = None
    if generator == "cvae":
        source, _ = experiment.cached_cvae(config, splits, 0, tmp_path, Console(quiet=True))
    with Progress(disable=True) as progress:
        program, _, _ = experiment._search(config, "lfm-cw", 0, splits, source, progress)  # the last (third) stage
    assert program.w1.layers == 5 and "generator" not in {p.name for p in program.problems}
    final = program.generator
    if generator == "cvae":  # the pretrained, cached cVAE, unchanged
        assert final is source
        saved = torch.load(tmp_path / "generators" / "digits-seed0.pt", weights_only=True)
        assert isinstance(final, ConditionalVAE) and all(torch.equal(v, final.state_dict()[k]) for k, v in saved.items())
    else:  # the GAN trained in stage 1, not a fresh one: its weights moved from their seeded start
        fresh = build(
            splits.train, splits.val, 10, splits.input_shape, lambda: SuperNet(C=4, num_classes=10, layers=1, in_channels=1),
            constants=Constants(synthetic_per_step=8), rounds=3, batch_size=16,
        ).generator
        assert fresh is not None and final is not None
        assert any(not torch.equal(a, b) for a, b in zip(final.state_dict().values(), fresh.state_dict().values()))


def test_variant_edges_match_the_built_graph_and_bad_edges_are_refused_up_front() -> None:
    for method in METHODS.values():
        program = _small_program(method.variant, method.estimator)
        assert sorted(program.estimators) == sorted(method.variant.edges())
    RunConfig(methods=["lfm-cw", "darts-1st"], edge_estimators={"class_weights->w2": "cg"}).validate()
    with pytest.raises(ConfigError, match="'class_weights->w2' is not an edge of darts-1st"):
        RunConfig(methods=["darts-1st"], edge_estimators={"class_weights->w2": "cg"}).validate()


#: ``mlo run`` (argv after ``-c``) whose second checkpoint write stalls after its data is written,
#: before its rename, and says so on stdout: the point a kill -9 "in the middle of a write" hits
#: (only checkpoint files count: results and configs are written durably too)
_STALLED_RUN = """
import os, stat, sys, time
from mlo.cli import main
real, files = os.fsync, []
def fsync(fd):
    if stat.S_ISREG(os.fstat(fd).st_mode) and ".checkpoint-" in os.readlink(f"/proc/self/fd/{fd}"):
        files.append(fd)
        if len(files) == 2:
            print("writing", flush=True)
            time.sleep(600)
    real(fd)
os.fsync = fsync
sys.exit(main(sys.argv[1:]))
"""


def _assert_same_results(a: Path, b: Path) -> None:
    """The same genotype, class weights, parameters, training history and test error."""
    first, second = (json.loads((d / "results.json").read_text())["runs"][0] for d in (a, b))
    for key in ("test_error", "params", "final_class_weights"):
        assert first[key] == second[key], key
    assert [{k: v for k, v in h.items() if k != "seconds"} for h in first["history"]] == \
           [{k: v for k, v in h.items() if k != "seconds"} for h in second["history"]]
    genotype = f"genotype-{first['method']}-seed0.json"
    assert (a / genotype).read_text() == (b / genotype).read_text()


def test_mlo_run_resume_after_kill_minus_9_mid_write_ends_where_an_uninterrupted_run_ends(
    tmp_path: Path, one_thread: None
) -> None:
    """`mlo run --checkpoint-every 1` killed with SIGKILL in the middle of its second checkpoint
    write (data written, not yet renamed), then `mlo run --resume OUT`: the run continues from the
    first checkpoint and ends bit for bit where a run never interrupted ends."""
    import os
    import signal
    import subprocess
    import sys

    from .helpers import wait_for_line

    tiny = ["darts-2nd", "--rounds", "3", "--eval-epochs", "1", "--set", "batch_size=16", "--set", "layers=1",
            "--set", "channels=2", "--set", "cell_steps=1", "--set", "eval_layers=1", "--set", "eval_channels=2",
            "--set", "w1_warmup=0", "--checkpoint-every", "1"]
    assert main(["run", *tiny, "--out", str(tmp_path / "whole")]) == 0
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-c", _STALLED_RUN, "run", *tiny, "--out", str(killed)], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    wait_for_line(proc, "writing", timeout=120)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert [p.name for p in killed.glob("checkpoint-*.pt")] == ["checkpoint-darts-2nd-seed0-search-00000001.pt"]
    assert list(killed.glob(".checkpoint-*.tmp-*"))  # the half-done write, never renamed
    assert not (killed / "results.json").exists()
    assert main(["run", "--resume", str(killed)]) == 0
    _assert_same_results(tmp_path / "whole", killed)


@pytest.mark.slow
@pytest.mark.skipif(not __import__("os").environ.get("MLO_LONG_TESTS"),
                    reason="three tiny `mlo run`s (about 1 min on a quiet 2-core machine, 6 on a busy one); set MLO_LONG_TESTS=1")
def test_mlo_run_resume_after_kill_minus_9_at_any_moment(tmp_path: Path, one_thread: None) -> None:
    """`mlo run --checkpoint-every 1` (2 cells) killed with SIGKILL at whatever point its search
    reached once its second checkpoint exists, then `mlo run --resume OUT`: the same results as a
    run never interrupted. (The default suite kills it at a chosen point of a write instead.)"""
    import os
    import signal
    import subprocess
    import sys
    import time

    tiny = ["darts-1st", "--rounds", "4", "--eval-epochs", "1", "--set", "batch_size=16", "--set", "layers=2",
            "--set", "channels=2", "--set", "eval_layers=2", "--set", "eval_channels=4", "--checkpoint-every", "1"]
    assert main(["run", *tiny, "--out", str(tmp_path / "whole")]) == 0
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "mlo", "run", *tiny, "--out", str(killed)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 300
    while not list(killed.glob("checkpoint-*-search-00000002.pt")) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "results.json").exists()  # it died before finishing
    assert main(["run", "--resume", str(killed)]) == 0
    _assert_same_results(tmp_path / "whole", killed)


def test_learned_total_weight_is_a_parameter_of_the_class_weights_level(one_thread: None) -> None:
    from mlo.problems.lfm_cw.program import Constants

    splits = data.digits(seed=0)
    program = build(
        splits.train, splits.val, splits.num_classes, splits.input_shape,
        lambda: SuperNet(C=4, num_classes=10, layers=1, in_channels=1), Variant(),
        constants=Constants(learn_total=True, synthetic_per_step=8), rounds=2, batch_size=16,
    )
    weights = program.class_weights
    assert weights is not None and weights.log_total is not None
    mlo.Engine(program.problems, program.graph, program.estimators, hooks=program.hooks).run(1)
    assert float(weights.log_total.detach()) != 0.0  # it received a hypergradient through w2 and moved
    assert len(program.phi_grad_norms) == 1 and float(program.phi_grad_norms[0]) > 0
    with torch.no_grad():
        assert float(weights().sum()) == pytest.approx(10 * float(weights.log_total.detach().exp()), rel=1e-5)


def test_mlo_check_reference_is_float64_with_a_frozen_generator(one_thread: None) -> None:
    """A frozen generator (the default conditional VAE, not fine-tuned) is no level's module, so
    `mlo.check` leaves it in float32; its images are cast like a batch and the reference still
    runs in float64 instead of falling back to the program's dtype."""
    from mlo.problems.lfm_cw.cvae import ConditionalVAE

    splits = data.digits(seed=0)
    program = build(
        splits.train, splits.val, splits.num_classes, splits.input_shape,
        lambda: SuperNet(C=4, num_classes=10, layers=1, in_channels=1), Variant(),
        rounds=2, batch_size=16, generator=ConditionalVAE(10, splits.input_shape, width=16),
    )
    assert "generator" not in {p.name for p in program.problems}
    engine = mlo.Engine(program.problems, program.graph, program.estimators, hooks=program.hooks)
    engine.run(1)
    report = mlo.check(engine, "class_weights", reference="cg:iterations=3", warn_above=float("inf"))
    assert report.dtype == torch.float64 and report.notes == ()
    assert all(t.dtype == torch.float64 for t in report.reference_hypergradient)
    assert next(program.generator.parameters()).dtype == torch.float32


@pytest.mark.parametrize("method", ["lfm-cw", "darts-2nd"])
def test_clipping_is_darts_s_the_weights_at_norm_5_the_architecture_only_by_option(method: str) -> None:
    """DARTS clips the network weights' gradient at global norm 5 and leaves the architecture's
    step unclipped; ``arch_grad_clip`` clips the architecture too."""
    from mlo.problems.lfm_cw.program import Optimizers

    def clipped_norm(problem: mlo.Problem) -> float:
        params = tuple(problem.parameters())
        big = tuple(torch.full_like(p, 100.0) for p in params)
        if problem.transform is None:
            return float(torch.linalg.vector_norm(torch.cat([g.reshape(-1) for g in big])))
        grads, _ = problem.transform.update(big, problem.transform.init(params), params)
        return float(torch.linalg.vector_norm(torch.cat([g.reshape(-1) for g in grads])))

    splits = data.digits(seed=0)
    for optim, arch_limit in ((Optimizers(), None), (Optimizers(arch_grad_clip=2.0), 2.0)):
        program = build(
            splits.train, splits.val, splits.num_classes, splits.input_shape,
            lambda: SuperNet(C=4, num_classes=10, layers=1, in_channels=1), METHODS[method].variant,
            optim=optim, rounds=2, batch_size=16,
        )
        levels = {p.name: p for p in program.problems}
        for name in ("w1", "w2") if "w2" in levels else ("w1",):
            assert clipped_norm(levels[name]) == pytest.approx(5.0, rel=1e-4)
        arch = clipped_norm(levels["architecture"])
        assert arch == pytest.approx(arch_limit, rel=1e-4) if arch_limit else arch > 100.0
    with pytest.raises(ValueError, match="arch_grad_clip"):
        Optimizers(arch_grad_clip=0.0)
    with pytest.raises(ConfigError, match="w_grad_clip"):
        RunConfig(w_grad_clip=-1.0).validate()
    assert RunConfig().updated({"w_grad_clip": "none"}).w_grad_clip is None


def test_mlo_check_rejects_a_bad_reference_before_it_builds_or_trains(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The reference is read first: with data that does not exist, a check that built the
    program first would fail on the data instead."""
    missing = tmp_path / "nowhere"
    code = main(["check", "lfm-cw", "--reference", "cg:iterations=0", "--dataset", "cifar10", "--data-root", str(missing)])
    err = capsys.readouterr().err
    assert code == 2 and "iterations" in err and str(missing) not in err


def test_mlo_check_builds_the_engine_mlo_run_builds(one_thread: None) -> None:
    """`checked_engine` (what `mlo check lfm-cw` inspects) takes the run's precision and sync."""
    from mlo.problems.lfm_cw.experiment import checked_engine

    config = RunConfig(methods=["darts-2nd"], search_rounds=1, channels=2, layers=1, batch_size=8, w1_warmup=1,
                       precision="bf16", sync="once")
    engine = checked_engine(config)
    assert engine.sync == "once" and engine.round == 1
    assert {name: prec.dtype for name, prec in engine.precision.items()} == {"w1": torch.bfloat16, "architecture": torch.bfloat16}


def _mistakes_path_program(mistakes_grad: bool = True):
    """LFM-CW without a generator on 64 digits in float64 (the default dtype of the caller), SGD
    without momentum or weight decay, after one round."""
    from torch.utils.data import TensorDataset

    from mlo.problems.lfm_cw.program import Constants, Optimizers

    splits = data.digits(seed=0)
    x = torch.stack([splits.train[i][0] for i in range(64)]).to(torch.float64)
    y = torch.tensor([int(splits.train[i][1]) for i in range(64)])
    train, val = TensorDataset(x[:32], y[:32]), TensorDataset(x[32:], y[32:])
    program = build(
        train, val, 10, splits.input_shape, lambda: SuperNet(C=2, num_classes=10, layers=1, in_channels=1),
        Variant(generator=False), constants=Constants(mistakes_grad=mistakes_grad),
        optim=Optimizers(w_momentum=0.0, w_weight_decay=0.0), rounds=4, batch_size=8,
    )
    engine = mlo.Engine(program.problems, program.graph, program.estimators, hooks=program.hooks)
    engine.run(1)
    return program, engine


def test_mistakes_path_is_the_edge_w1_to_w2_and_equals_its_autograd_reference(float64: None, one_thread: None) -> None:
    """With ``mistakes_grad``, the architecture's hypergradient has the path A -> W1' -> m -> c
    -> W2' -> L_val(W2'): with one-step look-aheads (``unroll:steps=1``) it is
    ``(dW1'/dA)^T (dW2'/dW1)^T dL_arch/dW2'``, ``W' = W - xi grad L``, here by explicit autograd."""
    program, engine = _mistakes_path_program()
    assert program.graph["w1"] == ["w2"] and ("w1", "w2") in program.estimators
    edges = list(program.estimators)
    exact = dict.fromkeys(edges, "unroll:steps=1")
    full = engine.hypergradient("architecture", estimator=exact)
    cut = engine.hypergradient("architecture", estimator={**exact, ("w1", "w2"): "first_order"})
    fd = engine.hypergradient("architecture", estimator={**exact, ("w1", "w2"): "finite_difference:radius=1e-6"})
    default = engine.hypergradient("architecture")  # unroll:steps=1, and MistakesEdge on w1 -> w2
    assert type(program.estimators[("w1", "w2")]).__name__ == "MistakesEdge"
    path = [f - c for f, c in zip(full, cut)]

    levels = {p.name: p for p in program.problems}
    w1, w2, arch = (list(levels[n].parameters()) for n in ("w1", "w2", "architecture"))
    xi1, xi2 = (levels[n].optimizer.param_groups[0]["lr"] for n in ("w1", "w2"))
    batch = {n: engine.batch(n) for n in ("w1", "w2", "architecture")}
    with mlo.functional.frozen_buffers(list(program.w1.buffers()) + list(program.w2.buffers())):
        g1 = torch.autograd.grad(levels["w1"].loss(batch["w1"]), w1, create_graph=True)
        g2 = torch.autograd.grad(levels["w2"].loss(batch["w2"]), w2, create_graph=True)
        # the architecture's loss at W2's look-ahead point, through the supernet's functional form
        ahead2 = {n: p - xi2 * g for (n, p), g in zip(program.w2.named_parameters(), g2)}
        xa, ya = batch["architecture"]
        val2 = torch.func.functional_call(program.w2, ahead2, (xa, program.architecture))
        loss_w2_ahead = torch.nn.functional.cross_entropy(val2, ya)
        adj2 = torch.autograd.grad(loss_w2_ahead, list(ahead2.values()), retain_graph=True)
        adj2 = [a.detach() for a in adj2]  # gamma = 1
        u = torch.autograd.grad(g2, w1, [-xi2 * a for a in adj2], retain_graph=True, allow_unused=True, materialize_grads=True)
        want = torch.autograd.grad(g1, arch, [-xi1 * t for t in u], retain_graph=True, allow_unused=True, materialize_grads=True)
    size = float(torch.cat([t.reshape(-1) for t in want]).norm())
    assert size > 1e-6 * float(torch.cat([t.reshape(-1) for t in full]).norm())  # the path is there
    assert relative_error(path, want) < 1e-8
    assert relative_error([d - c for d, c in zip(default, cut)], want) < 1e-8
    assert relative_error([f - c for f, c in zip(fd, cut)], want) < 1e-3  # a central difference on this edge (ReLU kinks: not O(radius^2))
    # without the option the edge is absent and the path cut
    plain, _ = _mistakes_path_program(mistakes_grad=False)
    assert "w1" not in plain.graph and ("w1", "w2") not in plain.estimators


def test_w2_skips_w1s_forward_pass_where_no_derivative_in_w1_or_the_architecture_is_taken(float64: None, one_thread: None) -> None:
    """W2's loss reads W1 only for the derivative of the mistakes in W1 and the architecture
    (its value is the mistakes buffer's). W2's own step and the class weights' step take no such
    derivative, and run no W1 forward pass; the architecture's does. Skipping changes nothing:
    the loss, and its gradients in W2 and phi, equal the full computation's exactly."""
    program, engine = _mistakes_path_program()
    levels = {p.name: p for p in program.problems}
    assert bool(program.class_weights.measured)
    calls: list[int] = []
    handle = program.w1.register_forward_hook(lambda *_: calls.append(1))
    try:
        for level, runs_w1 in (("w2", False), ("class_weights", False), ("architecture", True)):
            calls.clear()
            engine.hypergradient(level)
            assert bool(calls) == runs_w1, level
        batch = engine.batch("w2")
        wrt = list(levels["w2"].parameters()) + [program.class_weights.phi]
        with mlo.functional.frozen_buffers(list(program.w1.buffers()) + list(program.w2.buffers())):
            calls.clear()
            full = levels["w2"].loss(batch)  # outside an evaluation: W1's forward pass runs
            assert calls
            calls.clear()
            with mlo.problem.batches_in_use({}, frozenset({"w2", "class_weights"})):
                skipped = levels["w2"].loss(batch)
            assert not calls
            assert float(full) == float(skipped)
            for a, b in zip(torch.autograd.grad(full, wrt), torch.autograd.grad(skipped, wrt)):
                assert torch.equal(a, b)
    finally:
        handle.remove()


def relative_error(got, want) -> float:
    g = torch.cat([t.reshape(-1) for t in got])
    w = torch.cat([t.reshape(-1) for t in want])
    return float((g - w).norm() / w.norm())


@pytest.mark.parametrize("mistakes_grad", [False, True])
def test_every_lfm_cw_edge_default_is_within_5_percent_of_the_exact_one_step_value(mistakes_grad: bool, one_thread: None) -> None:
    """`mlo check` against ``unroll:steps=1`` in float64: each edge's default estimate (float32)
    within 5 %, at round 1 (a fresh W2, where DARTS's float32 difference is mostly rounding)."""
    from mlo.problems.lfm_cw.program import Constants

    splits = data.digits(seed=0)
    spec = METHODS["lfm-cw"]
    program = build(
        splits.train, splits.val, splits.num_classes, splits.input_shape,
        lambda: SuperNet(C=4, num_classes=10, layers=1, in_channels=1), spec.variant,
        constants=Constants(mistakes_grad=mistakes_grad, synthetic_per_step=8), rounds=2, batch_size=16,
        estimator=spec.estimator,
    )
    engine = mlo.Engine(program.problems, program.graph, program.estimators, hooks=program.hooks)
    engine.run(1)
    for level in ("architecture", "class_weights"):
        report = mlo.check(engine, level, reference="unroll:steps=1", warn_above=float("inf"))
        assert report.dtype == torch.float64 and report.rel_error < 0.05
        assert all(edge.rel_error < 0.05 for edge in report.edges)
        if level == "architecture":
            assert (("w1", "w2") in {(e.upper, e.lower) for e in report.edges}) == mistakes_grad
