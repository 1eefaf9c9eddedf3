"""The benchmark suites: the quick versions run and report sane, self-consistent numbers; the
hand-written loops and the peers compute what mlo computes; the harness measures what it says."""

from __future__ import annotations

import argparse
import json
import statistics
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

import mlo
from mlo.benchmarks import cli, estimators, speed, workloads
from mlo.benchmarks.implementations import NotApplicable, build_round
from mlo.benchmarks.timing import Contender, measure, paired_ratio, peak_memory_mb

from .helpers import single_threaded

REQUIRED = ("problem", "impl", "median_s", "peak_mb", "samples_s")




# ---------------------------------------------------------------------------------------------- harness


def test_rounds_are_interleaved_in_seeded_random_orders() -> None:
    """Each repetition runs every contender once, in an order drawn for it; over many
    repetitions every contender follows every other one (no fixed predecessor, as under a
    rotation); the orders are the same on every run."""
    def run() -> list[str]:
        calls: list[str] = []
        contenders = [Contender("p", name, (lambda name=name: calls.append(name))) for name in "abc"]
        results = measure(contenders, repeats=60, warmup=1, memory=False)
        assert [len(r.samples_s) for r in results] == [60, 60, 60]
        return calls

    calls = run()
    assert calls[:3] == ["a", "b", "c"]  # warm-up
    timed = calls[3:]
    for r in range(60):
        assert sorted(timed[3 * r : 3 * r + 3]) == ["a", "b", "c"]
    follows = {(x, y) for r in range(60) for x, y in zip(timed[3 * r : 3 * r + 2], timed[3 * r + 1 : 3 * r + 3])}
    assert follows == {(x, y) for x in "abc" for y in "abc" if x != y}
    assert len({tuple(timed[3 * r : 3 * r + 3]) for r in range(60)}) > 3  # not one rotation
    assert run() == calls


def test_peak_memory_counts_what_a_round_allocates() -> None:
    def round_() -> None:
        a = torch.ones(1 << 20)  # 4 MiB
        b = torch.ones(1 << 20)  # 4 MiB, both alive
        del a, b
        torch.ones(1 << 19)  # 2 MiB after they are freed

    assert peak_memory_mb(round_) == pytest.approx(8.0, abs=0.01)


def test_paired_ratio_is_the_median_of_per_repetition_ratios() -> None:
    res = measure([Contender("p", "x", lambda: None), Contender("p", "y", lambda: None)], repeats=5, warmup=0, memory=False)
    x, y = res
    assert paired_ratio(x, y) == pytest.approx(statistics.median(a / b for a, b in zip(x.samples_s, y.samples_s)))


# ---------------------------------------------------------------------------------------------- same computation


@pytest.mark.parametrize("spec", ["first_order", "neumann:iterations=4,alpha=0.1", "cg:iterations=4",
                                  "finite_difference", "unroll:steps=2"])
def test_every_implementation_computes_what_mlo_computes(spec: str, float64: None) -> None:
    """The timed rounds are the same computation: after three rounds every implementation of an
    algorithm holds mlo's parameters (Betty's CG and finite difference are other methods)."""
    program = workloads.ridge(n=60, dim=6, dtype=torch.float64)
    est = mlo.estimators.parse(spec)
    reference = None
    compared = 0
    for impl in ("mlo", "hand", "hand-engine", "betty", "higher", "torchopt"):
        c = program.instantiate()
        try:
            step, note = build_round(impl, c, est)
        except NotApplicable:
            continue
        for _ in range(3):
            step()
        values = torch.cat([p.detach().reshape(-1) for p in c.upper_params() + c.lower_params()])
        if reference is None:
            reference = values
        elif not note:
            assert torch.allclose(values, reference, rtol=1e-10, atol=1e-12), impl
            compared += 1
    assert compared >= 1


# ---------------------------------------------------------------------------------------------- speed


@pytest.fixture(scope="module")
def speed_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], list[Any], list[Any]]:
    path = tmp_path_factory.mktemp("speed") / "speed.json"
    with single_threaded():
        results, ratios = speed.run(quick=True, json_path=path)
    return json.loads(path.read_text()), results, ratios


def test_speed_json_has_the_required_fields(speed_run: tuple[dict[str, Any], list[Any], list[Any]]) -> None:
    doc, _, _ = speed_run
    assert doc["suite"] == "speed"
    assert {"torch", "mlo", "betty", "higher", "torchopt"} <= set(doc["versions"])
    assert doc["versions"]["torch"] == torch.__version__
    assert doc["machine"]["cpu_count"] >= 1
    assert doc["config"]["memory"] and doc["config"]["programs"]
    assert doc["results"]
    for entry in doc["results"]:
        assert all(key in entry for key in REQUIRED)
        assert entry["median_s"] > 0 and len(entry["samples_s"]) >= 2
        assert entry["peak_mb"] is not None and entry["peak_mb"] > 0


def test_speed_covers_each_program_with_mlo_and_the_hand_written_loop(speed_run: Any) -> None:
    doc, _, _ = speed_run
    problems_run = {r["problem"] for r in doc["results"]}
    assert {"ridge", "reweighting", "darts8x8"} <= problems_run
    for name in problems_run:
        impls = {r["impl"] for r in doc["results"] if r["problem"] == name}
        assert {"mlo", "hand"} <= impls
    flagged = [r for r in doc["results"] if r["impl"] == "betty" and r["problem"] == "darts8x8"]
    if flagged:  # Betty's "darts" is another method than mlo's finite differences: the row says so
        assert "look-ahead" in flagged[0]["note"]


def test_speed_ratios_come_from_the_measured_samples(speed_run: Any) -> None:
    doc, _, _ = speed_run
    by_key = {(r["problem"], r["algorithm"], r["impl"]): r for r in doc["results"]}
    assert any(q["den"] == "hand" for q in doc["ratios"])
    for q in doc["ratios"]:
        num = by_key[(q["problem"], q["algorithm"], q["num"])]
        den = by_key[(q["problem"], q["algorithm"], q["den"])]
        per_rep = [a / b for a, b in zip(num["samples_s"], den["samples_s"])]
        assert q["time_ratio"] == pytest.approx(statistics.median(per_rep))
        assert q["ratio_of_medians"] == pytest.approx(num["median_s"] / den["median_s"])
        assert q["memory_ratio"] == pytest.approx(num["peak_mb"] / den["peak_mb"])
        if q["time_target"] is not None:
            met = q["time_ratio"] < q["time_target"] if q["strict"] else q["time_ratio"] <= q["time_target"]
            assert q["time_met"] == met
        assert 0.05 < q["time_ratio"] < 20  # same work on the same machine: sane, whatever the load


def test_speed_compares_sama_with_the_other_estimators_on_one_program(speed_run: Any) -> None:
    doc, _, _ = speed_run
    by_key = {(r["problem"], r["algorithm"], r["impl"]): r for r in doc["results"]}
    versus = doc["estimator_ratios"]
    assert {q["den"] for q in versus} >= {"neumann(iterations=2,alpha=0.1)", "unroll(steps=1)"}
    for q in versus:
        assert q["num"] == "sama" and q["memory_target"] == (0.5 if q["den"].startswith("neumann") else None)
        num, den = by_key[(q["problem"], q["num"], "mlo")], by_key[(q["problem"], q["den"], "mlo")]
        assert q["time_ratio"] == pytest.approx(statistics.median(a / b for a, b in zip(num["samples_s"], den["samples_s"])))
        assert q["memory_ratio"] == pytest.approx(num["peak_mb"] / den["peak_mb"])
    assert ("reweighting", "sama", "betty") in by_key  # and Betty's sama beside mlo's


def test_speed_times_maml_and_imaml_against_per_task_loops(speed_run: Any) -> None:
    doc, _, _ = speed_run
    pairs = {(q["problem"], q["num"], q["den"]): q for q in doc["ratios"] if "sinusoid" in q["problem"]}
    assert {("maml sinusoid x4", "mlo", "hand"), ("imaml sinusoid x4", "mlo", "hand")} <= set(pairs)
    assert pairs[("imaml sinusoid x4", "mlo", "hand")]["time_target"] == pytest.approx(1 / 3)


# ---------------------------------------------------------------------------------------------- estimators


@pytest.fixture(scope="module")
def estimators_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    out = tmp_path_factory.mktemp("estimators")
    with single_threaded():
        estimators.run(quick=True, json_path=out / "estimators.json", png_path=out / "estimators.png")
    return json.loads((out / "estimators.json").read_text()), out / "estimators.png"


def _rows(doc: dict[str, Any], problem_prefix: str, estimator: str) -> list[dict[str, Any]]:
    rows = [r for r in doc["results"] if r["problem"].startswith(problem_prefix) and r["extra"]["estimator"] == estimator]
    assert rows, (problem_prefix, estimator)
    return rows


def test_every_registered_estimator_is_measured(estimators_run: Any) -> None:
    doc, _ = estimators_run
    assert {r["extra"]["estimator"] for r in doc["results"]} == set(mlo.estimators.names())
    for r in doc["results"]:
        assert all(key in r for key in REQUIRED)
        assert -1.0 - 1e-9 <= r["extra"]["cosine"] <= 1.0 + 1e-9


def test_exact_estimators_are_exact(estimators_run: Any) -> None:
    doc, _ = estimators_run
    for prefix in ("ridge", "chain"):
        for r in _rows(doc, prefix, "cg"):
            dim = r["extra"]["dim"]
            levels = 2 if prefix == "chain" else 1  # the chain solves one system per edge
            assert r["extra"]["hvps"] <= r["extra"]["options"]["iterations"] * levels
            if r["extra"]["options"]["iterations"] >= dim:
                assert r["extra"]["relative_error"] < 1e-6
                assert r["extra"]["cosine"] > 1 - 1e-9
    ridge_first = _rows(doc, "ridge", "first_order")[0]
    assert ridge_first["extra"]["relative_error"] == pytest.approx(1.0)  # the upper loss does not read h


@pytest.mark.parametrize("name", ["neumann", "unroll"])
def test_truncated_estimators_improve_with_cost(estimators_run: Any, name: str) -> None:
    doc, _ = estimators_run
    for prefix in ("ridge", "chain"):
        rows = sorted(_rows(doc, prefix, name), key=lambda r: next(iter(r["extra"]["options"].values())))
        errors = [r["extra"]["relative_error"] for r in rows]
        assert all(b <= a * (1 + 1e-9) for a, b in zip(errors, errors[1:])), errors
        assert errors[-1] < errors[0]


def test_the_plot_is_written(estimators_run: Any) -> None:
    _, png = estimators_run
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 20_000
    import matplotlib.image

    image = matplotlib.image.imread(png)
    assert image.shape[0] > 400 and image.shape[1] > 800
    assert len(torch.unique(torch.from_numpy(image[..., :3].copy()).reshape(-1, 3), dim=0)) > 50


# ---------------------------------------------------------------------------------------------- command line


def test_cli_parses_and_rejects_an_unknown_suite() -> None:
    parser = argparse.ArgumentParser(prog="mlo")
    cli.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["bench", "lfm-cw", "--quick", "--json", "x.json", "--out", "o"])
    assert args.suite == "lfm-cw" and args.quick and args.func is cli.main
    with pytest.raises(SystemExit):
        parser.parse_args(["bench", "nonsense"])


@pytest.mark.slow
def test_lfm_cw_suite_quick_through_the_mlo_command(tmp_path: Path) -> None:
    from mlo.cli import main as mlo_main

    path = tmp_path / "lfm.json"
    assert mlo_main(["bench", "lfm-cw", "--quick", "--json", str(path), "--out", str(tmp_path)]) == 0
    doc = json.loads(path.read_text())
    assert doc["suite"] == "lfm-cw" and doc["versions"]["torch"]
    rows = {(r["problem"], r["impl"]): r for r in doc["results"]}
    assert set(rows) == {(d, m) for d in ("digits", "digits-lt10") for m in ("lfm-cw", "darts-1st")}
    for r in rows.values():
        assert r["median_s"] > 0 and r["samples_s"] and "peak_mb" in r
        assert 0 <= r["extra"]["test_error_mean"] <= 100 and len(r["extra"]["test_errors"]) == 1
    assert (tmp_path / "lfm-cw" / "digits-lt10" / "results.json").is_file()


def test_speed_check_names_each_row_past_its_bound() -> None:
    """``mlo bench speed --check``: the rows past their bound, named; none when all are within."""
    from mlo.benchmarks.report import Ratio

    def row(problem: str, algorithm: str, den: str, time_ratio: float) -> Ratio:
        return Ratio(problem, algorithm, "mlo", den, time_ratio, time_ratio, 1.0)

    within = [row("ridge", "neumann(iterations=10,alpha=0.1)", "hand-engine", speed.CHECK_BOUNDS["hand-engine"]),
              row("ridge", "neumann(iterations=10,alpha=0.1)", "hand", speed.CHECK_BOUNDS["hand"]),
              row("ridge", "neumann(iterations=10,alpha=0.1)", "betty", speed.BETTY_CHECK_BOUNDS[("ridge", "neumann")]),
              row("maml", "maml", "hand", 5.0)]  # MAML's per-task loop is held to its own target
    assert speed.check(within) == []
    past = [row("reweighting", "unroll(steps=1)", "hand-engine", speed.CHECK_BOUNDS["hand-engine"] + 0.01),
            row("ridge", "neumann(iterations=10,alpha=0.1)", "betty", 0.95)]
    failed = speed.check(within + past)
    assert len(failed) == 2
    assert failed[0].startswith("reweighting unroll(steps=1): mlo / hand-engine = ")
    assert failed[1].startswith("ridge neumann(iterations=10,alpha=0.1): mlo / betty = 0.950")


def test_speed_tables_mark_missed_exactly_the_rows_the_check_fails() -> None:
    """The time targets the ratio tables show are the ``--check`` bounds where it holds one, so
    "missed" and a failed check agree row by row; rows without a check bound keep their targets."""
    from mlo.benchmarks.timing import Result

    def result(problem: str, algorithm: str, impl: str, seconds: float) -> Result:
        return Result(problem, impl, algorithm, seconds, seconds, seconds, 0.0, 1.0, [seconds] * 3)

    def rows(problem: str, algorithm: str, times: dict[str, float]) -> list:
        return speed._ratios(problem, [result(problem, algorithm, impl, t) for impl, t in times.items()])

    # ridge Neumann: 1.04 of the floor (within 1.05), 1.01 of the hand-written loop (past 1.0),
    # 0.93 of Betty (past 0.90)
    ridge = rows("ridge", "neumann(iterations=10,alpha=0.1)", {"mlo": 1.04, "hand-engine": 1.0, "hand": 1.04 / 1.01, "betty": 1.04 / 0.93})
    # ridge CG against Betty: no check bound, the table's own target (0.8); reweighting against
    # Betty: strictly below 1
    other = rows("ridge", "cg(iterations=10)", {"mlo": 0.7, "betty": 1.0}) + rows("reweighting", "neumann(iterations=5,alpha=0.1)", {"mlo": 1.0, "betty": 1.0})
    by_den = {(q.algorithm, q.den): q for q in ridge + other}
    assert by_den[("neumann(iterations=10,alpha=0.1)", "hand-engine")].time_target == speed.CHECK_BOUNDS["hand-engine"]
    assert by_den[("neumann(iterations=10,alpha=0.1)", "hand")].time_target == speed.CHECK_BOUNDS["hand"]
    assert by_den[("neumann(iterations=10,alpha=0.1)", "betty")].time_target == speed.BETTY_CHECK_BOUNDS[("ridge", "neumann")]
    assert by_den[("cg(iterations=10)", "betty")].time_target == speed.TARGETS["ridge"][0]
    assert by_den[("neumann(iterations=5,alpha=0.1)", "betty")].time_met is False  # 1.0 is not < 1.0
    failed = speed.check(ridge + other)
    missed = [q for q in ridge + other if q.time_met is False and speed.check_bound(q.problem, q.algorithm, q.den, True) is not None]
    assert len(failed) == len(missed) == 2
    assert {f.split(" = ")[0] for f in failed} == {f"{q.problem} {q.algorithm}: mlo / {q.den}" for q in missed}


def test_speed_profile_covers_every_algorithm(tmp_path: Path) -> None:
    """``--profile`` profiles mlo's rounds of each algorithm of a program, not only the last."""
    path = tmp_path / "speed.json"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        speed.run(quick=True, json_path=path, repeats=1, impls=("mlo",), profile=True, only=["ridge"])
    profiles = json.loads(path.read_text())["profiles"]
    algorithms = [speed._label(spec) for spec in speed.cases(quick=True)[0].algorithms]
    assert sorted(profiles) == sorted(f"ridge {a}" for a in algorithms)


def _inner_piece() -> float:
    return sum(i * i for i in range(20000))


def _outer_piece() -> float:
    return _inner_piece() + _inner_piece()


def test_breakdown_counts_a_call_from_within_its_piece_once() -> None:
    """An override that calls its base, both in one piece: the base's time is in the override's
    already, so the piece's time is the outer function's, not outer + inner."""
    import cProfile
    import pstats

    from mlo.benchmarks.breakdown import _cumulative

    profiler = cProfile.Profile()
    profiler.enable()
    _outer_piece()
    _inner_piece()  # a call from outside the piece counts
    profiler.disable()
    stats = pstats.Stats(profiler)
    here = "tests/test_benchmarks.py"
    rows = {func: row for (file, _, func), row in stats.stats.items() if file.endswith(here)}  # type: ignore[attr-defined]
    outer, inner = rows["_outer_piece"][3], rows["_inner_piece"][3]
    from_outer = next(t[3] for caller, t in rows["_inner_piece"][4].items() if caller[2] == "_outer_piece")
    both = _cumulative(stats, ((here, "_outer_piece"), (here, "_inner_piece")))
    assert both == pytest.approx(outer + inner - from_outer)
    assert both < outer + inner
    assert _cumulative(stats, ((here, "_inner_piece"),)) == pytest.approx(inner)


def test_supernet_round_passes_counts_each_forward_pass_of_the_supernets() -> None:
    # One level whose loss runs the supernet twice with gradients (batches 4 and 2) and once
    # without: a round of it runs exactly those three passes, in that order.
    from mlo.benchmarks.supernet import pass_summary, round_passes
    from mlo.problems.darts import SuperNet

    torch.manual_seed(0)
    net = SuperNet(C=2, num_classes=3, layers=1, in_channels=1, steps=2, multiplier=2)
    arch = net.new_architecture()
    x = torch.randn(4, 1, 8, 8)

    def loss(batch: object) -> torch.Tensor:
        with torch.no_grad():
            net(x[:3], arch)
        return net(x, arch).square().mean() + net(x[:2], arch).square().mean()

    level = mlo.Problem("w", net, torch.optim.SGD(net.parameters(), lr=0.1), loss=loss)
    # the no-grad pass runs first inside the loss; the gradient passes follow
    passes = round_passes(mlo.Engine([level]), [net])
    assert passes == [(3, False), (4, True), (2, True)]
    assert pass_summary(passes) == {"with_gradients": 2, "without_gradients": 1, "images": 9}


# ---------------------------------------------------------------------------------------------- devices and torch.compile


def test_a_program_moves_to_a_device_with_every_tensor_of_its_batches() -> None:
    """`Bilevel.to`: the modules and every tensor the batches hold (tuples, a dataclass such as
    ridge's data) on the device; the prototype stays where it was."""
    for program in (workloads.ridge(n=20, dim=3), workloads.reweighting(hidden=8, batch=50)):
        moved = program.to("meta")
        assert moved.name == program.name and moved.config["device"] == "meta"
        assert all(t.device.type == "meta" for m in (moved.lower, moved.upper) for t in m.state_dict().values())
        tensors = [t for b in moved.lower_batches + moved.upper_batches for t in _tensors_in(b)]
        assert tensors and all(t.device.type == "meta" for t in tensors)
        assert all(t.device.type == "cpu" for t in program.lower.state_dict().values())
        assert all(t.device.type == "cpu" for b in program.lower_batches for t in _tensors_in(b))


def _tensors_in(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _tensors_in(v)]
    if hasattr(value, "__dataclass_fields__"):
        return [t for name in value.__dataclass_fields__ for t in _tensors_in(getattr(value, name))]
    return []


def test_on_device_keeps_named_tuples_and_dicts() -> None:
    from mlo.problems.maml import Tasks

    tasks = Tasks(*(torch.ones(2, 3) for _ in range(4)))
    moved = workloads.on_device({"tasks": tasks, "n": 3}, torch.device("meta"))
    assert isinstance(moved["tasks"], Tasks) and moved["n"] == 3
    assert all(t.device.type == "meta" for t in moved["tasks"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="tests the refusal on a machine without CUDA")
def test_speed_refuses_a_device_it_cannot_run_on_before_running_anything(capsys: pytest.CaptureFixture[str]) -> None:
    for name, said in (("cuda", "no CUDA GPU"), ("tpu", "not a device"), ("meta", "cpu or cuda")):
        with pytest.raises(mlo.errors.ConfigError, match=f"--device '{name}'.*{said}"):
            speed.resolve_device(name)
    from mlo.cli import main as mlo_main

    assert mlo_main(["bench", "speed", "--quick", "--device", "cuda"]) == 2
    assert "--device 'cuda'" in capsys.readouterr().out


def test_the_gpu_rows_join_the_suite_on_a_gpu_only() -> None:
    cpu, gpu = speed.cases(), speed.cases(device="cuda")
    assert speed.GPU_CASES and not any(case in cpu for case in speed.GPU_CASES)
    assert gpu[len(cpu):] == speed.GPU_CASES
    assert [(c.kind, c.algorithms, c.repeats) for c in gpu[:len(cpu)]] == [(c.kind, c.algorithms, c.repeats) for c in cpu]


def test_compiled_mlo_round_computes_what_mlo_computes() -> None:
    """``mlo-compile`` (the lower module under ``torch.compile``; the ``eager`` backend here, to
    keep the test fast) holds mlo's parameters after three rounds of a first-order estimator, and
    refuses an estimator that differentiates a backward again."""
    from mlo.benchmarks.implementations import mlo_compiled_round

    torch.manual_seed(0)
    program = workloads.reweighting(hidden=8, batch=50)
    est = mlo.estimators.parse("finite_difference")
    plain, compiled = program.instantiate(), program.instantiate()
    step, _ = build_round("mlo", plain, est)
    step_compiled, note = mlo_compiled_round(compiled, est, backend="eager")
    assert "torch.compile" in note and type(compiled.lower) is not type(plain.lower)
    for _ in range(3):
        step()
        step_compiled()
    for a, b in zip(plain.upper_params() + plain.lower_params(), compiled.upper_params() + compiled.lower_params(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert any((a - p).abs().max() > 0 for a, p in zip(compiled.upper_params(), program.upper.parameters()))
    with pytest.raises(NotApplicable, match="double backward.*neumann"):
        mlo_compiled_round(program.instantiate(), mlo.estimators.parse("neumann"), backend="eager")


def test_speed_times_mlo_compiled_beside_mlo(tmp_path: Path) -> None:
    """``--compile``: an ``mlo-compile`` contender on the first-order rows (sama here), compared
    with mlo's round; the rows that differentiate a backward again say why they have none."""
    path = tmp_path / "speed.json"
    with warnings.catch_warnings(), single_threaded():
        warnings.simplefilter("ignore")
        _, ratios = speed.run(quick=True, json_path=path, repeats=2, impls=("mlo",), only=["reweighting"],
                              compile_backend="eager")
    doc = json.loads(path.read_text())
    assert doc["config"]["compile_backend"] == "eager" and doc["config"]["device"] == "cpu"
    compiled = {r["algorithm"] for r in doc["results"] if r["impl"] == "mlo-compile"}
    assert compiled == {"sama"}
    assert [(q.num, q.den) for q in ratios if q.algorithm == "sama"] == [("mlo-compile", "mlo")]
    skipped = {row: why["mlo-compile"] for row, why in doc["skipped"].items() if "mlo-compile" in why}
    assert sorted(skipped) == ["reweighting neumann(iterations=2,alpha=0.1)", "reweighting unroll(steps=1)"]
    assert all("double backward" in why for why in skipped.values())
