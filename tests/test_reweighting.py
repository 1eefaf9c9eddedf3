"""Meta-Weight-Net (`mlo.problems.reweighting`): the batch-normalised weighted loss in closed form,
it learns to down-weight flipped labels (its weight log says so), its data settings are what they
say, and `mlo run reweighting` runs every method end to end on digits and on Fashion-MNIST (tiny
IDX files in the real format), with paired differences to the baselines."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import mlo
from mlo.cli import main
from mlo.problems import data, reweighting, runs

from .helpers import write_fashion_mnist

pytestmark = pytest.mark.usefixtures("one_thread")


class Affine(nn.Module):
    """A stand-in weight net: ``a * loss + b``."""

    def __init__(self, a: float, b: float) -> None:
        super().__init__()
        self.a, self.b = a, b

    def forward(self, losses: Tensor) -> Tensor:
        return self.a * losses + self.b


def test_weighted_loss_normalises_the_weights_within_the_batch(float64: None) -> None:
    torch.manual_seed(0)
    classifier, x, y = reweighting.mlp(5, 4, 3), torch.randn(7, 5), torch.randint(0, 3, (7,))
    losses = F.cross_entropy(classifier(x), y, reduction="none")
    w = 2.0 * losses + 0.5
    assert torch.allclose(reweighting.weighted_loss(classifier, Affine(2.0, 0.5), x, y), (w * losses).sum() / w.sum())
    assert torch.allclose(reweighting.weighted_loss(classifier, Affine(2.0, 0.5), x, y, normalize=False), (w * losses).mean())
    # normalised, a weight net that weighs every example alike is uniform weighting, whatever its level
    for level in (0.01, 1.0):
        assert torch.allclose(reweighting.weighted_loss(classifier, Affine(0.0, level), x, y), losses.mean())


def test_the_weight_net_learns_to_down_weight_flipped_labels() -> None:
    config = reweighting.ReweightingConfig(noise=0.4)
    clean = reweighting.clean_splits(config, seed=0)
    s = reweighting.corrupt(config, clean, seed=0)
    flipped = s.train.tensors[1] != clean.train.tensors[1]
    torch.manual_seed(0)
    classifier, weights = reweighting.mlp(64, 64, 10), reweighting.WeightNet()
    problems, graph = reweighting.levels(classifier, weights, runs.loader(s.train, 64, 0), runs.loader(s.val, 64, 1),
                                         lr=0.1, meta_lr=1e-3, momentum=0.9)
    log = reweighting.WeightLog(classifier, weights, s.train, 10, flipped, every=50)
    mlo.Engine(problems, graph, "unroll:steps=1", hooks=[log]).run(150)
    with torch.no_grad():
        x, y = s.train.tensors
        w = weights(F.cross_entropy(classifier(x), y, reduction="none").unsqueeze(1)).squeeze(1)
    assert float(w[flipped].mean()) < 0.5 * float(w[~flipped].mean())
    assert [r["round"] for r in log.records] == [50, 100, 150]
    last = log.records[-1]
    assert last["weight_clean"] == pytest.approx(float(w[~flipped].mean()), rel=1e-5)
    assert last["weight_harmful"] == pytest.approx(float(w[flipped].mean()), rel=1e-5)
    assert last["auc"] > 0.9 and last["loss_harmful"] > last["loss_clean"]  # the AUC: tests/test_ignoring.py
    assert last["weight_min"] == pytest.approx(float(w.min()), rel=1e-5) and len(last["class_weights"]) == 10


def test_settings_corrupt_only_the_training_set() -> None:
    assert reweighting.splits(reweighting.ReweightingConfig(), seed=1).train.tensors[1].tolist() == \
        reweighting.splits(reweighting.ReweightingConfig(), seed=1).train.tensors[1].tolist()  # one draw per seed
    clean = data.digits(seed=1)
    noisy = reweighting.splits(reweighting.ReweightingConfig(noise=0.3), seed=1)
    changed = noisy.train.tensors[1] != clean.train.tensors[1]
    assert abs(float(changed.float().mean()) - 0.3) < 0.05  # every drawn label moved to another class
    for part in ("val", "test"):
        assert all(torch.equal(a, b) for a, b in zip(getattr(noisy, part).tensors, getattr(clean, part).tensors))
    tail = reweighting.splits(reweighting.ReweightingConfig(setting="long-tailed", imbalance=10), seed=1)
    counts = data.class_counts(tail.train, 10)
    assert counts[0] >= 9 * counts[-1]
    assert all(torch.equal(a, b) for a, b in zip(tail.val.tensors, clean.val.tensors))  # balanced and clean


@pytest.mark.parametrize("setting", ["noisy", "long-tailed"])
def test_mlo_run_reweighting_end_to_end(setting: str, tmp_path: Path) -> None:
    out = tmp_path / setting
    code = main(["run", "reweighting", "--setting", setting, "--seeds", "2", "--rounds", "3", "--estimator", "sama",
                 "--log-every", "2", "--out", str(out)])
    assert code == 0
    doc = json.loads((out / "results.json").read_text())
    assert [row["method"] for row in doc["summary"]] == ["mwn", "uniform", "class-balanced"]
    assert len(doc["runs"]) == 6 and doc["config"]["estimator"] == "sama"
    for row in doc["summary"]:
        assert 0 <= row["test_error"] <= 100 and row["test_error_std"] >= 0
    rows = {row["method"]: row for row in doc["summary"]}
    assert "paired" not in rows["mwn"]  # the reference: every other method is paired with it
    by = {(r["method"], r["seed"]): r["test_error"] for r in doc["runs"]}
    for method in ("uniform", "class-balanced"):
        assert rows[method]["paired"]["test_error"]["mean"] == pytest.approx(sum(by[method, k] - by["mwn", k] for k in (0, 1)) / 2)
    diagnostics = ("weight_clean", "weight_harmful", "auc") if setting == "noisy" else ("weight_tail", "weight_head")
    assert all(k in rows["mwn"] for k in diagnostics) and not any(k in rows["uniform"] for k in diagnostics)
    log = json.loads((out / "log-mwn-seed1.json").read_text())
    assert [r["round"] for r in log] == [2, 3]
    if setting == "noisy":  # the oracle trains on the uncorrupted examples alone
        assert main(["run", "reweighting", "--seeds", "1", "--rounds", "2", "--methods", "oracle,mwn", "--reference", "oracle"]) == 0
    assert main(["run", "reweighting", "--rounds", "3", "--out", str(out)]) == 2  # never overwrites


@pytest.mark.parametrize("setting", ["noisy", "long-tailed"])
def test_mlo_run_reweighting_on_fashion_mnist(setting: str, tmp_path: Path) -> None:
    write_fashion_mnist(tmp_path / "fm", per_class=(20, 5))
    code = main(["run", "reweighting", "--dataset", "fashion-mnist", "--data-root", str(tmp_path / "fm"), "--setting", setting,
                 "--train-per-class", "20", "--test-per-class", "5", "--image-size", "7", "--batch-size", "16",
                 "--seeds", "2", "--rounds", "3", "--out", str(tmp_path / "out")])
    assert code == 0
    doc = json.loads((tmp_path / "out" / "results.json").read_text())
    assert len(doc["runs"]) == 6 and doc["config"]["dataset"] == "fashion-mnist"
    s = reweighting.splits(reweighting.ReweightingConfig(dataset="fashion-mnist", data_root=str(tmp_path / "fm"), setting=setting,
                                                         train_per_class=20, test_per_class=5, image_size=7), seed=0)
    assert s.input_shape == (1, 7, 7) and len(s.test) == 50
    assert np.array_equal(data.class_counts(s.val, 10), np.full(10, 4))  # 20 % of 20 per class: the clean meta set
    counts = data.class_counts(s.train, 10)
    if setting == "long-tailed":
        assert counts[0] == 16 and counts[-1] == 1  # 16 / 20 = 0.8 floors to 0, kept at 1
    else:
        assert len(s.train) == 160  # 16 per class, 40 % of their labels moved to another class


def test_missing_fashion_mnist_is_reported_before_training(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["run", "reweighting", "--dataset", "fashion-mnist", "--data-root", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")])
    assert code == 2
    err = capsys.readouterr().err
    assert "apt-get install dataset-fashion-mnist" in err and "--data-root" in err
    assert not (tmp_path / "o").exists()
    assert main(["run", "reweighting", "--dataset", "mnist"]) == 2
    assert main(["run", "reweighting", "--methods", "uniform", "--reference", "mwn"]) == 2
    assert main(["run", "reweighting", "--setting", "long-tailed", "--methods", "mwn,oracle"]) == 2  # no corruption to remove
