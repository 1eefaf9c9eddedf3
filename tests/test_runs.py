"""What the small programs share (`mlo.problems.runs`): the paired t-interval, and `compare`'s
summary of methods against baselines over paired seeds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from rich.console import Console

from mlo.problems import runs
from mlo.problems.runs import paired_difference


def test_paired_difference_is_the_t_interval_of_the_differences() -> None:
    d = paired_difference([3.0, 5.0, 4.0, 8.0], [1.0, 2.0, 2.0, 3.0])  # differences 2, 3, 2, 5
    mean, std = 3.0, (2.0 / 1.0) ** 0.5  # sum of squared deviations 1 + 0 + 1 + 4 = 6, over n - 1 = 3
    half = 3.182446305284263 * std / 2.0  # t_{0.975, 3} * std / sqrt(4)
    assert d["mean"] == pytest.approx(mean) and d["std"] == pytest.approx(std)
    assert (d["ci_low"], d["ci_high"]) == (pytest.approx(mean - half), pytest.approx(mean + half))
    with pytest.raises(ValueError, match="equal"):
        paired_difference([1.0], [1.0, 2.0])


def test_compare_pairs_every_method_with_each_baseline_seed_by_seed(tmp_path: Path) -> None:
    errors = {"new": [3.0, 5.0, 4.0, 8.0], "old": [1.0, 2.0, 2.0, 3.0], "other": [2.0, 2.0, 2.0, 2.0]}

    def run_one(method: str, seed: int) -> dict[str, float]:
        extra = {"weight_auc": 0.5 + seed / 10} if method == "new" else {}  # a diagnostic of one method
        return {"test_error": errors[method][seed], **extra}

    console = Console(file=open(tmp_path / "log.txt", "w"), width=200)
    result = runs.compare("t", ["new", "old", "other"], 4, run_one, str(tmp_path / "out"), {}, console, baselines=["old", "other"])
    rows = {row["method"]: row for row in result["summary"]}
    assert rows["new"]["paired"]["old"]["test_error"] == paired_difference(errors["new"], errors["old"])
    assert rows["new"]["paired"]["other"]["test_error"]["mean"] == pytest.approx(3.0)
    assert rows["old"]["paired"]["other"]["test_error"]["mean"] == pytest.approx(0.0)
    assert "old" not in rows["old"]["paired"] and "paired" in rows["other"]  # other vs old; none against itself
    assert rows["new"]["weight_auc"] == pytest.approx(0.65) and "weight_auc" not in rows["old"]
    assert "weight_auc" not in rows["new"]["paired"]["old"]  # only metrics both methods have are paired
    table = runs.markdown(result).splitlines()
    assert table[0].startswith("| method | seeds |") and "Δ test_error vs old [95 % CI]" in table[0]
    assert table[2].split(" | ")[-2] == "+3.00 [+0.75, +5.25]"  # new vs old: mean 3, t_{0.975,3} * std / 2 = 2.25
    assert json.loads((tmp_path / "out" / "results.json").read_text())["summary"] == json.loads(json.dumps(result["summary"]))
