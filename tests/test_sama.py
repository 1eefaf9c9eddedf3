"""SAMA (`mlo.estimators.Sama`): what it approximates, its Adam preconditioner against autograd, and
agreement with Betty 0.2.1's ``sama`` through the Betty adapter, in float64."""

from __future__ import annotations

import pytest
import torch

import mlo
from mlo.estimators import Sama
from mlo.estimators.sama import precondition
from mlo.problems import ridge

pytestmark = pytest.mark.usefixtures("one_thread")
GRAPH = {"hyper": ["weights"]}


def _program(lower: type[torch.optim.Optimizer], seed: int = 0, **lower_options: float) -> list[mlo.Problem]:
    g = torch.Generator().manual_seed(seed)
    data = ridge.Ridge.random(30, 5, generator=g, dtype=torch.float64, direct=0.1)
    w0, h0 = torch.randn(5, generator=g, dtype=torch.float64), torch.randn(5, generator=g, dtype=torch.float64) - 1.0
    opt = lambda params, lr: lower(params, lr=lr, **lower_options)  # noqa: E731
    return ridge.program(data, w0, h0, lower_lr=0.05, upper_lr=0.05, lower=opt)


def test_with_sgd_it_is_the_mixed_product_with_the_identity_as_inverse_hessian(float64: None) -> None:
    """The ridge loss is quadratic in w, so the central difference is exact: SAMA with SGD is
    -(d2 L / dh dw) a, which is also neumann with no terms and alpha = 1."""
    engine = mlo.Engine(_program(torch.optim.SGD), GRAPH, Sama(radius=0.3))
    reference = mlo.Engine(_program(torch.optim.SGD), GRAPH, "neumann:iterations=0,alpha=1.0,hessian=partial")
    engine.run(2)
    reference.run(2)
    got, want = engine.hypergradient("hyper")[0], reference.hypergradient("hyper")[0]
    assert torch.allclose(got, want, rtol=1e-10, atol=1e-12)
    assert not torch.allclose(got, mlo.Engine(_program(torch.optim.SGD), GRAPH, "cg").hypergradient("hyper")[0], rtol=1e-2)


def test_adam_preconditioner_is_the_derivative_of_adams_last_update(float64: None) -> None:
    """With eps = 0, P = lr * d(m_new / sqrt(v_new)) / dg at the last step's gradient g and the
    moments before it: checked against autograd through that update."""
    problems = _program(torch.optim.Adam, eps=0.0)
    engine = mlo.Engine(problems, GRAPH, "sama")
    engine.run(3)
    lower = problems[0]
    opt, (w,) = lower.optimizer, lower.parameters()
    state, (g,) = opt.state[w], engine.levels[lower.name].last_gradient
    b1, b2 = opt.param_groups[0]["betas"]
    m_old = (state["exp_avg"] - (1 - b1) * g) / b1
    v_old = (state["exp_avg_sq"] - (1 - b2) * g * g) / b2

    def update(grad: torch.Tensor) -> torch.Tensor:
        return 0.05 * (b1 * m_old + (1 - b1) * grad) / torch.sqrt(b2 * v_old + (1 - b2) * grad * grad)

    jacobian = torch.autograd.functional.jacobian(update, g)
    assert torch.count_nonzero(jacobian - torch.diag(torch.diagonal(jacobian))) == 0
    a = torch.randn(5, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    (got,) = precondition(lower, (a,), (g,))
    assert torch.allclose(got, torch.diagonal(jacobian) * a, rtol=1e-10, atol=0)


@pytest.mark.parametrize("lower, options", [(torch.optim.SGD, {}), (torch.optim.SGD, {"momentum": 0.9}), (torch.optim.Adam, {})],
                         ids=["sgd", "sgd-momentum", "adam"])
def test_agrees_with_bettys_sama(lower: type[torch.optim.Optimizer], options: dict[str, float], float64: None) -> None:
    betty = pytest.importorskip("mlo.engines.betty")
    if not betty.betty_available():
        pytest.skip("betty-ml is not installed")
    ours = _program(lower, **options)
    theirs = _program(lower, **options)
    engine = mlo.Engine(ours, GRAPH, "sama:radius=0.5")
    program = betty.BettyProgram(theirs, GRAPH, "sama:radius=0.5")
    assert betty.betty_method("sama:radius=0.5").options == (("sama_adam_alpha", 0.5),)
    for _ in range(4):
        engine.run(1)
        program.run(1)
        for a, b in zip(ours, theirs):
            for p, q in zip(a.parameters(), b.parameters()):
                assert torch.allclose(p, q, rtol=1e-10, atol=1e-12)
    got, want = engine.hypergradient("hyper")[0], program.hypergradient("hyper")[0]
    assert float(got.norm()) > 1e-3
    assert torch.allclose(got, want, rtol=1e-10, atol=1e-12)


def test_refuses_an_optimizer_it_cannot_precondition() -> None:
    problems = _program(torch.optim.RMSprop)
    with pytest.raises(mlo.EstimatorError, match="estimator 'sama' cannot serve level 'weights': .*not RMSprop"):
        mlo.Engine(problems, GRAPH, "sama")
