"""``finite_difference`` takes the lower level's real optimizer step as its look-ahead, as DARTS's
``_compute_unrolled_model`` does: with momentum and weight decay, ``w' = w - xi (mu buf + g + wd w)``.
Checked in float64 against that formula written out here, after a real step has filled the
momentum buffer; the mixed-derivative part is DARTS's (along ``v = xi a``, no momentum)."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

import mlo
from mlo import EstimatorError
from mlo.estimators import FiniteDifference

from .helpers import RidgeProgram, finite_difference_reference, relative_error, ridge

pytestmark = pytest.mark.usefixtures("float64")


def _darts_second_order(r: RidgeProgram, lr: float, mu: float, wd: float, buf: Tensor, radius: float) -> Tensor:
    """DARTS: unrolled w' = w - lr (mu buf + grad_w L_train + wd w); dalpha = grad_h L_val(w');
    implicit = (grad_h L_train(w+) - grad_h L_train(w-)) / (2 eps), w+- = w +- eps v, v = lr grad_w' L_val,
    eps = radius / ||v||; result dalpha - implicit (lr folded into v)."""
    w = r.w().requires_grad_()
    h = r.h().requires_grad_()
    (g,) = torch.autograd.grad(r.inner_fn(w, h), w)
    ahead = (w - lr * (mu * buf + g + wd * w)).detach().requires_grad_()
    a, direct = torch.autograd.grad(r.outer_fn(ahead, h), (ahead, h))
    v = lr * a
    eps = radius / v.norm()
    (plus,) = torch.autograd.grad(r.inner_fn(w.detach() + eps * v, h), h)
    (minus,) = torch.autograd.grad(r.inner_fn(w.detach() - eps * v, h), h)
    return direct - (plus - minus) / (2 * eps)


@pytest.mark.parametrize("mu, wd", [(0.9, 3e-2), (0.0, 0.1), (0.5, 0.0)])
def test_lookahead_is_the_real_sgd_step_with_momentum_and_weight_decay(mu: float, wd: float) -> None:
    lr, radius = 0.2, 0.01
    r = ridge(quartic=0.5, lr=lr)
    (group,) = r.inner.optimizer.param_groups
    group.update(momentum=mu, weight_decay=wd)
    engine = mlo.Engine([r.inner, r.outer], {"h": ["w"]}, FiniteDifference(radius=radius))
    engine.step("w")  # a real step: the momentum buffer is now non-zero
    (p,) = r.inner.parameters()
    buf = r.inner.optimizer.state[p].get("momentum_buffer", torch.zeros_like(p)).detach().clone()
    if mu:
        assert float(buf.norm()) > 0
    want = _darts_second_order(r, lr, mu, wd, buf, radius)
    state_before = {k: v.clone() for k, v in r.inner.optimizer.state[p].items() if isinstance(v, Tensor)}
    got = engine.hypergradient("h")[0]
    assert relative_error(got, want) < 1e-10
    plain = finite_difference_reference(r.inner_fn, r.outer_fn, r.w(), r.h(), torch.full((r.d,), lr), radius)
    assert relative_error(got, plain) > 1e-4  # the plain-SGD look-ahead is a different answer
    for k, v in state_before.items():  # the optimizer's state was read, not written
        assert torch.equal(r.inner.optimizer.state[p][k], v)


def test_lookahead_before_the_first_step_has_no_momentum_term() -> None:
    # torch's SGD starts its buffer at the first gradient; DARTS reads a missing buffer as 0: same step
    lr, radius = 0.2, 0.01
    r = ridge(quartic=0.5, lr=lr)
    r.inner.optimizer.param_groups[0].update(momentum=0.9, weight_decay=0.05)
    want = _darts_second_order(r, lr, 0.9, 0.05, torch.zeros(r.d), radius)
    got = mlo.Engine([r.inner, r.outer], {"h": ["w"]}, FiniteDifference(radius=radius)).hypergradient("h")[0]
    assert relative_error(got, want) < 1e-10


def test_an_optimizer_without_an_update_rule_is_refused_when_the_engine_is_built() -> None:
    r = ridge()
    r.inner.optimizer = torch.optim.Adagrad(r.inner.parameters(), lr=0.1)
    with pytest.raises(EstimatorError, match="finite_difference.*Adagrad"):
        mlo.Engine([r.inner, r.outer], {"h": ["w"]}, FiniteDifference())
