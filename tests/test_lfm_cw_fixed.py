"""``mlo bench lfm-cw --fixed``: class weighting on a fixed network, on tiny generated Fashion-MNIST
IDX files (no installed data set needed); its summary's paired differences and class weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mlo.benchmarks import lfm_cw_fixed
from mlo.benchmarks.lfm_cw_fixed import METHODS, FixedConfig, summarise
from mlo.cli import main as mlo_main
from mlo.config import ConfigError
from mlo.problems.runs import paired_difference

from .helpers import write_fashion_mnist

pytestmark = pytest.mark.usefixtures("one_thread")


def test_quick_fixed_bench_through_the_mlo_command(tmp_path: Path) -> None:
    write_fashion_mnist(tmp_path / "fm", per_class=(40, 3), gz=True)
    path = tmp_path / "fixed.json"
    code = mlo_main(["bench", "lfm-cw", "--fixed", "--quick", "--json", str(path), "--out", str(tmp_path),
                     "--set", f"data_root={tmp_path / 'fm'}"])
    assert code == 0
    doc = json.loads(path.read_text())
    quick = {**FixedConfig().__dict__, **lfm_cw_fixed.QUICK}
    runs = doc["runs"]
    assert len(runs) == len(METHODS) * quick["seeds"] * len(quick["imbalances"])
    for r in runs:  # the full test set (3 per class here), every class scored
        assert len(r["per_class_error"]) == 10 and 0 <= r["balanced_error"] <= 100
        assert r["balanced_error"] == pytest.approx(sum(r["per_class_error"]) / 10)
    lfm = [r for r in runs if r["method"] == "lfm-cw"]
    for r in lfm:  # c = K softmax(phi + beta m), with m erm's validation mistakes of that seed
        logits = torch.tensor(r["phi"]) + quick["beta"] * torch.tensor(r["mistakes"])
        assert torch.allclose(torch.tensor(r["c"]), 10 * torch.softmax(logits, 0), atol=1e-5)
        assert any(abs(p) > 0 for p in r["phi"])  # phi was learned
    inverse = next(r for r in runs if r["method"] == "inverse-frequency")
    assert inverse["c"][0] < inverse["c"][-1] and sum(inverse["c"]) == pytest.approx(10)
    rows = {(row["imbalance"], row["method"]): row for row in doc["summary"]}
    assert "paired" in rows[(10.0, "lfm-cw")] and set(rows[(10.0, "lfm-cw")]["paired"]) == {"erm", "logit-adjustment"}
    assert set(rows[(10.0, "erm")]["paired"]) == {"logit-adjustment"}


def _record(method: str, seed: int, error: float) -> dict[str, object]:
    return {"imbalance": 10.0, "seed": seed, "method": method, "balanced_error": error, "test_error": error,
            "per_class_error": [error] * 10, "seconds": 1.0}


def test_summary_pairs_each_method_with_both_references_seed_by_seed() -> None:
    errors = {"erm": [30.0, 34.0, 31.0], "logit-adjustment": [25.0, 29.0, 27.0], "uniform": [28.0, 33.0, 29.5]}
    records = [_record(m, s, e) for m, values in errors.items() for s, e in reversed(list(enumerate(values)))]
    rows = {r["method"]: r for r in summarise(records, list(errors))}
    assert rows["uniform"]["paired"]["erm"] == paired_difference(errors["uniform"], errors["erm"])
    assert rows["uniform"]["paired"]["logit-adjustment"] == paired_difference(errors["uniform"], errors["logit-adjustment"])
    assert "erm" not in rows["erm"]["paired"]
    assert "| 10 | uniform | 3 |" in lfm_cw_fixed.markdown(list(rows.values()))


@pytest.mark.parametrize("change, message", [
    (dict(methods=["lfm-cw"]), "needs erm"), (dict(methods=["nonsense"]), "unknown method"),
    (dict(pixels="median"), "pixels"), (dict(imbalances=[0.5]), "imbalances"), (dict(estimator="nope"), "estimator"),
])
def test_config_errors_name_the_option(change: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        FixedConfig(**change).validate()  # type: ignore[arg-type]
