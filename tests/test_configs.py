"""Every shipped config in configs/ runs: loaded as written, shrunk to tiny sizes and two rounds,
on the CPU, on generated files in its data set's real format (CIFAR python pickles, an ImageNet
ImageFolder of JPEG and PNG files, Fashion-MNIST IDX). A config that names an unknown option, a
method that no longer exists or a combination the code refuses fails here, not on a GPU. Also
the protocol each config claims: paired seeds, vanilla DARTS without warm-up, PC-DARTS's budget
and DARTS's ImageNet evaluation, and the evaluation options those need."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from rich.console import Console
from torch.utils.data import Subset

from mlo.benchmarks import gpu_check
from mlo.problems import data
from mlo.problems.darts import DARTS_V2, train_from_scratch
from mlo.problems.lfm_cw.config import ConfigError, RunConfig
from mlo.problems.lfm_cw.experiment import build_program, run

from .helpers import write_cifar, write_fashion_mnist, write_image_folder

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
SHIPPED = sorted(p.stem for p in CONFIGS.glob("*.toml"))

#: the sizes every config is shrunk to: two rounds of a 1-cell supernet with 4 channels and 2 nodes,
#: one epoch of a 1-cell evaluation network, one seed, the warm-ups one or two steps, no loader processes
TINY: dict[str, Any] = {
    "device": "cpu", "seeds": 1, "search_rounds": 2, "w1_warmup": 1, "generator_warmup": 2,
    "batch_size": 4, "channels": 4, "layers": 1, "cell_steps": 2, "synthetic_per_step": 4,
    "eval_epochs": 1, "eval_channels": 4, "eval_layers": 1, "eval_batch_size": 8, "workers": 0, "threads": 1,
}


def _tiny_data(dataset: str, root: Path) -> dict[str, Any]:
    """Write a few images of ``dataset`` under ``root`` in its real file format; the options that
    point the config at them (and shrink its images where the format allows)."""
    if dataset in ("cifar10", "cifar100"):
        classes = int(dataset.removeprefix("cifar"))
        write_cifar(root, classes, per_class=(4, 1))
        return {"data_root": str(root)}
    if dataset == "imagenet":
        # 40 images of each of 3 classes, so that a 12.5 % subset still splits into train and val;
        # 72-pixel crops keep the ImageNet stem (above 64 pixels) at a CPU's cost
        write_image_folder(root, {"train": {f"n0{k}": 40 for k in range(3)}, "val": {f"n0{k}": 2 for k in range(3)}})
        return {"data_root": str(root), "image_size": 72}
    if dataset == "fashion-mnist":
        write_fashion_mnist(root, per_class=(6, 2))
        return {"data_root": str(root), "image_size": 7, "train_per_class": 4, "test_per_class": 2}
    raise AssertionError(f"no tiny files for {dataset!r}: add a writer for the new config's data set")


def shrunk(name: str, root: Path, out: Path) -> RunConfig:
    """The shipped config ``name`` with `TINY` sizes, on tiny generated files under ``root``."""
    config = RunConfig.from_toml(CONFIGS / f"{name}.toml")
    return config.updated({**TINY, **_tiny_data(config.dataset, root), "out": str(out)})


def test_every_shipped_config_is_covered() -> None:
    assert set(SHIPPED) == {"cifar10", "cifar100", "imagenet", "fashion-mnist-gpu"}


@pytest.mark.parametrize("name", SHIPPED)
def test_config_runs_shrunk_on_the_cpu(name: str, tmp_path: Path, one_thread: None) -> None:
    config = shrunk(name, tmp_path / "data", tmp_path / "out")
    results = run(config, Console(quiet=True))
    runs = results["runs"]
    assert [r["method"] for r in runs] == config.methods  # every method of the config, seed 0
    for r in runs:
        assert 0.0 <= r["test_error"] <= 100.0 and r["params"] > 0
        assert (tmp_path / "out" / r["genotype"]).is_file()
        assert len(r["history"]) == 1
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert saved["methods"] == config.methods and saved["no_warmup"] == config.no_warmup


# -- what each config claims ------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_configs_pair_three_seeds_against_vanilla_darts(name: str) -> None:
    config = RunConfig.from_toml(CONFIGS / f"{name}.toml")
    assert config.seeds >= 3 and {"lfm-cw", "darts-2nd"} <= set(config.methods)
    assert config.warms_up("lfm-cw") and not config.warms_up("darts-2nd")
    assert config.w1_warmup > 0 and config.search_rounds == 50 * 391  # DARTS: 50 epochs at batch 64
    assert (config.eval_lr_schedule, config.eval_weight_decay, config.eval_label_smoothing) == ("cosine", 3e-4, 0.0)


def test_vanilla_darts_skips_the_warm_up_and_its_schedule(tmp_path: Path, one_thread: None) -> None:
    config = shrunk("cifar10", tmp_path, tmp_path / "out").updated({"w1_warmup": 7})
    splits = data.load("cifar10", config.data_root, **config.data_options(search=True))
    factors = {}
    for method in ("lfm-cw", "darts-2nd"):
        scheduler = build_program(config, method, 0, splits, None, rounds=5).problems[0].scheduler
        assert scheduler is not None
        factors[method] = [scheduler.lr_lambdas[0](t) for t in range(13)]  # type: ignore[attr-defined]
    # W1's rate is constant through its warm-up and its cosine spans the search rounds alone; a
    # method without the warm-up starts its cosine at step 0
    assert factors["lfm-cw"][:8] == [1.0] * 8 and factors["lfm-cw"][8] < 1.0
    assert factors["darts-2nd"][0] == 1.0 and factors["darts-2nd"][1] < 1.0
    assert factors["darts-2nd"][5] == pytest.approx(factors["lfm-cw"][12]) and factors["darts-2nd"][5] < factors["darts-2nd"][4]


def test_no_warmup_must_name_methods_of_the_run() -> None:
    with pytest.raises(ConfigError, match="no_warmup names \\['darts-2n'\\]"):
        RunConfig(methods=["lfm-cw", "darts-2nd"], no_warmup=["darts-2n"]).validate()


def test_imagenet_config_is_pc_darts_search_and_darts_evaluation() -> None:
    config = RunConfig.from_toml(CONFIGS / "imagenet.toml")
    # PC-DARTS: 50 epochs of 10 % of ImageNet (about 128k images), the architecture frozen for 35
    steps_per_epoch = math.ceil(1_281_167 * config.subset_fraction * (1 - (config.val_fraction or 0.5)) / config.batch_size)
    assert config.w1_warmup == 35 * steps_per_epoch and config.search_rounds == 15 * steps_per_epoch
    assert config.subset_fraction * config.val_fraction == pytest.approx(0.025)  # 2.5 % of ImageNet as search-val
    # PC-DARTS's rates at batch 1024, scaled linearly to the batch searched at
    assert config.w_lr == pytest.approx(0.5 * config.batch_size / 1024)
    assert config.arch_lr == pytest.approx(6e-3 * config.batch_size / 1024)
    assert (config.space, config.pc_k) == ("pc-darts", 2)
    # DARTS's ImageNet evaluation, on the whole training set
    assert (config.eval_layers, config.eval_channels, config.eval_epochs, config.eval_batch_size) == (14, 48, 250, 128)
    assert (config.eval_lr, config.eval_lr_schedule, config.eval_lr_decay) == (0.1, "exponential", 0.97)
    assert (config.eval_weight_decay, config.eval_label_smoothing, config.auxiliary_weight) == (3e-5, 0.1, 0.4)
    assert config.data_options()["subset_fraction"] == 1.0
    assert config.data_options(search=True)["subset_fraction"] == config.subset_fraction


def test_fashion_mnist_gpu_config_is_full_size() -> None:
    config = RunConfig.from_toml(CONFIGS / "fashion-mnist-gpu.toml")
    assert config.data_options() == {"size": 28, "train_per_class": 6000, "test_per_class": 1000}
    assert config.seeds >= 3 and config.cell_steps == 4


@pytest.mark.parametrize(
    "option, value, message",
    [
        ("eval_lr_schedule", "step", "eval_lr_schedule must be one of cosine, exponential"),
        ("eval_lr_decay", 0.0, "eval_lr_decay must be in \\(0, 1\\]"),
        ("eval_label_smoothing", 1.0, "eval_label_smoothing must be in \\[0, 1\\)"),
        ("eval_weight_decay", -1e-4, "eval_weight_decay must be >= 0"),
        ("val_fraction", 1.0, "val_fraction must be in \\(0, 1\\)"),
    ],
)
def test_evaluation_options_are_checked(option: str, value: Any, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        RunConfig().updated({option: value}).validate()


# -- the evaluation options in the training loop ----------------------------------------------------------


def test_exponential_schedule_decays_the_rate_every_epoch(one_thread: None) -> None:
    full = data.digits(seed=0)
    splits = replace(full, train=Subset(full.train, range(64)), val=Subset(full.val, range(64)), test=Subset(full.test, range(64)))
    result = train_from_scratch(
        DARTS_V2, splits, epochs=3, batch_size=256, lr=0.1, C=4, layers=1, lr_schedule="exponential", lr_decay=0.5,
        weight_decay=3e-5, label_smoothing=0.1, seed=0,
    )
    assert [r.lr for r in result.history] == pytest.approx([0.1, 0.05, 0.025])
    assert all(math.isfinite(r.train_loss) for r in result.history)
    with pytest.raises(ValueError, match="lr_schedule must be one of cosine, exponential"):
        train_from_scratch(DARTS_V2, splits, epochs=1, lr_schedule="linear")


def test_label_smoothing_is_in_the_training_loss(one_thread: None) -> None:
    """With a zero learning rate nothing trains, so every run sees the same logits; the smoothed
    cross-entropy (1 - eps) CE + eps * uniform CE is then affine in eps, and differs from eps = 0."""
    splits = data.digits(seed=0)

    def first_loss(eps: float) -> float:
        result = train_from_scratch(DARTS_V2, splits, epochs=1, batch_size=512, lr=0.0, C=4, layers=1, auxiliary=False,
                                    label_smoothing=eps, weight_decay=0.0, seed=0)
        return result.history[0].train_loss

    plain, tenth, fifth = first_loss(0.0), first_loss(0.1), first_loss(0.2)
    assert abs(tenth - plain) > 1e-4
    assert fifth - plain == pytest.approx(2 * (tenth - plain), rel=1e-4)


def test_imagenet_crop_size_option(tmp_path: Path, one_thread: None) -> None:
    write_image_folder(tmp_path, {"train": {"a": 4, "b": 4}, "val": {"a": 1, "b": 1}})
    s = data.imagenet(tmp_path, size=72)
    assert s.input_shape == (3, 72, 72)
    assert s.train[0][0].shape == (3, 72, 72) and s.test[0][0].shape == (3, 72, 72)
    assert RunConfig(dataset="imagenet", image_size=72).data_options(search=True)["size"] == 72


# -- the GPU check script ----------------------------------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_gpu_check_refuses_without_cuda(capsys: pytest.CaptureFixture[str]) -> None:
    assert gpu_check.main([str(CONFIGS / "cifar10.toml")]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().out


def test_gpu_check_runs_a_shrunk_config_on_the_cpu(tmp_path: Path, one_thread: None) -> None:
    """The script's code path on the CPU, on random in-memory images of ImageNet's layout at 72
    pixels: a row per method, finite times, and the whole-run estimates from the config's budget."""
    sizes = [f"{k}={v}" for k, v in TINY.items() if k not in ("device", "seeds", "search_rounds", "w1_warmup")]
    flags = [item for s in [*sizes, "image_size=72"] for item in ("--set", s)]
    out = tmp_path / "check.json"
    code = gpu_check.main([str(CONFIGS / "imagenet.toml"), "--device", "cpu", "--synthetic", "--rounds", "1",
                           "--warmup", "0", "--json", str(out), *flags])
    assert code == 0
    checks = json.loads(out.read_text())["checks"]
    config = RunConfig.from_toml(CONFIGS / "imagenet.toml")
    assert [c["method"] for c in checks] == config.methods and {c["data"] for c in checks} == {"synthetic"}
    for c in checks:
        assert c["round_s"] > 0 and c["w1_step_s"] > 0 and c["eval_step_s"] > 0
        want = (config.w1_warmup * c["w1_step_s"] + config.search_rounds * c["round_s"]) / 3600
        assert c["search_hours"] == pytest.approx(want)  # the config's own budget, at the measured speed
