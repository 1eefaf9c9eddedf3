"""Per-layer learning-rate and weight-decay HPO (`mlo.problems.hpo`): the hypergradient through one
look-ahead step against autograd written out from its definition (float64), and `mlo run hpo`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import mlo
from mlo.cli import main
from mlo.problems import hpo
from mlo.problems.reweighting import mlp

pytestmark = pytest.mark.usefixtures("one_thread")


def test_rescaled_keeps_the_value_and_scales_the_gradient(float64: None) -> None:
    p, s = torch.randn(4, requires_grad=True), torch.tensor(0.3, requires_grad=True)
    out = hpo.rescaled(p, s)
    assert torch.equal(out, p)
    (g,) = torch.autograd.grad((out**2).sum(), p, create_graph=True)
    assert torch.allclose(g, 0.3 * 2 * p)
    (ds,) = torch.autograd.grad(g.sum(), s)  # the scaled gradient is differentiable in the scale
    assert torch.allclose(ds, 2 * p.sum())


def test_hypergradient_is_the_derivative_through_one_step_with_the_layer_rates(float64: None) -> None:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(20, 6, generator=g), torch.randint(0, 3, (20,), generator=g)
    xv, yv = torch.randn(15, 6, generator=g), torch.randint(0, 3, (15,), generator=g)
    torch.manual_seed(0)
    model = mlp(6, 5, 3, layers=1).double()
    rates = hpo.Rates(2, 0.2, 0.05).double()
    with torch.no_grad():
        rates.log_lr.copy_(torch.tensor([-1.0, -2.0]))
        rates.log_wd.copy_(torch.tensor([-3.0, -1.5]))
    problems, graph = hpo.levels(model, rates, [(x, y)], [(xv, yv)], meta_lr=0.1)
    got = mlo.Engine(problems, graph, "unroll:steps=1").hypergradient("rates")

    # the reference: one SGD step with per-layer rates and weight decays, written out
    log_lr, log_wd = (t.detach().clone().requires_grad_() for t in (rates.log_lr, rates.log_wd))
    (w1, b1), (w2, b2) = [(m.weight.detach(), m.bias.detach()) for m in (model[1], model[3])]
    params = [w1, b1, w2, b2]

    def forward(ps: list[torch.Tensor], inputs: torch.Tensor) -> torch.Tensor:
        return torch.relu(inputs @ ps[0].T + ps[1]) @ ps[2].T + ps[3]

    ps = [p.clone().requires_grad_() for p in params]
    grads = torch.autograd.grad(F.cross_entropy(forward(ps, x), y), ps)
    lr, wd = log_lr.exp(), log_wd.exp()
    layer = [0, 0, 1, 1]
    ahead = [p - lr[k] * (gr + (wd[k] * p if i % 2 == 0 else 0)) for i, (p, gr, k) in enumerate(zip(params, grads, layer))]
    want = torch.autograd.grad(F.cross_entropy(forward(ahead, xv), yv), (log_lr, log_wd))
    for a, b in zip(got, want):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-13)
    assert all(float(t.abs().min()) > 1e-6 for t in want)


def test_mlo_run_hpo_end_to_end(tmp_path: Path) -> None:
    code = main(["run", "hpo", "--seeds", "2", "--rounds", "4", "--lrs", "0.1", "--weight-decays", "1e-3,1e-2",
                 "--out", str(tmp_path)])
    assert code == 0
    doc = json.loads((tmp_path / "results.json").read_text())
    assert [row["method"] for row in doc["summary"]] == ["learned", "grid"] and len(doc["runs"]) == 4
    assert all(0 <= r["test_error"] <= 100 and 0 <= r["val_error"] <= 100 for r in doc["runs"])
    picked = [(r["log10_lr"], r["log10_weight_decay"]) for r in doc["runs"] if r["method"] == "grid"]
    assert all(lr == pytest.approx(-1.0) and wd in (pytest.approx(-3.0), pytest.approx(-2.0)) for lr, wd in picked)
    assert main(["run", "hpo", "--estimator", "cg"]) == 2  # learning rates need unroll


def test_a_learned_round_costs_more_than_a_plain_step() -> None:
    from mlo.benchmarks.hpo_cost import round_cost

    cost = round_cost(hpo.HPOConfig(hidden=16), blocks=3, rounds=3)
    assert cost["learned_s"] > 0 and cost["plain_s"] > 0 and cost["ratio"] > 1
