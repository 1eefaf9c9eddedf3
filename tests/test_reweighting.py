"""Meta-Weight-Net (`mlo.problems.reweighting`): it learns to down-weight flipped labels, its data
settings are what they say, and `mlo run reweighting` runs every method end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import mlo
from mlo.cli import main
from mlo.problems import data, reweighting, runs

pytestmark = pytest.mark.usefixtures("one_thread")


def test_the_weight_net_learns_to_down_weight_flipped_labels() -> None:
    config = reweighting.ReweightingConfig(noise=0.4)
    s = reweighting.splits(config, seed=0)
    flipped = s.train.tensors[1] != data.digits(seed=0).train.tensors[1]
    torch.manual_seed(0)
    classifier, weights = reweighting.mlp(64, 64, 10), reweighting.WeightNet()
    problems, graph = reweighting.levels(classifier, weights, runs.loader(s.train, 64, 0), runs.loader(s.val, 64, 1),
                                         lr=0.1, meta_lr=1e-3, momentum=0.9)
    mlo.Engine(problems, graph, "unroll:steps=1").run(150)
    with torch.no_grad():
        x, y = s.train.tensors
        w = weights(F.cross_entropy(classifier(x), y, reduction="none").unsqueeze(1)).squeeze(1)
    assert float(w[flipped].mean()) < 0.5 * float(w[~flipped].mean())


def test_settings_corrupt_only_the_training_set() -> None:
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
                 "--out", str(out)])
    assert code == 0
    doc = json.loads((out / "results.json").read_text())
    assert [row["method"] for row in doc["summary"]] == ["mwn", "uniform", "class-balanced"]
    assert len(doc["runs"]) == 6 and doc["config"]["estimator"] == "sama"
    for row in doc["summary"]:
        assert 0 <= row["test_error"] <= 100 and row["test_error_std"] >= 0
    assert main(["run", "reweighting", "--rounds", "3", "--out", str(out)]) == 2  # never overwrites
