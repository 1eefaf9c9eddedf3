"""Learning by ignoring (`mlo.problems.ignoring`): the weights' hypergradient through three levels
against autograd through Newton best responses written out from the formulation (float64), the
per-hop rule's answer on this program, the domain shift, and `mlo run ignoring` end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

import mlo
from mlo.cli import main
from mlo.estimators import CG
from mlo.problems import data, ignoring
from mlo.problems.reweighting import mlp

from .helpers import BestResponses, relative_error

pytestmark = pytest.mark.usefixtures("one_thread")

D, K, N_SOURCE, N_TARGET = 5, 3, 12, 6


def _tiny(seed: int = 0) -> tuple[ignoring.Shift, ignoring.IgnoringConfig, dict[str, torch.Tensor]]:
    """A small random task in the current dtype, its config, and its data as plain tensors."""
    g = torch.Generator().manual_seed(seed)
    tensors = {
        "xs": torch.randn(N_SOURCE, D, generator=g), "ys": torch.randint(0, K, (N_SOURCE,), generator=g),
        "xt": torch.randn(N_TARGET, D, generator=g), "yt": torch.randint(0, K, (N_TARGET,), generator=g),
        "xv": torch.randn(N_TARGET, D, generator=g), "yv": torch.randint(0, K, (N_TARGET,), generator=g),
    }
    target = data.DataSplits(TensorDataset(tensors["xt"], tensors["yt"]), TensorDataset(tensors["xv"], tensors["yv"]),
                             TensorDataset(tensors["xv"], tensors["yv"]), K, (1, 1, D), "tiny")
    clean = torch.zeros(N_SOURCE, dtype=torch.bool)
    task = ignoring.Shift(TensorDataset(tensors["xs"], tensors["ys"], torch.arange(N_SOURCE)), clean, clean, target)
    return task, ignoring.IgnoringConfig(weight_decay=0.1, lam=0.5), tensors


def _reference(config: ignoring.IgnoringConfig, t: dict[str, torch.Tensor]) -> BestResponses:
    """The three levels on flat vectors (a linear model = its weight (K, D) then its bias (K,))."""

    def logits(theta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return x @ theta[: K * D].view(K, D).T + theta[K * D :]

    def source(v: dict[str, torch.Tensor]) -> torch.Tensor:
        losses = F.cross_entropy(logits(v["source"], t["xs"]), t["ys"], reduction="none")
        return (torch.sigmoid(v["weights"]) * losses).mean() + 0.5 * config.weight_decay * (v["source"] ** 2).sum()

    def target(v: dict[str, torch.Tensor]) -> torch.Tensor:
        fit = F.cross_entropy(logits(v["target"], t["xt"]), t["yt"])
        return fit + 0.5 * config.lam * ((v["target"] - v["source"]) ** 2).sum()

    def weights(v: dict[str, torch.Tensor]) -> torch.Tensor:
        return F.cross_entropy(logits(v["target"], t["xv"]), t["yv"])

    return BestResponses({"source": source, "target": target, "weights": weights}, {"weights": ["target", "source"], "target": ["source"]})


def _flat(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _at_best_responses() -> tuple[mlo.Engine, list[mlo.Problem], torch.Tensor]:
    task, config, tensors = _tiny()
    torch.manual_seed(0)
    source_model, target_model = mlp(D, 0, K, layers=0), mlp(D, 0, K, layers=0)
    weights = ignoring.SourceWeights(N_SOURCE)
    with torch.no_grad():
        weights.logits.copy_(torch.randn(N_SOURCE))
    problems, graph = ignoring.levels(task, source_model, target_model, weights, config, seed=0)
    ref = _reference(config, tensors)
    point = ref.equilibrium("weights", {"source": _flat(source_model), "target": _flat(target_model),
                                        "weights": weights.logits.detach()})
    for model, name in ((source_model, "source"), (target_model, "target")):
        torch.nn.utils.vector_to_parameters(point[name], model.parameters())
    want = ref.hypergradient("weights", point)
    assert float(want.norm()) > 1e-3
    return mlo.Engine(problems, graph, "first_order"), problems, want


def test_the_weights_hypergradient_is_exact_with_the_total_rule_and_zero_with_the_per_hop_rule(float64: None) -> None:
    engine, problems, want = _at_best_responses()
    exact = CG(iterations=60, tol=0.0)
    got = engine.hypergradient("weights", estimator=ignoring.estimators(exact))[0]  # type: ignore[arg-type]
    assert relative_error(got, want) < 1e-8
    # the per-hop rule holds the source model fixed in the target level's mixed derivative: the
    # only path from the weights to the validation loss, a -> W* -> V*, is dropped
    partial = CG(iterations=60, tol=0.0, hessian="partial")
    got = engine.hypergradient("weights", estimator=ignoring.estimators(partial))[0]  # type: ignore[arg-type]
    assert float(got.abs().max()) == 0.0
    # first order on target -> source is exact: cg there gives the same answer
    everywhere = engine.hypergradient("weights", estimator=exact)[0]
    assert relative_error(everywhere, want) < 1e-8
    # declared in data-flow order (the target level below the source level), no level's loss
    # reads a level below it: the per-hop rule is the product of per-hop Jacobians, and exact
    flow = mlo.Engine(problems, {"weights": ["source"], "source": ["target"]}, partial)
    assert relative_error(flow.hypergradient("weights")[0], want) < 1e-8


def test_mlo_check_measures_the_per_hop_rule_at_the_programs_state(float64: None) -> None:
    engine, _, _ = _at_best_responses()
    engine.run(1)  # every level on a batch; one more round moves the point a little
    with pytest.warns(mlo.CheckWarning):
        partial = mlo.check(engine, "weights", estimator=ignoring.estimators("cg:iterations=60,tol=0,hessian=partial"))
    exact = mlo.check(engine, "weights", estimator=ignoring.estimators("cg:iterations=60,tol=0"))
    assert partial.rel_error == pytest.approx(1.0) and partial.cosine == 0.0
    assert exact.rel_error < 1e-8 and exact.reference_converged
    with pytest.raises(mlo.EstimatorError, match="does not use"):
        mlo.check(engine, "target", estimator={("weights", "target"): "cg"})


def test_the_shift_splits_the_classes_and_corrupts_only_the_source() -> None:
    config = ignoring.IgnoringConfig(noise=0.3, off_domain=0.1)
    task = ignoring.shift(config, seed=1)
    target = task.target
    for part, per_class in (("train", config.target_train), ("val", config.target_val)):
        assert data.class_counts(getattr(target, part), 10).tolist() == [per_class] * 10
    n_source = len(task.source)
    assert n_source + sum(len(getattr(target, p)) for p in ("train", "val", "test")) == 1797
    assert abs(float(task.wrong_label.float().mean()) - 0.3) < 0.05 and abs(float(task.off_domain.float().mean()) - 0.1) < 0.03
    assert not bool((task.wrong_label & task.off_domain).any())
    # the wrong labels differ from the true ones: the source images come from the digits in the
    # seeded split's order, so compare against a run without label noise
    truth = ignoring.shift(ignoring.IgnoringConfig(noise=0.0, off_domain=0.1), seed=1).source.tensors[1]
    assert torch.equal(task.source.tensors[1] != truth, task.wrong_label)
    assert torch.equal(task.source.tensors[2], torch.arange(n_source))
    assert ignoring.shift(config, seed=1).source.tensors[0].equal(task.source.tensors[0])  # seeded


def test_separation() -> None:
    w = torch.tensor([0.9, 0.8, 0.1, 0.8, 0.2])
    harmful = torch.tensor([False, False, True, True, False])
    s = ignoring.separation(w, harmful)
    assert s["weight_clean"] == pytest.approx((0.9 + 0.8 + 0.2) / 3) and s["weight_harmful"] == pytest.approx(0.45)
    # clean above harmful: (0.9, 0.1) (0.9, 0.8) (0.8, 0.1) (0.2, 0.1); tie (0.8, 0.8) counts half
    assert s["auc"] == pytest.approx(4.5 / 6)


def test_mlo_run_ignoring_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "250")
    assert main(["run", "--help"]) == 0
    assert "  ignoring " in capsys.readouterr().out
    out = tmp_path / "run"
    code = main(["run", "ignoring", "--seeds", "2", "--warmup", "2", "--rounds", "2", "--out", str(out)])
    assert code == 0
    assert "Δ test_error vs lbi [95 % CI]" in capsys.readouterr().out
    doc = json.loads((out / "results.json").read_text())
    rows = {row["method"]: row for row in doc["summary"]}
    assert list(rows) == ["lbi", "uniform", "target-only", "pooled"] and len(doc["runs"]) == 8
    assert "paired" not in rows["lbi"] and 0 <= rows["lbi"]["auc"] <= 1 and "auc" not in rows["uniform"]
    for method in ("uniform", "target-only", "pooled"):
        d = rows[method]["paired"]["test_error"]
        assert d["mean"] == pytest.approx(rows[method]["test_error"] - rows["lbi"]["test_error"])
        assert d["ci_low"] <= d["mean"] <= d["ci_high"] and d["n"] == 2
    assert main(["run", "ignoring", "--reference", "nope"]) == 2


def test_a_short_run_weighs_the_harmful_source_examples_less() -> None:
    # 5 rounds after the warm-up: on seeds 0-4 the harmful examples' mean weight was 0.46-0.47
    # against 0.54-0.55 for the clean ones (AUC 0.58-0.68); here seed 0
    metrics = ignoring.run_one(ignoring.IgnoringConfig(rounds=5), "lbi", seed=0)
    assert metrics["weight_harmful"] < metrics["weight_clean"] - 0.03 and metrics["auc"] > 0.55

