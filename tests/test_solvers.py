"""The linear solvers under the implicit estimators, and what they report: CG's residual and
convergence, its warning on an indefinite Hessian, Neumann's early divergence check and
``alpha="auto"`` by power iteration. References: explicit matrices solved by LAPACK, in float64."""

from __future__ import annotations

import warnings

import pytest
import torch

import mlo
from mlo.estimators import CG, Neumann
from mlo.estimators.solvers import (
    checked_term,
    conjugate_gradient,
    largest_eigenvalue,
    neumann_series,
    per_task_largest_eigenvalue,
    per_task_neumann_series,
)
from mlo.estimators.update_rules import rule_for
from mlo.problems.ridge import Vector

from .helpers import relative_error, ridge

pytestmark = pytest.mark.usefixtures("float64", "one_thread")


def _matrix(eigenvalues, seed=0):
    """A symmetric matrix with the given eigenvalues, in a random orthonormal basis."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(len(eigenvalues), len(eigenvalues), generator=g))
    return q @ torch.diag(torch.tensor(eigenvalues)) @ q.T


class Counted:
    def __init__(self, A):
        self.A, self.calls = A, 0

    def __call__(self, v):
        self.calls += 1
        return (self.A @ v[0],)


def test_cg_reports_a_converged_solve():
    A = _matrix([1.0, 2.0, 3.0, 5.0, 8.0])
    b = torch.arange(1.0, 6.0)
    (x,), info = conjugate_gradient(Counted(A), (b,), iterations=20, tol=1e-12)
    assert relative_error(x, torch.linalg.solve(A, b)) < 1e-10
    assert info["converged"] == 1.0 and info["residual"] <= 1e-12 and info["negative_curvature"] == 0.0
    assert info["iterations"] == 5  # n distinct eigenvalues: n steps in exact arithmetic


def test_cg_reports_negative_curvature_and_no_convergence_on_an_indefinite_matrix():
    A = _matrix([-3.0, 0.5, 1.0, 2.0, 4.0, 6.0, 9.0, 12.0])
    b = torch.ones(8)
    _, info = conjugate_gradient(Counted(A), (b,), iterations=3, tol=1e-12)
    assert info["converged"] == 0.0 and info["negative_curvature"] == 1.0 and info["residual"] > 1e-3


def _indefinite_bilevel(damping_needed=3.0):
    """Lower loss 1/2 w^T A w + h^T w with A indefinite (smallest eigenvalue -damping_needed + 1),
    upper loss 1/2 |w - 1|^2."""
    A = _matrix([1.0 - damping_needed, 0.5, 1.0, 2.0, 4.0, 6.0, 9.0, 12.0], seed=1)
    w, h = Vector(torch.linspace(-1, 1, 8)), Vector(torch.linspace(0.5, -0.5, 8))
    lower = mlo.Problem("w", w, torch.optim.SGD(w.parameters(), lr=0.01), loss=lambda batch: 0.5 * w.value @ A @ w.value + h.value @ w.value)
    upper = mlo.Problem("h", h, torch.optim.SGD(h.parameters(), lr=0.01), loss=lambda batch: 0.5 * ((w.value - 1) ** 2).sum())
    return A, lower, upper


def test_cg_estimator_warns_on_an_indefinite_hessian_and_names_damping():
    A, lower, upper = _indefinite_bilevel()
    engine = mlo.Engine([lower, upper], {"h": ["w"]}, CG(iterations=3))
    with pytest.warns(mlo.ConvergenceWarning, match=r"cg on edge 'h' -> 'w' did not converge.*indefinite.*damping"):
        engine.hypergradient("h")
    assert engine.diagnostics.by_edge[("h", "w")]["converged"] == 0.0
    # damping that makes H + damping I positive definite: no warning, converged, and the answer of
    # the damped system
    damped = mlo.Engine([lower, upper], {"h": ["w"]}, CG(iterations=50, damping=4.0, tol=1e-12))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = damped.hypergradient("h")[0]
    assert damped.diagnostics.by_edge[("h", "w")]["converged"] == 1.0
    want = -torch.linalg.solve(A + 4.0 * torch.eye(8), lower.module.value.detach() - 1)
    assert relative_error(got, want) < 1e-9


def test_the_cg_warning_is_shown_once_per_edge_in_a_run():
    _, lower, upper = _indefinite_bilevel()
    engine = mlo.Engine([lower, upper], {"h": ["w"]}, CG(iterations=3))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("default")  # Python's own default for warnings: once per text and place
        engine.run(4)
    shown = [w for w in seen if issubclass(w.category, mlo.ConvergenceWarning)]
    assert len(shown) == 1 and "edge 'h' -> 'w'" in str(shown[0].message)
    assert engine.diagnostics.by_edge[("h", "w")]["converged"] == 0.0  # the numbers are here


def test_neumann_stops_at_the_first_checked_term_past_the_growth_bound():
    A = _matrix([0.5, 1.0, 2.0, 4.0])
    b = torch.ones(4)
    matvec = Counted(A)
    alpha = 0.75  # |1 - alpha * 4| = 2: the top component doubles each term
    # the growing component is a quarter of b's norm^2 and doubles per term: past 2x |b| from term 3;
    # the series stops at the first tested term from term 3 on (term 16: within 2x of where it diverged)
    tested = next(i for i in range(3, 1001) if checked_term(i, 1000))
    assert tested <= 16
    with pytest.raises(mlo.DivergenceError, match=rf"neumann on edge X: term {tested} .* diverges"):
        neumann_series(matvec, (b,), iterations=1000, alpha=alpha, growth=2.0, where="edge X")
    assert matvec.calls == tested


def test_neumann_tests_the_last_term_of_a_short_series():
    A = _matrix([0.5, 4.0])
    matvec = Counted(A)
    with pytest.raises(mlo.DivergenceError, match="term 5 "):
        neumann_series(matvec, (torch.ones(2),), iterations=5, alpha=0.75, growth=2.0, where="e")
    assert matvec.calls == 5
    assert [i for i in range(1, 101) if checked_term(i, 100)] == [16, 32, 64, 100]


def test_neumann_reports_its_terms():
    A = _matrix([1.0, 2.0, 4.0])
    b = torch.ones(3)
    (x,), info = neumann_series(Counted(A), (b,), iterations=200, alpha=0.25, growth=2.0, where="e")
    assert relative_error(x, torch.linalg.solve(A, b)) < 1e-9
    assert info["terms"] == 200 and info["alpha"] == 0.25 and info["last_term"] < 1e-10


def test_power_iteration_finds_the_largest_eigenvalue_among_the_start_directions():
    eigenvalues = [0.3, 1.0, 2.0, 5.0, 7.0]
    A = _matrix(eigenvalues)
    start = torch.ones(5)
    assert abs(largest_eigenvalue(Counted(A), (start,), 60) - 7.0) < 1e-6
    # a start with no component along the top eigenvector sees the next one
    _, vectors = torch.linalg.eigh(A)
    inside = vectors[:, :4] @ torch.ones(4)
    assert abs(largest_eigenvalue(Counted(A), (inside,), 60) - 5.0) < 1e-6
    assert largest_eigenvalue(Counted(A), (torch.zeros(5),), 10) == 0.0
    # from below: a Rayleigh quotient never exceeds the top eigenvalue
    assert largest_eigenvalue(Counted(A), (start,), 2) <= 7.0


def test_neumann_auto_alpha_matches_the_closed_form():
    r = ridge()
    r.set_w(r.optimum())
    est = mlo.estimators.parse("neumann:alpha=auto,iterations=400,power_iterations=50")
    assert est == Neumann(iterations=400, alpha="auto", power_iterations=50)
    engine = r.engine(est)
    got = engine.hypergradient("h")[0]
    assert relative_error(got, r.exact_hypergradient()) < 1e-6
    info = engine.diagnostics.by_edge[("h", "w")]
    top = float(torch.linalg.eigvalsh(r.hessian())[-1])
    assert abs(1.0 / info["alpha"] - top) < 1e-3 * top
    assert info["hvps"] == 400 + 50


@pytest.mark.parametrize(
    "spec,value",
    [("neumann:alpha=0.05", 0.05), ("neumann:alpha=auto", "auto"), ("neumann:alpha=2", 2.0)],
)
def test_neumann_alpha_reads_a_number_or_auto(spec, value):
    alpha = mlo.estimators.parse(spec).alpha  # type: ignore[attr-defined]
    assert alpha == value and type(alpha) is type(value)


@pytest.mark.parametrize("value", ["fast", "Auto", "-1", "0", "nan"])
def test_neumann_alpha_rejects_other_values_naming_the_option(value):
    with pytest.raises(mlo.EstimatorError, match=r"option 'alpha' must be > 0 or 'auto'"):
        mlo.estimators.parse(f"neumann:alpha={value}")
    with pytest.raises(mlo.EstimatorError, match="option 'alpha'"):
        Neumann(alpha=None)  # type: ignore[arg-type]


def test_neumann_auto_on_an_indefinite_hessian_refuses():
    _, lower, upper = _indefinite_bilevel(damping_needed=40.0)  # the most negative eigenvalue dominates
    engine = mlo.Engine([lower, upper], {"h": ["w"]}, Neumann(alpha="auto", iterations=50))
    with pytest.raises(mlo.DivergenceError, match="neumann on edge 'h' -> 'w'"):
        engine.hypergradient("h")


def test_cg_can_stop_at_the_first_negative_curvature():
    A = _matrix([-3.0, 0.5, 1.0, 2.0, 4.0, 6.0, 9.0, 12.0])
    b = torch.ones(8)
    (x_on,), on = conjugate_gradient(Counted(A), (b,), iterations=50, tol=1e-12)
    matvec = Counted(A)
    (x_stop,), stop = conjugate_gradient(matvec, (b,), iterations=50, tol=1e-12, stop_at_negative_curvature=True)
    assert stop["negative_curvature"] == 1.0 and stop["converged"] == 0.0
    k = int(stop["iterations"])
    assert matvec.calls == k < 8
    # it kept the iterate (and residual) of the k - 1 steps before that direction
    (x_before,), before = conjugate_gradient(Counted(A), (b,), iterations=k - 1, tol=0.0)
    assert torch.equal(x_stop, x_before) and stop["residual"] == before["residual"]
    assert on["negative_curvature"] == 1.0  # by default it iterates on
    assert mlo.estimators.parse("cg:indefinite=stop") == CG(indefinite="stop")
    with pytest.raises(mlo.EstimatorError, match="option 'indefinite' must be one of 'continue', 'stop'"):
        CG(indefinite="halt")  # type: ignore[arg-type]


@pytest.mark.parametrize("steps", [1, 3])
def test_lookahead_estimators_report_their_steps(steps):
    r = ridge()
    lr = r.inner.optimizer.param_groups[0]["lr"]
    w, h = r.w(), r.h()
    # the look-ahead of `steps` plain SGD steps, written out
    ahead = w.clone()
    for _ in range(steps):
        v = ahead.clone().requires_grad_()
        (g,) = torch.autograd.grad(r.inner_fn(v, h), v)
        ahead = ahead - lr * g
    engine = r.engine(f"unroll:steps={steps}")
    engine.hypergradient("h")
    info = engine.diagnostics.by_edge[("h", "w")]
    assert info["steps"] == steps and info["step_norm"] == pytest.approx(float((ahead - w).norm()), rel=1e-9)
    if steps == 1:
        fd = r.engine("finite_difference:radius=0.01")
        fd.hypergradient("h")
        info = fd.diagnostics.by_edge[("h", "w")]
        assert info["step_norm"] == pytest.approx(float((ahead - w).norm()), rel=1e-9)
        # the central difference along v = lr * a (a the upper gradient at the look-ahead), eps = radius / |v|
        a = r.validation_gradient(ahead)
        assert info["direction_norm"] == pytest.approx(lr * float(a.norm()), rel=1e-9)
        assert info["epsilon"] == pytest.approx(0.01 / info["direction_norm"], rel=1e-12)


def _task_blocks():
    """Four 7-unknown systems stacked as a task batch (parameters (4, 3) and (4, 2, 2)): a generic
    SPD block, 2 I (converges in one step), b = 0, and an indefinite block."""
    blocks = torch.stack([_matrix([0.3, 1.0, 2.0, 3.0, 5.0, 8.0, 13.0], seed=2), 2.0 * torch.eye(7),
                          _matrix([1.0] * 7, seed=3), _matrix([-2.0, 0.5, 1.0, 2.0, 4.0, 6.0, 9.0], seed=4)])
    b = torch.randn(4, 7, generator=torch.Generator().manual_seed(5))
    b[2] = 0.0

    def split(flat):
        return flat[:, :3].clone(), flat[:, 3:].reshape(4, 2, 2)

    def matvec(v):
        return split(torch.einsum("tij,tj->ti", blocks, torch.cat([v[0], v[1].reshape(4, 4)], dim=1)))

    return blocks, b, split, matvec


@pytest.mark.parametrize("stop", [False, True], ids=["continue", "stop"])
@pytest.mark.parametrize("iterations", [2, 3, 7])
def test_per_task_cg_is_a_loop_of_ordinary_cg_at_any_iteration_count(iterations, stop):
    """Each task's result, residual and iteration count are those of CG on that task alone, also
    short of convergence (2, 3 iterations), where one joint CG over all tasks differs."""
    blocks, b, split, matvec = _task_blocks()
    x, info = conjugate_gradient(matvec, split(b), iterations, 1e-12, stop, tasks=4)
    got = torch.cat([x[0], x[1].reshape(4, 4)], dim=1)
    alone = []
    for t in range(4):
        (want,), report = conjugate_gradient(Counted(blocks[t]), (b[t],), iterations, 1e-12, stop)
        assert torch.allclose(got[t], want, rtol=1e-10, atol=1e-12)
        assert info[f"residual[{t}]"] == pytest.approx(report["residual"], rel=1e-9, abs=1e-10)
        assert info[f"iterations[{t}]"] == report["iterations"]
        alone.append(report)
    assert info["iterations[1]"] == 1 and info["iterations[2]"] == 0  # 2 I converged at once; b = 0 needs nothing
    for key, combine in (("negative_curvature", max), ("converged", min), ("iterations", max)):
        assert info[key] == combine(report[key] for report in alone)
    assert info["residual"] == pytest.approx(max(report["residual"] for report in alone), rel=1e-9)
    assert iterations == 7 or info["converged"] == 0.0
    # one CG over all tasks (shared step sizes) is another answer short of convergence
    (joint,), _ = conjugate_gradient(Counted(torch.block_diag(*blocks)), (b.reshape(-1),), iterations, 1e-12)
    assert iterations == 7 or not torch.allclose(joint.reshape(4, 7), got, rtol=1e-6)


def test_per_task_power_iteration_and_series_are_those_of_each_task_alone():
    blocks, b, split, matvec = _task_blocks()

    def flat(x):
        return torch.cat([x[0], x[1].reshape(4, 4)], dim=1)

    top = per_task_largest_eigenvalue(matvec, split(b), 4, 6)
    alone = [largest_eigenvalue(Counted(blocks[t]), (b[t],), 6) for t in range(4)]
    assert torch.allclose(top, torch.tensor(alone), rtol=1e-10) and top[2] == 0.0  # b = 0: no estimate
    alpha = 1.0 / top.clamp(min=1.0)
    x, info = per_task_neumann_series(matvec, split(b), 4, 3, alpha, 1e9, "e", scale=-1.0)
    for t in range(4):
        (want,), report = neumann_series(Counted(blocks[t]), (b[t],), 3, float(alpha[t]), 1e9, "e", scale=-1.0)
        assert torch.allclose(flat(x)[t], want, rtol=1e-10, atol=1e-14)
        assert info[f"last_term[{t}]"] == pytest.approx(report["last_term"], rel=1e-10)
        assert info[f"alpha[{t}]"] == float(alpha[t])


def test_per_task_series_catches_a_diverging_task_that_the_joint_norm_hides():
    """Task 1 diverges (alpha * 10 = 5: its terms grow 4x each) from a tiny right-hand side; the
    joint norm, dominated by task 0, stays below 2x its first term for 3 terms."""
    blocks = torch.stack([torch.eye(3), torch.diag(torch.tensor([10.0, 1.0, 1.0]))])
    b = torch.tensor([[1.0, 2.0, 3.0], [1e-3, 0.0, 0.0]])

    def matvec(v):
        return (torch.einsum("tij,tj->ti", blocks, v[0]),)

    alpha = torch.tensor([0.5, 0.5])
    neumann_series(lambda v: (torch.block_diag(*blocks) @ v[0],), (b.reshape(-1),), 3, 0.5, 2.0, "e")  # no error
    with pytest.raises(mlo.DivergenceError, match="neumann on e, task 1: term 1 has norm"):
        per_task_neumann_series(matvec, (b,), 2, 3, alpha, 2.0, "e")


@pytest.mark.parametrize("momentum", [0.0, 0.9], ids=["plain-sgd", "momentum"])
def test_unroll_step_norm_is_the_lookaheads_distance_with_either_rule(momentum: float) -> None:
    """One look-ahead step reports how far it moved the lower level, with plain SGD and with
    momentum (whose look-ahead is not lr times the gradient)."""
    r = ridge()
    for group in r.inner.optimizer.param_groups:
        group["momentum"] = momentum
    engine = r.engine("unroll:steps=1")
    engine.run(2)  # a momentum buffer, where there is one
    engine.hypergradient("h")
    w = r.w().detach().requires_grad_()
    (g,) = torch.autograd.grad(r.inner_fn(w, r.h()), w)
    (ahead,) = rule_for(r.inner.optimizer, tuple(r.inner.parameters())).step((w,), (g,))
    info = engine.diagnostics.by_edge[("h", "w")]
    assert info["step_norm"] == pytest.approx(float((ahead - w).norm()), rel=1e-9)
    assert info["step_norm"] > 0
