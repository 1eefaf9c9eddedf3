"""MAML and iMAML (`mlo.problems.maml`) with the tasks as one vmapped level (`mlo.tasks.TaskBatch`):
MAML's meta-step against higher's per-task loop, iMAML's hypergradient against its per-task
closed form, both in float64, and `mlo run maml` end to end."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mlo
from mlo.benchmarks import maml as bench
from mlo.cli import main
from mlo.estimators.solvers import largest_eigenvalue, neumann_series
from mlo.problems import maml
from mlo.tasks import TaskBatch

pytestmark = pytest.mark.usefixtures("one_thread")


def test_task_batch_evaluates_each_task_with_its_own_parameters(float64: None) -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 1))
    tasks = TaskBatch(net, 4)
    with torch.no_grad():
        for p in tasks.parameters():
            p.add_(torch.randn_like(p))
    x = torch.randn(4, 5, 2)
    got = tasks.per_task(lambda model, inputs: model(inputs), x)
    for t in range(4):
        params = {name: value[t] for name, value in tasks.stacked().items()}
        assert torch.allclose(got[t], torch.func.functional_call(net, params, (x[t],)), rtol=1e-13)
    assert [p.shape for p in tasks.broadcast(net)] == [p.shape for p in tasks.parameters()]


@pytest.mark.parametrize("inner_steps", [1, 3])
def test_maml_meta_steps_equal_highers_per_task_loop(inner_steps: int, float64: None) -> None:
    pytest.importorskip("higher")
    ours, theirs, batch = bench.copies(torch.float64, tasks=4)
    step_ours = bench.mlo_step(ours, batch, inner_steps, 0.01, 1e-3)
    step_theirs = bench.higher_step(theirs, batch, inner_steps, 0.01, 1e-3)
    for _ in range(3):
        step_ours()
        step_theirs()
    moved = 0.0
    for p, q, p0 in zip(ours.parameters(), theirs.parameters(), bench.network(bench.CONFIG["hidden"], torch.float64).parameters()):
        assert torch.allclose(p, q, rtol=1e-10, atol=1e-12)
        moved = max(moved, float((p - p0).abs().max()))
    assert moved > 1e-4  # the meta-parameters did move


def test_imaml_hypergradient_is_the_per_task_implicit_formula(float64: None) -> None:
    """Linear regression tasks: phi_t* solves (A_t + lam I) phi = b_t + lam theta, so
    d phi_t*/d theta = lam (A_t + lam I)^{-1} and the meta-gradient is
    mean_t lam (A_t + lam I)^{-1} grad L_query,t(phi_t). With CG run to convergence (12 unknowns
    in all) the batched solve is the per-task one."""
    g = torch.Generator().manual_seed(0)
    net = nn.Linear(2, 1)
    lam, tasks = 0.7, 4
    batch = maml.Tasks(torch.randn(tasks, 6, 2, generator=g), torch.randn(tasks, 6, 1, generator=g),
                       torch.randn(tasks, 5, 2, generator=g), torch.randn(tasks, 5, 1, generator=g))
    problems, graph, _ = maml.imaml(net, tasks, [batch], F.mse_loss, inner_lr=0.1, inner_steps=30, proximal=lam)
    engine = mlo.Engine(problems, graph, "cg:iterations=12")
    engine.restart("tasks")
    for _ in range(30):
        engine.step("tasks")
    got = torch.cat([t.reshape(-1) for t in engine.hypergradient("meta")])
    phi = torch.cat([t.reshape(tasks, -1) for t in problems[0].parameters()], dim=1)  # (T, 3): weight, bias

    def fit(w: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(x @ w[:2] + w[2], y.squeeze(-1))

    want = torch.zeros(3)
    for t in range(tasks):
        hessian = torch.autograd.functional.hessian(lambda w: fit(w, batch.support_x[t], batch.support_y[t]), phi[t])
        query = torch.autograd.functional.jacobian(lambda w: fit(w, batch.query_x[t], batch.query_y[t]), phi[t])
        want += lam * torch.linalg.solve(hessian + lam * torch.eye(3), query) / tasks
    assert torch.allclose(got, want, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("cg_iterations", [2, 3])
def test_imaml_solves_each_task_with_its_own_cg_as_a_per_task_loop(cg_iterations: int, float64: None) -> None:
    """Short of convergence (2 or 3 CG iterations on 1761 unknowns per task), the batched solve
    equals a loop over tasks, each with its own proximal inner steps and its own CG written with
    torch.autograd.grad: per-task step sizes, not shared ones."""
    net, _, batch = bench.copies(torch.float64, tasks=4)
    problems, graph, estimator = maml.imaml(net, 4, [batch], F.mse_loss, inner_lr=0.01, inner_steps=3, proximal=0.5,
                                            cg_iterations=cg_iterations)
    engine = mlo.Engine(problems, graph, estimator)
    engine.restart("tasks")
    for _ in range(3):
        engine.step("tasks")
    got = engine.hypergradient("meta")
    want = bench.hand_imaml_gradient(net, batch, 3, 0.01, 0.5, bench.hand_cg(cg_iterations))
    for a, b in zip(got, want):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-13)
    info = engine.diagnostics.by_edge[("meta", "tasks")]
    assert info["converged"] == 0.0 and [info[f"iterations[{t}]"] for t in range(4)] == [cg_iterations] * 4
    assert len({info[f"residual[{t}]"] for t in range(4)}) == 4  # each task's own residual


def test_imaml_with_neumann_auto_takes_each_tasks_own_step_size(float64: None) -> None:
    """``neumann:alpha=auto`` over the task batch: each task's power iteration and series, as a
    loop over tasks running mlo's own solvers on each task alone."""
    net, _, batch = bench.copies(torch.float64, tasks=3)
    problems, graph, _ = maml.imaml(net, 3, [batch], F.mse_loss, inner_lr=0.01, inner_steps=2, proximal=1.0)
    engine = mlo.Engine(problems, graph, "neumann:alpha=auto,iterations=3,power_iterations=4,growth=1e6")
    engine.restart("tasks")
    for _ in range(2):
        engine.step("tasks")
    got = engine.hypergradient("meta")

    def neumann(hvp: Any, b: list[torch.Tensor]) -> list[torch.Tensor]:
        matvec = lambda v: tuple(hvp(list(v)))  # noqa: E731
        top = largest_eigenvalue(matvec, tuple(b), 4)
        return list(neumann_series(matvec, tuple(b), 3, 1.0 / top, 1e6, "one task")[0])

    want = bench.hand_imaml_gradient(net, batch, 2, 0.01, 1.0, neumann)
    for a, b in zip(got, want):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-13)
    alphas = [engine.diagnostics.by_edge[("meta", "tasks")][f"alpha[{t}]"] for t in range(3)]
    assert max(alphas) > 1.01 * min(alphas)  # the tasks' step sizes differ: one shared alpha would not do


def test_imaml_meta_steps_equal_the_per_task_loop(float64: None) -> None:
    """The benchmark's two iMAML contenders take the same meta-steps."""
    ours, theirs, batch = bench.copies(torch.float64, tasks=3)
    steps = [build(net, batch, 4, 0.01, 1e-3, 1.0, 3) for build, net in zip(bench.IMAML_STEPS.values(), (ours, theirs))]
    for _ in range(2):
        for step in steps:
            step()
    for p, q in zip(ours.parameters(), theirs.parameters()):
        assert torch.allclose(p, q, rtol=1e-10, atol=1e-12)


def test_mlo_run_maml_end_to_end(tmp_path: Path) -> None:
    code = main(["run", "maml", "--seeds", "1", "--rounds", "2", "--tasks", "2", "--test-tasks", "3",
                 "--imaml-steps", "2", "--out", str(tmp_path / "s")])
    assert code == 0
    doc = json.loads((tmp_path / "s" / "results.json").read_text())
    assert [r["method"] for r in doc["summary"]] == ["maml", "imaml", "scratch"]
    assert all(r["query_mse"] >= 0 and r["query_mse_proximal"] >= 0 for r in doc["runs"])
    assert "paired" not in doc["summary"][0] and "query_mse_proximal" in doc["summary"][1]["paired"]
    assert main(["run", "maml", "--methods", "imaml,scratch", "--seeds", "1"]) == 2  # the reference, maml, is not run
    code = main(["run", "maml", "--problem", "digits", "--seeds", "1", "--rounds", "2", "--tasks", "2",
                 "--test-tasks", "3", "--methods", "maml", "--out", str(tmp_path / "d")])
    assert code == 0
    assert 0 <= json.loads((tmp_path / "d" / "results.json").read_text())["runs"][0]["query_error"] <= 100


def test_meta_test_adaptation_takes_proximal_sgd_steps_per_task(float64: None) -> None:
    """`adapt` with ``proximal``: each task's steps on its support loss plus
    ``proximal / 2 * ||phi - theta||^2``, against a plain loop over tasks."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(1, 4), nn.Tanh(), nn.Linear(4, 1))
    batch = next(iter(maml.SinusoidTasks(3, 5, 4, seed=1)))
    got = maml.adapt(net, batch, F.mse_loss, inner_lr=0.1, steps=3, proximal=2.0)
    theta = [p.detach() for p in net.parameters()]
    for t in range(3):
        phi = [p.clone().requires_grad_() for p in theta]
        for _ in range(3):
            out = torch.func.functional_call(net, dict(zip([n for n, _ in net.named_parameters()], phi)), (batch.support_x[t],))
            fit = F.mse_loss(out, batch.support_y[t]) + 1.0 * sum(((p - a) ** 2).sum() for p, a in zip(phi, theta))
            grads = torch.autograd.grad(fit, phi)
            phi = [(p - 0.1 * g).detach().requires_grad_() for p, g in zip(phi, grads)]
        query = torch.func.functional_call(net, dict(zip([n for n, _ in net.named_parameters()], phi)), (batch.query_x[t],))
        torch.testing.assert_close(got[t], query, rtol=1e-10, atol=1e-12)
    plain = maml.adapt(net, batch, F.mse_loss, inner_lr=0.1, steps=3)
    assert not torch.allclose(plain, got)
