"""Per-level gradient transforms (mlo.transforms): clipping against torch's, chaining, state."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import mlo
from mlo import transforms
from mlo.problems.ridge import Vector

pytestmark = pytest.mark.usefixtures("one_thread")


def test_clip_by_global_norm_matches_torch(float64: None) -> None:
    g = torch.Generator().manual_seed(0)
    grads = (torch.randn(3, 4, generator=g) * 10, torch.randn(5, generator=g) * 10)
    params = tuple(nn.Parameter(torch.zeros_like(t)) for t in grads)
    for p, t in zip(params, grads):
        p.grad = t.clone()
    torch.nn.utils.clip_grad_norm_(params, 5.0)
    clip = transforms.clip_by_global_norm(5.0)
    got, _ = clip.update(grads, clip.init(params), params)
    for a, p in zip(got, params):
        torch.testing.assert_close(a, p.grad, rtol=1e-12, atol=0)
    small = tuple(t * 1e-3 for t in grads)
    kept, _ = clip.update(small, None, params)
    for a, b in zip(kept, small):  # below the limit: unchanged
        torch.testing.assert_close(a, b, rtol=1e-12, atol=0)


@pytest.mark.parametrize("bad", [0, -1.0, True, "5"])
def test_clip_rejects_bad_norm(bad: object) -> None:
    with pytest.raises(ValueError, match="max_norm"):
        transforms.clip_by_global_norm(bad)  # type: ignore[arg-type]


def test_problem_rejects_non_transform() -> None:
    v = Vector(torch.zeros(2))
    with pytest.raises(TypeError, match="level 'x': transform must be"):
        mlo.Problem("x", v, torch.optim.SGD(v.parameters(), lr=0.1), loss=lambda b: (v.value**2).sum(), transform=lambda g: g)


def test_engine_step_applies_transform_and_keeps_state(float64: None) -> None:
    """A level with a clipping transform moves by exactly lr * 1.0 along its gradient direction
    (a huge gradient clipped to norm 1); a counting transform's state survives state_dict."""
    target = torch.tensor([100.0, -200.0])
    v = Vector(torch.zeros(2))

    def count_init(params: tuple[torch.Tensor, ...]) -> dict[str, int]:
        return {"n": 0}

    def count_update(grads, state, params):  # type: ignore[no-untyped-def]
        return grads, {"n": state["n"] + 1}

    counter = transforms.GradientTransform(count_init, count_update, "count")
    level = mlo.Problem("fit", v, torch.optim.SGD(v.parameters(), lr=0.5), loss=lambda b: ((v.value - target) ** 2).sum(),
               transform=transforms.chain(transforms.clip_by_global_norm(1.0), counter))
    engine = mlo.Engine([level])
    engine.run(3)
    direction = target / target.norm()
    torch.testing.assert_close(v.value.detach(), 3 * 0.5 * direction, rtol=1e-7, atol=0)  # clip: norm/(norm + 1e-6)
    state = engine.state_dict()
    assert state["levels"]["fit"]["transform"][1] == {"n": 3}
    v2 = Vector(torch.zeros(2))
    level2 = mlo.Problem("fit", v2, torch.optim.SGD(v2.parameters(), lr=0.5), loss=lambda b: ((v2.value - target) ** 2).sum(),
                transform=transforms.chain(transforms.clip_by_global_norm(1.0), counter))
    engine2 = mlo.Engine([level2])
    engine2.load_state_dict(state)
    engine2.run(1)
    assert engine2.state_dict()["levels"]["fit"]["transform"][1] == {"n": 4}


def test_accumulate_over_micro_batches_equals_the_whole_batch(float64: None) -> None:
    """Micro-batches of 3 with accumulate(4) move a level exactly as whole batches of 12 do
    (momentum and Adam see one step per 4): for a plain level, and for an upper level whose
    hypergradient is linear in its own loss (its lower reads whole batches in both runs)."""
    from .helpers import mlp_program

    def build(level_name: str, micro: int) -> mlo.Engine:
        prog = mlp_program(batchnorm=False, unused=False, n=12)
        level, data = (prog.lower, prog.train) if level_name == "lower" else (prog.upper, prog.val)
        x, y = data[0]
        size = 12 // micro
        level.data = [(x[i : i + size], y[i : i + size]) for i in range(0, 12, size)]
        level.steps = micro
        level.transform = transforms.chain(transforms.accumulate(micro), transforms.clip_by_global_norm(1.0))
        if level_name == "lower":
            return mlo.Engine([prog.lower])
        # neumann: linear in the adjoint (a few CG iterations are not: their Krylov space depends on it)
        return mlo.Engine([prog.lower, prog.upper], {"upper": ["lower"]}, mlo.estimators.Neumann(iterations=5, alpha=0.05))

    for name in ("lower", "upper"):
        whole, micro = build(name, 1), build(name, 4)
        whole.run(3)
        micro.run(3)
        for level in whole.program.params:
            for a, b in zip(whole.program.params[level], micro.program.params[level]):
                torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
        assert micro.state_dict()["levels"][name]["transform"][0]["count"] == 0


def test_accumulate_rejects_bad_counts() -> None:
    with pytest.raises(ValueError, match="micro_batches"):
        transforms.accumulate(0)
