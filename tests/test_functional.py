"""The two primitives every estimator stands on: evaluating a loss at other parameter values
(`mlo.functional.Program`) and taking gradients (`mlo.autodiff.grad`), each against torch's own
public function as the reference."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import mlo
from mlo import autodiff
from mlo.functional import Program


def _level(name: str, module: nn.Module, fn: Any) -> mlo.Problem:
    return mlo.Problem(name, module, torch.optim.SGD(module.parameters(), lr=0.1), loss=lambda batch: fn())


class _Tied(nn.Module):
    """An encoder and a decoder that share one weight (registered under two names)."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Linear(4, 3, bias=False)
        self.dec = nn.Linear(3, 4, bias=False)
        self.dec.weight = self.enc.weight  # the same Parameter object in two modules
        self.scale = nn.Parameter(torch.tensor(1.5, dtype=torch.float64))

    def forward(self, x: Tensor) -> Tensor:
        return self.scale * (self.dec.weight.t() @ (self.enc.weight @ x.t())).t()


def _programs(float64: None) -> tuple[Program, _Tied, nn.Linear, Tensor]:
    torch.manual_seed(0)
    tied, other = _Tied().double(), nn.Linear(4, 1).double()
    x = torch.randn(5, 4, dtype=torch.float64)
    lower = _level("lower", tied, lambda: (tied(x) ** 2).sum() + other(x).sum())  # closes over `other`
    upper = _level("upper", other, lambda: (other(tied(x)) ** 2).sum())
    return Program([lower, upper]), tied, other, x


def test_swap_reaches_closures_and_tied_names_and_matches_functional_call(float64: None) -> None:
    program, tied, other, x = _programs(float64)
    values = {level: tuple(torch.randn_like(p) for p in program.params[level]) for level in ("lower", "upper")}
    before = {n: p.detach().clone() for n, p in [*tied.named_parameters(), *other.named_parameters()]}

    got = program.loss("lower", None, values)

    reference = _Call(nn.ModuleDict({"t": tied, "o": other}), lambda: (tied(x) ** 2).sum() + other(x).sum())
    named = {f"m.t.{n}": v for (n, _), v in zip(tied.named_parameters(), values["lower"])}
    named.update({f"m.o.{n}": v for (n, _), v in zip(other.named_parameters(), values["upper"])})
    want = torch.func.functional_call(reference, named, (), tie_weights=True)
    assert torch.equal(got, want)
    assert len(program.params["lower"]) == 2  # the tied weight is one parameter
    for n, p in [*tied.named_parameters(), *other.named_parameters()]:
        assert torch.equal(p, before[n]) and isinstance(p, nn.Parameter)
    assert tied.dec.weight is tied.enc.weight


class _Call(nn.Module):
    def __init__(self, m: nn.Module, fn: Any) -> None:
        super().__init__()
        self.m, self.fn = m, fn

    def forward(self) -> Tensor:
        return self.fn()


def test_swap_gradient_flows_to_substituted_values(float64: None) -> None:
    program, tied, _, x = _programs(float64)
    w = tuple(p.detach().clone().requires_grad_() for p in program.params["lower"])
    (gw, gs) = torch.autograd.grad(program.loss("lower", None, {"lower": w}), w)
    want = torch.autograd.grad(program.loss("lower", None), program.params["lower"])
    assert torch.allclose(gw, want[0]) and torch.allclose(gs, want[1])
    assert all(p.grad is None for p in tied.parameters())


def test_parameters_come_back_when_the_loss_raises(float64: None) -> None:
    module = nn.Linear(2, 1).double()
    own = tuple(module.parameters())

    def boom() -> Tensor:
        raise RuntimeError("inside the loss")

    program = Program([_level("only", module, boom)])
    with pytest.raises(RuntimeError, match="inside the loss"):
        program.loss("only", None, {"only": tuple(torch.zeros_like(p) for p in own)})
    assert tuple(module.parameters()) == own
    assert all(isinstance(p, nn.Parameter) for p in module.parameters())


def test_buffers_are_listed_once_each() -> None:
    shared = nn.BatchNorm1d(3)
    a, b = nn.Sequential(nn.Linear(3, 3), shared), nn.Sequential(nn.Linear(3, 3), shared)
    program = Program([_level("a", a, lambda: torch.zeros(())), _level("b", b, lambda: torch.zeros(()))])
    assert len(program.buffers()) == len(list(shared.buffers()))


@pytest.mark.parametrize("create_graph", [False, True])
def test_grad_direct_engine_equals_public_autograd(float64: None, monkeypatch: pytest.MonkeyPatch,
                                                   create_graph: bool) -> None:
    torch.manual_seed(1)
    w, h, unused = (torch.randn(4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    x = torch.randn(6, 4, dtype=torch.float64)

    def run() -> tuple[Tensor, ...]:
        loss = ((x @ w).tanh() ** 2).sum() + (h.exp() * w * w).sum()
        g = autodiff.grad(loss, (w, h, unused), create_graph=True)
        v = (torch.randn(4, dtype=torch.float64, generator=torch.Generator().manual_seed(2)),) * 3
        hv = autodiff.grad(g, (w, h, unused), v, create_graph=create_graph)
        return (*g, *hv)

    direct = run()
    assert autodiff._RUN_BACKWARD is not None  # this torch exposes the engine entry point
    monkeypatch.setattr(autodiff, "_RUN_BACKWARD", None)
    public = run()
    for a, b in zip(direct, public):
        assert torch.equal(a, b)
    assert torch.count_nonzero(direct[2]) == 0 and torch.count_nonzero(direct[5]) == 0
    assert all(t.requires_grad == create_graph for t in direct[3:5])


def test_grad_rejects_an_implicit_seed_for_a_non_scalar() -> None:
    w = torch.randn(3, requires_grad=True)
    with pytest.raises(RuntimeError, match="scalar outputs"):
        autodiff.grad(w * 2, (w,))


def test_grad_seed_of_the_wrong_shape_is_an_error() -> None:
    w = torch.randn(3, requires_grad=True)
    with pytest.raises(RuntimeError):
        autodiff.grad(w * 2, (w,), (torch.ones(5),))


def test_buffers_follow_a_reassigned_buffer() -> None:
    norm = nn.BatchNorm1d(2)
    program = Program([_level("only", norm, lambda: norm.weight.sum())])
    norm.running_mean = torch.full((2,), 3.0)  # a new tensor in the same place
    assert any(b is norm.running_mean for b in program.buffers())
    assert len(program.buffers()) == len(list(norm.buffers()))


def test_swap_reaches_parametrized_weights(float64: None) -> None:
    """A weight computed by a parametrization (here weight norm) is recomputed from the swapped
    values, as ``functional_call`` does."""
    torch.manual_seed(3)
    layer = torch.nn.utils.parametrizations.weight_norm(nn.Linear(3, 2).double())
    x = torch.randn(4, 3, dtype=torch.float64)
    program = Program([_level("only", layer, lambda: (layer(x) ** 2).sum())])
    values = tuple(torch.randn_like(p) for p in program.params["only"])
    got = program.loss("only", None, {"only": values})
    names = [n for n, p in layer.named_parameters() if p.requires_grad]
    want = torch.func.functional_call(layer, dict(zip(names, values)), (x,))
    assert torch.equal(got, (want**2).sum())
    assert not torch.equal(got, program.loss("only", None))


def test_grad_rejects_an_implicit_seed_for_a_complex_output() -> None:
    w = torch.randn(3, dtype=torch.complex128, requires_grad=True)
    with pytest.raises(RuntimeError, match="real scalar outputs"):
        autodiff.grad((w * w).sum(), (w,))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf"), None], ids=["nan", "inf", "-inf", "finite"])
def test_all_finite_is_exact_even_where_the_fast_norm_overflows(bad: float | None) -> None:
    """The fast path (2-norms) overflows on finite float32 values near 1e30; the answer must
    still be that of an element-wise test, for one tensor and for several of mixed dtypes."""
    big = torch.full((4, 3), 1e30)
    small = torch.arange(5, dtype=torch.float64)
    if bad is not None:
        big[2, 1] = bad
    assert not math.isfinite(float(torch._foreach_norm([big])[0]))  # the fast path alone would say no
    want = bool(torch.isfinite(big).all())
    assert autodiff.all_finite((big,)) is want
    assert autodiff.all_finite((small, big, torch.tensor(1.0))) is want
    assert autodiff.all_finite((small,)) and autodiff.all_finite(())


FINITE_CASES = {
    "finite": [torch.randn(5, 3), torch.arange(4, dtype=torch.float64), torch.tensor(2.0)],
    "nan": [torch.randn(5, 3), torch.tensor([1.0, float("nan")], dtype=torch.float64)],
    "inf": [torch.tensor(float("inf"))],
    "-inf in bf16": [torch.randn(3), torch.tensor([-float("inf"), 1.0], dtype=torch.bfloat16)],
    "overflowing sum": [torch.full((4, 3), 3e38)],  # finite elements; their sum is not
    "integers": [torch.arange(3), torch.randn(2)],
    "requires grad": [torch.randn(3, requires_grad=True) * 2],
    "empty": [torch.empty(0), torch.tensor([float("nan")])],
}


@pytest.mark.parametrize("case", list(FINITE_CASES))
def test_finite_probe_and_all_finite_agree_with_an_elementwise_test(case: str) -> None:
    """A probe that reads finite proves every element finite; ``all_finite`` is the element-wise
    answer, also where a probe overflows or a tensor is empty; neither changes a value."""
    tensors = FINITE_CASES[case]
    before = [t.detach().clone() for t in tensors]
    want = all(bool(torch.isfinite(t).all()) for t in tensors)
    probes = autodiff.read(*autodiff.finite_probe(tensors))
    assert all(map(math.isfinite, probes)) <= want  # never claims finite wrongly
    assert autodiff.all_finite(tensors) is want
    for t, b in zip(tensors, before):
        assert torch.equal(t.detach().nan_to_num(), b.nan_to_num())
