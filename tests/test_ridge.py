"""mlo.problems.ridge: the one Vector module of the tests and benchmarks (one parameter per part)
and the ridge program built with one learning rate per part."""

from __future__ import annotations

import pytest
import torch

import mlo
from mlo.problems.ridge import Ridge, Vector, program


def test_vector_holds_one_parameter_per_part_and_value_is_their_concatenation() -> None:
    a, b = torch.tensor([1.0, 2.0]), torch.tensor([3.0])
    v = Vector(a, b)
    assert [name for name, _ in v.named_parameters()] == ["parts.0", "parts.1"]
    assert torch.equal(v.value, torch.tensor([1.0, 2.0, 3.0]))
    a.add_(10.0)  # the parts are copies
    assert torch.equal(v.parts[0].detach(), torch.tensor([1.0, 2.0]))
    one = Vector(torch.zeros(3))
    assert one.value is one.parts[0]  # one part: value is the parameter itself
    with pytest.raises(mlo.MLOError, match="at least one tensor"):
        Vector()


def test_program_gives_each_part_of_w_its_own_learning_rate(float64: None) -> None:
    data = Ridge.random(10, 3, generator=torch.Generator().manual_seed(1))
    w0, h0 = torch.randn(3, generator=torch.Generator().manual_seed(2)), torch.zeros(3)
    lower, upper = program(data, w0.split([1, 2]), h0, [0.1, 0.3], names=("w", "h"))
    assert [g["lr"] for g in lower.optimizer.param_groups] == [0.1, 0.3]
    w = w0.clone().requires_grad_()
    (grad,) = torch.autograd.grad(data.inner(w, h0), w)
    mlo.Engine([lower, upper], {"h": ["w"]}, "cg").step("w")
    want = w0 - torch.tensor([0.1, 0.3, 0.3]) * grad
    torch.testing.assert_close(lower.module.value.detach(), want)
    with pytest.raises(mlo.MLOError, match="2 parts of w0"):
        program(data, w0.split([1, 2]), h0, [0.1, 0.2, 0.3])
