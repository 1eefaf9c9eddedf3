"""What a level can be: made from a loss function, started from other levels (``init``), taking
no steps of its own (``steps=0``); and what a program can see of it: its current batch, and a
hook before every round. Derivatives are checked in float64 against closed forms."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import mlo
from mlo.problems.ridge import Vector

pytestmark = pytest.mark.usefixtures("one_thread")


def _sgd(module: nn.Module, lr: float = 0.1) -> torch.optim.SGD:
    return torch.optim.SGD(module.parameters(), lr=lr)


# ---------------------------------------------------------------------------------------------- a Problem from a function


def test_problem_from_a_loss_function_needs_no_subclass():
    v = Vector(torch.tensor([3.0, -1.0]))
    level = mlo.Problem("v", v, _sgd(v, 0.25), loss=lambda batch: (v.value**2).sum())
    mlo.Engine([level]).run(1)
    assert torch.allclose(v.value.detach(), torch.tensor([1.5, -0.5]))  # x - 0.25 * 2x


def test_problem_without_a_loss_or_with_two():
    v = Vector(torch.ones(1))
    with pytest.raises(TypeError, match="level 'v': mlo.Problem needs a loss function"):
        mlo.Problem("v", v, _sgd(v))

    class Square(mlo.Problem):
        def loss(self, batch):
            return (v.value**2).sum()

    with pytest.raises(TypeError, match="Square defines `loss`; do not also pass loss="):
        Square("v", v, _sgd(v), loss=lambda batch: v.value.sum())
    with pytest.raises(TypeError, match="loss must be a function of the batch"):
        mlo.Problem("v", v, _sgd(v), loss=3.0)


# ---------------------------------------------------------------------------------------------- batches and hooks


def test_current_batch_is_public_and_hooks_run_before_each_round():
    v, u = Vector(torch.zeros(1)), Vector(torch.zeros(1))
    seen = []
    lower = mlo.Problem("lower", v, _sgd(v), data=[1.0, 2.0, 3.0], loss=lambda b: ((v.value - b) ** 2).sum() + (u.value * v.value).sum())
    upper = mlo.Problem("upper", u, _sgd(u), loss=lambda b: seen.append(lower.batch) or (v.value**2).sum() + (u.value**2).sum())
    order = []

    class Before(mlo.Hook):
        def before_round(self, engine):
            order.append(("before", engine.round, lower.batch))

        def on_step(self, engine, level, loss):
            order.append((level, engine.round, lower.batch))

    assert lower.batch is None
    mlo.Engine([lower, upper], {"upper": ["lower"]}, "first_order", hooks=[Before()]).run(2)
    assert order == [("before", 0, None), ("lower", 0, 1.0), ("upper", 0, 1.0),
                     ("before", 1, 1.0), ("lower", 1, 2.0), ("upper", 1, 2.0)]
    assert seen == [1.0, 2.0]  # the upper's loss read the lower level's batch of its round


# ---------------------------------------------------------------------------------------------- init and steps=0


def _inner_outer(float64: None, inner_steps: int, task_batches: list[tuple[torch.Tensor, torch.Tensor]]):
    """Meta-parameters theta; the inner level starts from theta every round and (steps=0) takes
    no steps of its own. Inner loss 1/2 (phi - a)^T A (phi - a), outer 1/2 |phi - b|^2, with
    (a, b) the round's task batch."""
    g = torch.Generator().manual_seed(0)
    d = 3
    q = torch.randn(d, d, generator=g)
    A = q @ q.T / d + 0.5 * torch.eye(d)
    theta, phi = Vector(torch.randn(d, generator=g)), Vector(torch.zeros(d))
    inner = mlo.Problem(
        "inner", phi, _sgd(phi, 0.3), data=task_batches, steps=inner_steps,
        loss=lambda batch: 0.5 * (phi.value - batch[0]) @ A @ (phi.value - batch[0]),
        init=lambda: tuple(theta.parameters()),
    )
    outer = mlo.Problem("outer", theta, _sgd(theta, 0.1), loss=lambda _: 0.5 * ((phi.value - inner.batch[1]) ** 2).sum())
    return A, theta, phi, inner, outer


def test_steps_zero_unroll_differentiates_through_the_initialisation(float64):
    """MAML: phi_K = a + (I - lr A)^K (theta - a), d outer / d theta = ((I - lr A)^K)^T (phi_K - b)."""
    g = torch.Generator().manual_seed(1)
    tasks = [(torch.randn(3, generator=g), torch.randn(3, generator=g)) for _ in range(4)]
    A, theta, phi, inner, outer = _inner_outer(float64, 0, tasks)
    K, lr = 4, 0.3
    M = torch.linalg.matrix_power(torch.eye(3) - lr * A, K)
    engine = mlo.Engine([inner, outer], {"outer": ["inner"]}, f"unroll:steps={K}")
    for i in (0, 2):
        t0 = theta.value.detach().clone()
        a, b = tasks[i]
        engine.restart("inner")  # what run() does at the inner level's turn: draw a task, phi = theta
        assert torch.allclose(engine.hypergradient("outer")[0], M.T @ (a + M @ (t0 - a) - b), rtol=1e-12, atol=1e-14)
        a, b = tasks[i + 1]
        engine.run(1)  # the next task
        assert torch.allclose(theta.value.detach(), t0 - 0.1 * M.T @ (a + M @ (t0 - a) - b), rtol=1e-12, atol=1e-14)
        assert torch.equal(phi.value.detach(), t0)  # a steps=0 level holds its init, never a step of its own


def test_init_restarts_the_level_every_round_on_one_batch(float64):
    """iMAML's inner problem: every round phi starts at theta with a fresh optimizer and takes all
    its steps on the one task batch it drew."""
    g = torch.Generator().manual_seed(2)
    tasks = [(torch.randn(3, generator=g), torch.randn(3, generator=g)) for _ in range(3)]
    A, theta, phi, inner, outer = _inner_outer(float64, 5, tasks)
    inner.optimizer = torch.optim.SGD(phi.parameters(), lr=0.3, momentum=0.9)
    seen = []

    class Watch(mlo.Hook):
        def on_step(self, engine, level, loss):
            if level == "inner":
                seen.append((engine.round, inner.batch[0]))
            else:
                assert phi.value.detach().ne(theta.value.detach()).any()

    engine = mlo.Engine([inner, outer], {"outer": ["inner"]}, "cg", hooks=[Watch()])
    for rnd in range(3):
        t0 = theta.value.detach().clone()
        a = tasks[rnd][0]
        # the reference: 5 heavy-ball steps from theta, momentum starting from nothing
        w, buf = t0.clone(), None
        for _ in range(5):
            grad = A @ (w - a)
            buf = grad if buf is None else 0.9 * buf + grad
            w = w - 0.3 * buf
        engine.run(1)
        assert torch.allclose(phi.value.detach(), w, rtol=1e-12, atol=1e-14)
    assert [r for r, _ in seen] == [0] * 5 + [1] * 5 + [2] * 5
    assert all(torch.equal(batch, tasks[r][0]) for r, batch in seen)


def test_steps_zero_is_checked_when_the_engine_is_built():
    theta, phi = Vector(torch.zeros(2)), Vector(torch.zeros(2))
    with pytest.raises(ValueError, match="level 'inner': steps=0 .* needs init"):
        mlo.Problem("inner", phi, _sgd(phi), steps=0, loss=lambda b: phi.value.sum())
    inner = mlo.Problem("inner", phi, _sgd(phi), steps=0, loss=lambda b: (phi.value**2).sum(), init=lambda: tuple(theta.parameters()))
    outer = mlo.Problem("outer", theta, _sgd(theta), loss=lambda b: (phi.value**2).sum())
    with pytest.raises(mlo.ProgramError, match="edge 'outer' -> 'inner'.*steps=0.*got 'cg'"):
        mlo.Engine([inner, outer], {"outer": ["inner"]}, "cg")
    with pytest.raises(mlo.ProgramError, match="level 'inner' has steps=0 and no upper level"):
        mlo.Engine([inner, outer], {}, "unroll")
    bad = mlo.Problem("bad", phi, _sgd(phi), steps=0, loss=lambda b: (phi.value**2).sum(), init=lambda: (torch.zeros(3),))
    with pytest.raises(mlo.ProgramError, match=r"level 'bad': init\(\) returned shapes \[\(3,\)\]"):
        mlo.Engine([bad, outer], {"outer": ["bad"]}, "unroll")
