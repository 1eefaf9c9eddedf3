"""The Betty adapter (mlo.engines.betty): the same program on Betty's engine gives mlo's numbers
where Betty computes the same thing, and is refused or flagged where it does not."""

from __future__ import annotations

import math
import warnings
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import mlo
from mlo.problems import ridge
from mlo.problems.ridge import Vector
from mlo.benchmarks.references import ridge_problem

pytest.importorskip("betty", reason="betty-ml is not installed (`make install` installs it; see the Makefile)")

from mlo.engines.betty import (  # noqa: E402
    BettyMismatchWarning,
    BettyProgram,
    BettyUnsupported,
    betty_hypergradient,
    run_on_betty,
)

GRAPH = {"upper": ["lower"]}


def relative(got: list[Tensor], want: list[Tensor]) -> float:
    g = torch.cat([t.reshape(-1) for t in got])
    w = torch.cat([t.reshape(-1) for t in want])
    return float((g - w).norm() / w.norm())


def ridge_with_prior(dim: int = 6, seed: int = 0) -> list[mlo.Problem]:
    """Ridge HPO whose upper loss also reads the hyperparameters (so first order is not zero)."""
    g = torch.Generator().manual_seed(seed)
    data = ridge.Ridge.random(40, dim, generator=g, dtype=torch.float64, direct=0.1)
    w0 = torch.randn(dim, generator=g, dtype=torch.float64)
    h0 = torch.randn(dim, generator=g, dtype=torch.float64) - 1.0
    return ridge.program(data, w0, h0, lower_lr=0.1, upper_lr=0.05, names=("lower", "upper"))


@pytest.mark.parametrize("estimator", ["first_order", "neumann:iterations=20,alpha=0.3", "neumann:iterations=0,alpha=1.0"])
def test_hypergradient_equals_mlo(estimator: str) -> None:
    want = mlo.Engine(ridge_with_prior(), GRAPH, estimator).hypergradient("upper")
    got = betty_hypergradient(ridge_with_prior(), GRAPH, estimator, "upper")
    assert relative(got, want) < 1e-12


def test_neumann_at_the_optimum_matches_the_closed_form() -> None:
    known = ridge_problem(8, 10.0)
    problems, graph = known.build()
    got = betty_hypergradient(problems, graph, mlo.estimators.Neumann(iterations=400, alpha=1.0 / known.lipschitz), "upper")
    assert relative(got, known.reference) < 1e-6


def test_runs_match_mlo_round_for_round() -> None:
    ours, theirs, looped = ridge_with_prior(), ridge_with_prior(), ridge_with_prior()
    mlo.Engine(ours, GRAPH, "neumann:iterations=5,alpha=0.3").run(4)
    program = run_on_betty(theirs, GRAPH, "neumann:iterations=5,alpha=0.3", rounds=4)
    assert program.engine.global_step == 4
    iterated = BettyProgram(looped, GRAPH, "neumann:iterations=5,alpha=0.3")
    iterated.iterate(1)
    iterated.iterate(3)  # the benchmarks' way: the body of Betty's loop, one round at a time
    assert iterated.engine.global_step == 4
    for a, b, c in zip(ours, theirs, looped):
        for p, q, r in zip(a.parameters(), b.parameters(), c.parameters()):
            # the same algorithm; mlo's fused solver arithmetic (y + c x in one op) rounds differently
            torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-15)
            assert torch.equal(q, r)


class _BNRegressor(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x).squeeze(1)


def _bn_program() -> list[mlo.Problem]:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(16, 3, generator=g), torch.randn(16, generator=g)) for _ in range(3)]
    val = [(torch.randn(16, 3, generator=g), torch.randn(16, generator=g))]
    model = _BNRegressor()
    scale = Vector(torch.zeros(1))
    first, rest = list(model.net[0].parameters()), [p for m in list(model.net)[1:] for p in m.parameters()]
    opt = torch.optim.SGD([{"params": first, "lr": 0.05}, {"params": rest, "lr": 0.2, "momentum": 0.5}])

    def lower(batch: Any) -> Tensor:
        x, y = batch
        return ((model(x) - y) ** 2).mean() + scale.value.exp().sum() * sum((p**2).sum() for p in first)

    def upper(batch: Any) -> Tensor:
        x, y = batch
        return ((model(x) - y) ** 2).mean()

    return [mlo.Problem("lower", model, opt, batches, loss=lower),
            mlo.Problem("upper", scale, torch.optim.SGD(scale.parameters(), lr=0.1), val, loss=upper)]


def test_buffers_param_groups_and_modes_follow_mlo() -> None:
    """BatchNorm statistics move only in real steps, param groups and momentum are kept, and the
    modules' train/eval modes are the user's: a Betty run ends exactly where an mlo run does."""
    ours, theirs = _bn_program(), _bn_program()
    mlo.Engine(ours, GRAPH, "neumann:iterations=3,alpha=0.1").run(3)
    theirs[1].module.eval()  # a mode the user set; Betty's train() would flip it
    run_on_betty(theirs, GRAPH, "neumann:iterations=3,alpha=0.1", rounds=3)
    assert not theirs[1].module.training
    for a, b in zip(ours, theirs):
        for s, t in zip(a.module.state_dict().values(), b.module.state_dict().values()):
            assert torch.allclose(s, t, rtol=1e-5, atol=1e-6)
    assert [g["lr"] for g in theirs[0].optimizer.param_groups] == [0.05, 0.2]


def test_hypergradient_leaves_everything_as_it_was() -> None:
    problems = _bn_program()
    program = BettyProgram(problems, GRAPH, "neumann:iterations=3,alpha=0.1")
    before = [t.clone() for p in problems for t in p.module.state_dict().values()]
    program.hypergradient("upper")
    after = [t for p in problems for t in p.module.state_dict().values()]
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    assert all(p.grad is None for problem in problems for p in problem.parameters())


def test_released_cg_is_refused_and_wrong_when_forced() -> None:
    known = ridge_problem(10, 100.0)
    with pytest.raises(BettyUnsupported, match="search direction"):
        BettyProgram(known.build()[0], GRAPH, "cg:iterations=10")
    problems, graph = known.build()
    exact = mlo.Engine(problems, graph, "cg:iterations=10").hypergradient("upper")
    assert relative(exact, known.reference) < 1e-6
    with pytest.warns(BettyMismatchWarning, match="search direction"):
        forced = betty_hypergradient(known.build()[0], graph, "cg:iterations=10", "upper", allow_inexact=True)
    assert relative(forced, known.reference) > 1e-2  # Betty's CG has not converged where CG has


def test_finite_difference_is_refused_and_differs_when_forced() -> None:
    with pytest.raises(BettyUnsupported, match="inner learning rate"):
        BettyProgram(ridge_with_prior(), GRAPH, "finite_difference")
    ours = mlo.Engine(ridge_with_prior(), GRAPH, "finite_difference").hypergradient("upper")
    with pytest.warns(BettyMismatchWarning, match="look-ahead"):
        theirs = betty_hypergradient(ridge_with_prior(), GRAPH, "finite_difference", "upper", allow_inexact=True)
    assert relative(theirs, ours) > 1e-2


def test_unroll_and_damping_are_refused() -> None:
    with pytest.raises(BettyUnsupported, match="IterativeProblem"):
        BettyProgram(ridge_with_prior(), GRAPH, "unroll:steps=2")
    with pytest.raises(BettyUnsupported, match="damping"):
        BettyProgram(ridge_with_prior(), GRAPH, "cg:damping=0.1", allow_inexact=True)


def _chain() -> list[mlo.Problem]:
    mods = [Vector(torch.randn(3, dtype=torch.float64)) for _ in range(3)]
    bot, mid, top = mods

    def bot_loss(_: Any) -> Tensor:
        return ((bot.value - mid.value) ** 2).sum()

    def mid_loss(_: Any) -> Tensor:
        return ((mid.value - top.value) ** 2).sum() + (bot.value**2).sum()

    def top_loss(_: Any) -> Tensor:
        return (mid.value**2).sum()

    return [mlo.Problem(n, m, torch.optim.SGD(m.parameters(), lr=0.1), None, loss=f)
            for n, m, f in (("bot", bot, bot_loss), ("mid", mid, mid_loss), ("top", top, top_loss))]


def test_programs_betty_cannot_express_are_refused() -> None:
    chain = {"top": ["mid"], "mid": ["bot"]}
    with pytest.raises(BettyUnsupported, match="without lowers"):
        BettyProgram(_chain(), chain, "neumann")
    with pytest.raises(BettyUnsupported, match="multi-hop"):
        BettyProgram(_chain(), {"top": ["mid", "bot"], "mid": ["bot"]}, "first_order")
    stepping = ridge_with_prior()
    stepping[1].steps = 2
    with pytest.raises(BettyUnsupported, match="steps=2"):
        BettyProgram(stepping, GRAPH, "neumann")
    with pytest.raises(mlo.GraphError):  # mlo's own checks come first
        BettyProgram(ridge_with_prior(), {"upper": ["nowhere"]}, "neumann")


def test_deep_chain_warns_about_the_upper_reading_deeper_levels() -> None:
    mixed = {("top", "mid"): "finite_difference", ("mid", "bot"): "neumann"}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", BettyMismatchWarning)
        BettyProgram(_chain(), {"top": ["mid"], "mid": ["bot"]}, mixed, allow_inexact=True)
    messages = [str(w.message) for w in caught if w.category is BettyMismatchWarning]
    assert any("ignores its loss's direct dependence on ['bot']" in m for m in messages)
    assert any("'darts'" in m for m in messages)
    with warnings.catch_warnings():
        warnings.simplefilter("error", BettyMismatchWarning)
        BettyProgram(_chain(), {"top": ["mid"], "mid": ["bot"]}, "first_order")  # no implicit part: no warning


def test_first_order_is_not_nan_and_runs() -> None:
    program = run_on_betty(ridge_with_prior(), GRAPH, "first_order", rounds=2)
    grads = program.hypergradient("upper")
    assert all(math.isfinite(float(g.abs().sum())) for g in grads)
