"""Logs and progress hooks (mlo.logs): per-round records checked against what the engine did."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

import mlo
from mlo import logs
from mlo.problems.ridge import Vector

from .helpers import mlp_program

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore::mlo.ConvergenceWarning")]


def _program(hooks: list[mlo.Hook]) -> mlo.Engine:
    prog = mlp_program(batchnorm=False, unused=False)
    return mlo.Engine([prog.lower, prog.upper], {"upper": ["lower"]}, "cg:iterations=4,damping=1.0", hooks=hooks)


def test_jsonl_records_losses_gradient_norms_and_estimator_diagnostics(tmp_path: Path, float64: None) -> None:
    class Watch(mlo.Hook):
        def __init__(self) -> None:
            self.losses: dict[str, list[float]] = {}
            self.norms: dict[str, float] = {}

        def on_step(self, engine: mlo.Engine, level: str, loss: torch.Tensor) -> None:
            self.losses.setdefault(level, []).append(float(loss))

        def on_gradient(self, engine: mlo.Engine, level: str, grads: tuple[torch.Tensor, ...]) -> None:
            self.norms[level] = float(torch.cat([g.reshape(-1) for g in grads]).norm())

    watch = Watch()
    engine = _program([watch, logs.JSONLines(tmp_path / "metrics.jsonl")])
    engine.program.problems["lower"].steps = 3
    engine.run(2)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [1, 2]
    last = records[-1]
    assert last["levels"]["lower"]["steps"] == 3
    assert last["levels"]["lower"]["loss"] == pytest.approx(sum(watch.losses["lower"][3:]) / 3, rel=1e-12)
    for level in ("lower", "upper"):
        assert last["levels"][level]["grad_norm"] == pytest.approx(watch.norms[level], rel=1e-12)
    cg = last["estimators"]["upper->lower"]
    assert cg["iterations"] == 4 and cg["hvps"] == 4 and cg["residual"] >= 0
    assert last["seconds"] > 0 and last["gpu_peak_bytes"] is None


def test_nothing_is_printed_by_default(capsys: pytest.CaptureFixture[str]) -> None:
    # Warnings (a ConvergenceWarning here: cg meets negative curvature) are the warnings
    # module's to show, once each, wherever its filters say; they are recorded, not printed,
    # so the test holds with pytest's warnings plugin on or off.
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        _program([]).run(2)
    out = capsys.readouterr()
    assert out.out == "" and out.err == ""


def test_tensorboard_scalars(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    engine = _program([logs.TensorBoard(tmp_path)])
    engine.run(3)
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"lower/loss", "upper/grad_norm", "upper->lower/residual", "round/seconds"} <= tags
    assert [e.step for e in events.Scalars("upper/loss")] == [1, 2, 3]


def test_progress_hook_shows_rounds_and_losses() -> None:
    from rich.console import Console
    from rich.progress import Progress

    console = Console(record=True, width=120, force_terminal=False)
    with Progress(console=console) as bar:
        hook = logs.Progress(total=3, description="search", progress=bar)
        v = Vector(torch.tensor([3.0]))
        mlo.Engine([mlo.Problem("fit", v, torch.optim.SGD(v.parameters(), lr=0.1), loss=lambda b: (v.value**2).sum())], hooks=[hook]).run(3)
        task = bar.tasks[0]
        assert task.completed == 3 and task.total == 3 and task.description == "search"
        assert task.fields["losses"].startswith("fit ")
