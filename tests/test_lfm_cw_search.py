"""The parts of LFM-CW's search comparison: each weight copy's schedule (constant warm-up, then a
cosine over the search), the class-balanced loss, the genotype distance, the mistakes saved by
their hook, the seeds a target interval needs, and identical genotypes evaluated once."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch.utils.data import TensorDataset

from mlo.benchmarks.lfm_cw import seeds_for
from mlo.cli import main
from mlo.problems import data
from mlo.problems.darts import Genotype, SuperNet
from mlo.problems.lfm_cw.class_weights import ClassWeights
from mlo.problems.lfm_cw.experiment import genotype_distance
from mlo.problems.lfm_cw.methods import METHODS
from mlo.problems.lfm_cw.program import MistakesHook, Optimizers, batches, build, inverse_frequency, warm_then_cosine


def test_warm_up_keeps_the_rate_then_a_cosine_spans_the_search() -> None:
    factor = warm_then_cosine(warmup=5, rounds=10, floor=0.04)
    assert [factor(t) for t in range(6)] == [1.0] * 6  # the warm-up, and the search's first step
    for t in range(10):
        assert factor(5 + t) == pytest.approx(0.04 + 0.96 * (1 + math.cos(math.pi * t / 10)) / 2, abs=1e-12)
    assert factor(15) == pytest.approx(0.04) and factor(100) == pytest.approx(0.04)


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before")  # the schedule alone is stepped
def test_each_weight_copy_searches_from_the_full_rate_after_its_own_warm_up(one_thread: None) -> None:
    """W1 warmed up for 4 steps and W2 for 2: both start the search at ``w_lr`` (their look-ahead
    steps are equal), and end it at ``w_lr_min``."""
    splits = data.digits(seed=0)
    program = build(splits.train, splits.val, splits.num_classes, splits.input_shape,
                    lambda: SuperNet(C=2, num_classes=10, layers=1, in_channels=1, steps=1, multiplier=1),
                    rounds=3, batch_size=8, w1_warmup=4, w2_warmup=2)
    optim = Optimizers()
    for name, warmup in (("w1", 4), ("w2", 2)):
        sched = next(p for p in program.problems if p.name == name).scheduler
        for _ in range(warmup):
            assert sched.get_last_lr()[0] == pytest.approx(optim.w_lr)
            sched.step()
        assert sched.get_last_lr()[0] == pytest.approx(optim.w_lr)
        for _ in range(3):
            sched.step()
        assert sched.get_last_lr()[0] == pytest.approx(optim.w_lr_min)


def test_class_balanced_weights_are_inverse_frequency_averaging_one() -> None:
    labels = torch.tensor([0] * 8 + [1] * 4 + [2] * 2)
    weights = inverse_frequency(TensorDataset(torch.zeros(14, 1), labels), 3)
    counts = torch.tensor([8.0, 4.0, 2.0])
    assert torch.allclose(weights * counts, (weights * counts)[0].expand(3))  # each class weighs the same in total
    assert float((weights * counts).sum() / counts.sum()) == pytest.approx(1.0)  # the mean image weight is 1
    with pytest.raises(ValueError, match="every class"):
        inverse_frequency(TensorDataset(torch.zeros(3, 1), torch.tensor([0, 0, 2])), 3)


def test_balanced_darts_weights_its_losses_and_plain_darts_does_not(one_thread: None) -> None:
    splits = data.load("digits", imbalance=5.0)
    net = lambda: SuperNet(C=2, num_classes=10, layers=1, in_channels=1, steps=1, multiplier=1)  # noqa: E731
    for method, weighted in (("darts-2nd-balanced", True), ("darts-2nd", False)):
        program = build(splits.train, splits.val, 10, splits.input_shape, net, METHODS[method].variant, rounds=1, batch_size=8)
        levels = {p.name: p for p in program.problems}
        for name in ("w1", "architecture"):
            weight = getattr(levels[name], "class_weight")
            assert (weight is not None) == weighted, (method, name)
            if weighted:
                assert torch.allclose(weight, inverse_frequency(splits.train, 10))


def _genotype(normal: list[tuple[str, int]]) -> Genotype:
    reduce = [("max_pool_3x3", 0), ("max_pool_3x3", 1), ("skip_connect", 2), ("max_pool_3x3", 1)]
    return Genotype(normal=tuple(normal), normal_concat=(2, 3), reduce=tuple(reduce), reduce_concat=(2, 3))


def test_genotype_distance_counts_changed_edges_and_ignores_their_order() -> None:
    a = _genotype([("sep_conv_3x3", 0), ("sep_conv_3x3", 1), ("skip_connect", 0), ("dil_conv_3x3", 2)])
    swapped = _genotype([("sep_conv_3x3", 1), ("sep_conv_3x3", 0), ("dil_conv_3x3", 2), ("skip_connect", 0)])
    one_op = _genotype([("sep_conv_3x3", 0), ("max_pool_3x3", 1), ("skip_connect", 0), ("dil_conv_3x3", 2)])
    other_input = _genotype([("sep_conv_3x3", 0), ("sep_conv_3x3", 1), ("skip_connect", 1), ("dil_conv_3x3", 2)])
    assert genotype_distance(a, a) == 0 and genotype_distance(a, swapped) == 0
    assert genotype_distance(a, one_op) == 1 and genotype_distance(one_op, a) == 1
    assert genotype_distance(a, other_input) == 1
    assert genotype_distance(one_op, other_input) == 2


def test_the_mistakes_hook_saves_the_mistakes_it_measured(one_thread: None) -> None:
    """An engine without the class-weights level (W1's warm-up) must still resume the mistakes."""
    splits = data.digits(seed=0)
    net = SuperNet(C=2, num_classes=10, layers=1, in_channels=1, steps=1, multiplier=1)
    arch = net.new_architecture(torch.Generator().manual_seed(0))

    def hook() -> MistakesHook:
        return MistakesHook(net, arch, ClassWeights(10), batches(splits.val, 16, 2, torch.device("cpu")), "ce")

    first = hook()
    for _ in range(3):
        first.on_step(None, "w1", torch.zeros(()))  # type: ignore[arg-type]
    saved = first.state_dict()
    second = hook()
    second.load_state_dict(saved)
    assert torch.equal(second.weights.mistakes, first.weights.mistakes) and bool(second.weights.measured)
    first.on_step(None, "w1", torch.zeros(()))  # type: ignore[arg-type]
    second.on_step(None, "w1", torch.zeros(()))  # type: ignore[arg-type]
    assert torch.equal(second.weights.mistakes, first.weights.mistakes)  # and the next batch is the same one


@pytest.mark.parametrize("std", [0.5, 1.0, 2.7, 6.0])
def test_seeds_for_a_target_half_width_is_the_fewest_that_reach_it(std: float) -> None:
    from scipy.stats import t

    n = seeds_for(std, 1.5)
    assert n is not None

    def half(k: int) -> float:
        return float(t.ppf(0.975, k - 1)) * std / math.sqrt(k)

    assert half(n) <= 1.5 and (n == 2 or half(n - 1) > 1.5)
    assert seeds_for(float("nan")) is None


def test_identical_genotypes_are_evaluated_once_and_differ_by_exactly_zero(tmp_path: Path, one_thread: None) -> None:
    """With the architecture's learning rate at 0 every method keeps the seed's initial genotype:
    the second method reuses the first one's evaluation (fixed evaluation seeds)."""
    out = tmp_path / "run"
    assert main(["run", "lfm-cw", "--methods", "darts-1st,darts-2nd", "--rounds", "2", "--eval-epochs", "1",
                 "--set", "batch_size=16", "--set", "layers=1", "--set", "channels=2", "--set", "cell_steps=1",
                 "--set", "eval_layers=1", "--set", "eval_channels=2", "--set", "w1_warmup=2", "--set", "arch_lr=0",
                 "--set", "eval_seeds=2", "--out", str(out)]) == 0
    first, second = json.loads((out / "results.json").read_text())["runs"]
    assert (out / first["genotype"]).read_text() == (out / second["genotype"]).read_text()
    assert not first["evaluation_reused"] and second["evaluation_reused"]
    assert [e["seed"] for e in second["evaluations"]] == [0, 1]
    assert second["test_error"] - first["test_error"] == 0.0
    assert first["test_error"] == pytest.approx(sum(e["test_error"] for e in first["evaluations"]) / 2)


def test_compare_report_pairs_seeds_states_half_widths_and_hamming_distances(tmp_path: Path) -> None:
    """The comparison's tables from hand-made runs: paired differences to lfm-cw with the
    half-width of their t-interval, the seeds 1.5 points would need, and genotype distances."""
    from rich.console import Console
    from scipy.stats import t

    from mlo.benchmarks.lfm_cw import compare_report

    a = _genotype([("sep_conv_3x3", 0), ("sep_conv_3x3", 1), ("skip_connect", 0), ("dil_conv_3x3", 2)])
    b = _genotype([("sep_conv_3x3", 0), ("max_pool_3x3", 1), ("skip_connect", 0), ("dil_conv_3x3", 2)])
    errors = {"lfm-cw": [20.0, 22.0, 21.0], "darts-2nd": [21.0, 25.0, 21.0]}
    runs = []
    for method, values in errors.items():
        for seed, error in enumerate(values):
            name = f"genotype-{method}-seed{seed}.json"
            (a if method == "lfm-cw" or seed == 2 else b).save(tmp_path / name)
            runs.append({"method": method, "seed": seed, "test_error": error, "balanced_error": error, "genotype": name,
                         "arch_distance": 0.5, "genotype_changes": 1})
    out = compare_report(tmp_path, runs, ["lfm-cw", "darts-2nd"], Console(quiet=True))
    darts = out["rows"][1]["paired_test_error"]
    diffs = [1.0, 3.0, 0.0]
    std = float(torch.tensor(diffs).std())
    assert darts["mean"] == pytest.approx(4 / 3) and darts["half_width"] == pytest.approx(float(t.ppf(0.975, 2)) * std / math.sqrt(3))
    assert darts["seeds_for_1.5"] == seeds_for(std)
    assert [h["lfm-cw vs darts-2nd"] for h in out["hamming"]] == [1, 1, 0]
