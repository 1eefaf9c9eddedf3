"""What the small programs share (`mlo.problems.runs`): the paired t-interval, and `compare`'s
summary of methods against baselines over paired seeds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from rich.console import Console

from mlo.config import ConfigError
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


def test_compare_pairs_every_method_with_the_reference_seed_by_seed(tmp_path: Path) -> None:
    errors = {"new": [3.0, 5.0, 4.0, 8.0], "old": [1.0, 2.0, 2.0, 3.0], "other": [2.0, 2.0, 2.0, 2.0]}

    def run_one(method: str, seed: int) -> dict[str, float]:
        extra = {"auc": 0.5 + seed / 10} if method == "new" else {}  # a diagnostic of one method
        return {"test_error": errors[method][seed], **extra}

    console = Console(file=open(tmp_path / "log.txt", "w"), width=200)
    result = runs.compare("t", ["new", "old", "other"], 4, run_one, str(tmp_path / "out"), {}, console, reference="old")
    rows = {row["method"]: row for row in result["summary"]}
    assert rows["new"]["paired"]["test_error"] == paired_difference(errors["new"], errors["old"])
    assert rows["other"]["paired"]["test_error"]["mean"] == pytest.approx(0.0)  # differences 1, 0, 0, -1
    assert "paired" not in rows["old"]
    assert rows["new"]["auc"] == pytest.approx(0.65) and "auc" not in rows["old"]
    assert "auc" not in rows["new"]["paired"]  # only metrics both methods have are paired
    table = runs.markdown(result).splitlines()
    assert table[0].startswith("| method | seeds | seconds | test_error | auc |") and table[0].endswith("| Δ test_error vs old [95 % CI] |")
    assert table[2].split(" | ")[-1] == "+3.00 [+0.75, +5.25] |"  # mean 3, t_{0.975,3} * std / sqrt(4) = 2.25
    assert table[3].split(" | ")[4] == "—"  # old has no auc
    assert json.loads((tmp_path / "out" / "results.json").read_text())["summary"] == json.loads(json.dumps(result["summary"]))
    with pytest.raises(ConfigError, match="already holds"):  # refused before any run
        runs.compare("t", ["new"], 1, lambda m, s: pytest.fail("ran"), str(tmp_path / "out"), {}, console)
