"""LFM-CW's run configuration: presets wired to `mlo run`, the shipped GPU configs, one default per
constant, no Cutout in the search, and the benchmark's paired statistics (`runs.paired_difference`)."""

from __future__ import annotations

from pathlib import Path

import pytest

from mlo.benchmarks.lfm_cw import results_of
from mlo.problems.darts.presets import PRESETS
from mlo.problems.lfm_cw.config import ConfigError, RunConfig
from mlo.problems.lfm_cw.program import Optimizers

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


@pytest.mark.parametrize("name", ["cifar10", "cifar100", "imagenet", "fashion-mnist-gpu"])
def test_shipped_configs_parse_and_take_their_preset(name: str) -> None:
    config = RunConfig.from_toml(CONFIGS / f"{name}.toml")
    preset = PRESETS[config.preset or ""]
    assert config.device == "cuda" and config.dataset == name.removesuffix("-gpu")
    if name != "fashion-mnist-gpu":  # the preset's sizes, as DARTS's protocol
        assert (config.channels, config.layers, config.batch_size) == (preset.search.C, preset.search.layers, preset.search.batch_size)
        assert (config.eval_channels, config.eval_layers, config.eval_epochs) == (
            preset.evaluation.C, preset.evaluation.layers, preset.eval_epochs
        )
    config.updated({"device": "cpu"}).validate()  # every option valid (CUDA is checked only when asked for)


def test_cifar10_config_is_the_darts_search_protocol() -> None:
    config = RunConfig.from_toml(CONFIGS / "cifar10.toml")
    assert (config.layers, config.channels) == (8, 16)
    assert config.search_rounds == 50 * 391 and config.arch_lr == 3e-4  # 50 epochs of 25k images at batch 64


def test_flags_override_a_preset_and_unknown_presets_are_refused() -> None:
    config = RunConfig().updated({"preset": "cifar10", "channels": 8})
    assert config.channels == 8 and config.layers == 8
    with pytest.raises(ConfigError, match="unknown preset 'cifar7'"):
        RunConfig().updated({"preset": "cifar7"})


def test_sync_is_an_option_of_the_run() -> None:
    assert RunConfig().sync == "exact" and RunConfig().updated({"sync": "once"}).sync == "once"
    with pytest.raises(ConfigError, match="sync must be one of .*'twice'"):
        RunConfig().updated({"sync": "twice"}).validate()


def test_one_default_per_constant_and_no_cutout_in_the_search() -> None:
    assert RunConfig().arch_lr == Optimizers().arch_lr and RunConfig().w_lr == Optimizers().w_lr
    cifar = RunConfig(dataset="cifar10", cutout=16)
    assert cifar.data_options(search=True) == {"cutout": 0} and cifar.data_options() == {"cutout": 16}
    fashion = RunConfig(dataset="fashion-mnist", image_size=7)
    assert fashion.data_options() == {"size": 7, "train_per_class": 100, "test_per_class": 200}
    with pytest.raises(ConfigError, match="image_size must divide 28"):
        RunConfig(image_size=10).validate()


def test_results_pair_the_seeds_both_methods_finished() -> None:
    def run(method: str, seed: int, err: float) -> dict:
        return {"method": method, "seed": seed, "test_error": err, "balanced_error": err + 1, "search_seconds": 1.0}

    runs = [run("lfm-cw", 0, 10.0), run("darts-2nd", 0, 12.0), run("lfm-cw", 1, 11.0), run("darts-2nd", 1, 15.0),
            run("lfm-cw", 2, 9.0)]  # interrupted: seed 2 of darts-2nd is missing
    lfm, darts = results_of("x", runs, ["lfm-cw", "darts-2nd"])
    assert lfm.extra["seeds"] == 3 and "paired_test" not in lfm.extra
    assert darts.extra["paired_test"]["n"] == 2 and darts.extra["paired_test"]["mean"] == pytest.approx(3.0)
