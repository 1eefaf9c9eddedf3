"""Loud zeros and divergence: the `mlo.MLOWarning` family (docs/errors.md, "Warnings during a run").

Each case returned a hypergradient of exactly zero, or let a lower level diverge for a hundred
rounds, without a word. Each now warns once; correct programs warn of nothing."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import mlo
from mlo.problems.ridge import Vector

pytestmark = pytest.mark.usefixtures("one_thread")


def _data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(40, 3, generator=g), torch.randn(40, generator=g), torch.randn(20, 3, generator=g), torch.randn(20, generator=g)


def _ridge(*, lower_reads_upper: bool = True, lower_lr: float = 0.1, upper_lr: float = 0.1) -> tuple[list[mlo.Problem], Vector, Vector]:
    """Ridge regression (``fit``) with a per-feature log penalty (``hyper``) on its validation error."""
    X, y, Xv, yv = _data()
    w, h = Vector(torch.zeros(3)), Vector(torch.zeros(3))

    def fit(_: object) -> torch.Tensor:
        penalty = h.value.exp() if lower_reads_upper else torch.ones(3)
        return ((X @ w.value - y) ** 2).mean() + (penalty * w.value**2).sum()

    def validate(_: object) -> torch.Tensor:
        return ((Xv @ w.value - yv) ** 2).mean()

    return [
        mlo.Problem("fit", w, torch.optim.SGD(w.parameters(), lr=lower_lr), steps=5, loss=fit),
        mlo.Problem("hyper", h, torch.optim.SGD(h.parameters(), lr=upper_lr), loss=validate),
    ], w, h


def _run(problems: list[mlo.Problem], graph: dict[str, list[str]], rounds: int = 5, **options: object) -> list[warnings.WarningMessage]:
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        mlo.Engine(problems, graph, "cg", **options).run(rounds)  # type: ignore[arg-type]
    return [w for w in seen if issubclass(w.category, mlo.MLOWarning)]


def test_the_classes_form_one_family_exported_from_mlo() -> None:
    for cls in (mlo.ConvergenceWarning, mlo.CheckWarning, mlo.ZeroGradientWarning, mlo.DisconnectedEdgeWarning,
                mlo.DivergenceWarning):
        assert issubclass(cls, mlo.MLOWarning) and issubclass(cls, UserWarning)
    assert issubclass(mlo.DisconnectedEdgeWarning, mlo.ZeroGradientWarning)


def test_a_correct_program_warns_of_nothing() -> None:
    problems, _, _ = _ridge()
    assert _run(problems, {"hyper": ["fit"]}, rounds=20) == []


def test_a_forgotten_graph_warns_once_that_the_gradient_is_zero() -> None:
    """``graph={}``: hyper's loss does not read its own parameters, so its gradient is exactly zero."""
    problems, _, _ = _ridge()
    seen = _run(problems, {})
    assert [w.category for w in seen] == [mlo.ZeroGradientWarning]
    text = str(seen[0].message)
    assert "level 'hyper'" in text and "gradient is exactly zero" in text and "graph=" in text


def test_a_lower_loss_that_does_not_read_its_upper_warns_once_naming_the_edge() -> None:
    problems, _, _ = _ridge(lower_reads_upper=False)
    seen = _run(problems, {"hyper": ["fit"]})
    edges = [w for w in seen if w.category is mlo.DisconnectedEdgeWarning]
    assert len(edges) == 1
    assert "edge 'hyper' -> 'fit'" in str(edges[0].message) and "does not read the parameters of 'hyper'" in str(edges[0].message)
    zeros = [w for w in seen if w.category is mlo.ZeroGradientWarning]
    assert len(zeros) == 1 and "level 'hyper'" in str(zeros[0].message)  # and its hypergradient is zero


def test_the_edge_check_moves_nothing() -> None:
    """The extra evaluation of the lower loss leaves the run as it would be without it: the
    random generators and buffers are put back (here the lower loss draws random numbers)."""
    def program() -> list[mlo.Problem]:
        problems, w, h = _ridge()
        low = problems[0]
        noisy = mlo.Problem("fit", w, low.optimizer, steps=5,
                            loss=lambda b: low.loss(b) + 1e-3 * (torch.randn(3) * w.value).sum())
        return [noisy, problems[1]]

    a, b = program(), program()
    torch.manual_seed(1)
    mlo.Engine(a, {"hyper": ["fit"]}, "cg").run(3)
    torch.manual_seed(1)
    engine = mlo.Engine(b, {"hyper": ["fit"]}, "cg")
    engine._edges_checked.add("hyper")  # the same run without the check
    engine.run(3)
    assert torch.equal(a[1].module.value, b[1].module.value) and torch.equal(a[0].module.value, b[0].module.value)


def test_a_diverging_lower_level_warns_before_anything_is_infinite() -> None:
    """SGD at a learning rate past 2 / curvature (the upper level held still): the loss grows
    about 14-fold a round, past a million times its first value by round 6, finite for 30 more."""
    problems, w, _ = _ridge(lower_lr=0.5, upper_lr=0.0)
    seen = _run(problems, {"hyper": ["fit"]}, rounds=8)
    grew = [str(w.message) for w in seen if w.category is mlo.DivergenceWarning]
    assert any(text.startswith("level 'fit'") for text in grew)
    assert len(grew) == len({text.split(":")[0] for text in grew})  # once per level (hyper's loss grows too)
    assert bool(torch.isfinite(w.value).all())


def test_the_divergence_watch_can_be_turned_off_and_rejects_a_bad_factor() -> None:
    problems, _, _ = _ridge(lower_lr=0.5, upper_lr=0.0)
    assert not [w for w in _run(problems, {"hyper": ["fit"]}, rounds=8, divergence_factor=None)
                if w.category is mlo.DivergenceWarning]
    with pytest.raises(mlo.ProgramError, match="divergence_factor"):
        mlo.Engine(_ridge()[0], {"hyper": ["fit"]}, divergence_factor=0.5)
