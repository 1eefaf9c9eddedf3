"""`mlo.hypergradient`, the functional core: a pure function of the program, the point, the
batches and the levels' state, which `Engine.hypergradient` and `Engine.step` call."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import mlo

pytestmark = pytest.mark.usefixtures("one_thread")

GRAPH = {"T": ["M"], "M": ["L"]}


class Affine(nn.Module):
    def __init__(self, n: int, seed: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(n, generator=torch.Generator().manual_seed(seed)) * 0.1)


def _program(lower_optimizer: type[torch.optim.Optimizer] = torch.optim.Adam) -> list[mlo.Problem]:
    """Three levels on batches of data: L fits the data with a penalty M sets, M is fitted on
    other data with a penalty T sets, T on held-out data. Every loss reads its batch."""
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(8, 4, generator=g), torch.randn(8, generator=g)) for _ in range(3)]
    top, mid, low = Affine(4, 1), Affine(4, 2), Affine(4, 3)

    def fit(batch: tuple[torch.Tensor, torch.Tensor], w: torch.Tensor) -> torch.Tensor:
        x, y = batch
        return ((x @ w - y) ** 2).mean()

    return [
        mlo.Problem("L", low, lower_optimizer(low.parameters(), lr=0.05), data,
                    loss=lambda b: fit(b, low.w) + (torch.nn.functional.softplus(mid.w) * low.w**2).sum()),
        mlo.Problem("M", mid, torch.optim.SGD(mid.parameters(), lr=0.05), data[::-1],
                    loss=lambda b: fit(b, low.w + 0.5 * mid.w) + (torch.nn.functional.softplus(top.w) * mid.w**2).sum()),
        mlo.Problem("T", top, torch.optim.SGD(top.parameters(), lr=0.05), data[1:],
                    loss=lambda b: fit(b, low.w + mid.w) + 0.01 * (top.w**2).sum()),
    ]


@pytest.mark.filterwarnings("ignore::mlo.ConvergenceWarning")
@pytest.mark.parametrize("estimator", mlo.estimators.names())
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_function_equals_the_engine_bit_for_bit(estimator: str, precision: str) -> None:
    problems = _program()
    engine = mlo.Engine(problems, GRAPH, estimator, precision=precision)
    engine.run(3)
    for level in ("T", "M"):
        want = engine.hypergradient(level)
        got = mlo.hypergradient(
            level, problems, GRAPH, estimator,
            batches={name: engine.batch(name) for name in ("T", "M", "L")},
            last_gradients={name: s.last_gradient for name, s in engine.levels.items() if s.last_gradient is not None},
            precision=precision,
        )
        assert len(got.gradient) == len(want)
        assert all(torch.equal(a, b) for a, b in zip(got.gradient, want)), (estimator, level)


def test_the_function_reads_the_batches_it_is_given_not_the_engines() -> None:
    problems = _program()
    engine = mlo.Engine(problems, GRAPH, "cg")
    engine.run(2)
    other = {name: (torch.ones(8, 4), torch.zeros(8)) for name in ("T", "M", "L")}
    got = mlo.hypergradient("T", problems, GRAPH, "cg", batches=other).gradient
    assert all(torch.equal(a, b) for a, b in zip(got, engine.hypergradient("T", batches=other)))
    assert not torch.equal(got[0], engine.hypergradient("T")[0])


def test_the_function_changes_nothing_and_reads_the_point_it_is_given() -> None:
    problems = _program()
    engine = mlo.Engine(problems, GRAPH, "cg")
    engine.run(2)
    before = engine.state_dict()
    batches = {name: engine.batch(name) for name in ("T", "M", "L")}
    here = mlo.hypergradient("T", problems, GRAPH, "cg", batches=batches).gradient
    moved = {"L": (problems[0].module.w.detach() + 1.0,)}
    elsewhere = mlo.hypergradient("T", problems, GRAPH, "cg", batches=batches, point=moved).gradient
    assert not torch.equal(here[0], elsewhere[0])
    after = engine.state_dict()
    for name in ("T", "M", "L"):
        assert torch.equal(before["levels"][name]["module"]["w"], after["levels"][name]["module"]["w"])


def test_a_missing_batch_is_named() -> None:
    problems = _program()
    with pytest.raises(mlo.ProgramError, match="no batch for level 'L'"):
        mlo.hypergradient("T", problems, GRAPH, "cg", batches={"T": None, "M": None})


def test_problem_batch_is_the_batch_of_the_evaluation() -> None:
    """A loss reading another level's ``Problem.batch`` sees the batch the evaluation was given."""
    problems = _program()
    low = problems[0]
    seen = []
    top = problems[2]
    reading = mlo.Problem("T", top.module, top.optimizer, loss=lambda _: seen.append(low.batch) or (top.module.w**2).sum()
                          + (low.module.w * top.module.w).sum())
    program = [problems[0], problems[1], reading]
    engine = mlo.Engine(program, GRAPH, "cg")
    engine.run(1)
    assert seen and seen[-1] is engine.batch("L") and low.batch is engine.batch("L")
    given = (torch.ones(8, 4), torch.zeros(8))
    mlo.hypergradient("T", program, GRAPH, "cg", batches={"M": engine.batch("M"), "L": given})
    assert seen[-1] is given
    assert low.batch is engine.batch("L")
