"""The configuration of `mlo run`: one typed dataclass, filled from defaults, a TOML file and flags.

Every field is checked (`RunConfig.validate`) before any data is loaded or any training starts.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlo import EstimatorError, config, estimators
from mlo.engine import SYNCS
from mlo.config import ConfigError, at_least

from ..darts.train import LR_SCHEDULES
from ..data import DATASETS
from .methods import METHODS
from .program import Optimizers

__all__ = ["RunConfig", "ConfigError", "SPACES", "DATA_DEFAULTS", "preset_options"]

SPACES = ("darts", "pc-darts", "p-darts")

#: CPU-sized defaults of data sets with size options (``None`` fields of `RunConfig` take these):
#: Fashion-MNIST at 14x14, a class-balanced 100 training images per class (50 search-train + 50
#: search-val) and 200 test images per class (2000 test images).
DATA_DEFAULTS: dict[str, dict[str, int]] = {
    "fashion-mnist": {"image_size": 14, "train_per_class": 100, "test_per_class": 200},
}


@dataclass
class RunConfig:
    """Everything `mlo run` needs. Defaults are sized for digits on a 2-core CPU (a few minutes)."""

    # a network-size preset of `mlo.problems.darts.presets.PRESETS` (applied before the other options)
    preset: str | None = None  # a network-size preset (mlo.problems.darts.presets), applied before the other options
    # what to run
    methods: list[str] = field(default_factory=lambda: ["lfm-cw"])  # comma-separated methods run on the same budget
    seeds: int = 1  # every method with seeds first_seed..first_seed+N-1; mean ± std reported
    first_seed: int = 0  # the seeds are first_seed .. first_seed + seeds - 1
    no_warmup: list[str] = field(default_factory=list)  # methods searched without the warm-ups (vanilla DARTS: ["darts-2nd"])
    # data
    dataset: str = "digits"  # digits | fashion-mnist | cifar10 | cifar100 | imagenet
    data_root: str | None = None  # folder of Fashion-MNIST, CIFAR or ImageNet (nothing is downloaded)
    imbalance: float | None = None  # long-tailed variant: largest / smallest class size (none: balanced)
    # Fashion-MNIST sizing (None: the data set's CPU default, `DATA_DEFAULTS`)
    image_size: int | None = None  # Fashion-MNIST: images pooled to this size (none: 14); ImageNet: crop side (none: 224)
    train_per_class: int | None = None  # Fashion-MNIST: training images per class (none: 100)
    test_per_class: int | None = None  # Fashion-MNIST: test images per class (none: 200)
    # search
    space: str = "darts"  # darts | pc-darts | p-darts
    search_rounds: int = 30  # search budget in rounds (every level steps once)
    batch_size: int = 64  # search batch size
    channels: int = 4  # search network: initial channels
    layers: int = 3  # search network: cells
    cell_steps: int = 4  # intermediate nodes per cell (DARTS: 4, i.e. 14 edges; 2 gives 5 edges, ~2.5x faster)
    pc_k: int = 2  # PC-DARTS channel proportion 1/K
    estimator: str | None = None  # overrides the method's estimator on every edge
    edge_estimators: dict[str, str] = field(default_factory=dict)  # {"upper->lower": "cg:iterations=5"}
    # LFM-CW constants (see mlo.problems.lfm_cw.program.Constants)
    lam: float = 1.0  # weight of the synthetic data's loss in W2's objective
    gamma: float = 1.0  # weight of W2's validation loss in the architecture's objective
    beta: float = 1.0  # sharpness of the class weights in W1's per-class mistakes
    synthetic_per_step: int = 32  # synthetic images drawn per W2 step
    mistakes: str = "ce"  # how W1's per-class mistakes are measured: ce (cross-entropy) | error (error rate)
    mistakes_grad: bool = True  # the mistakes path A -> W1* -> m -> c -> W2* (Constants.mistakes_grad; edge w1 -> w2)
    generator: str = "cvae"  # "cvae" (pretrained, cached, gated), "cgan" (trained as levels) or a checkpoint
    generator_warmup: int = 1500  # pretraining batches of the cVAE (GAN steps for "cgan") before the search
    generator_kl_weight: float | None = None  # cVAE KL weight; None: 0.5 on digits, 1.5 elsewhere
    finetune_generator: bool = False  # keep training the cVAE as the `generator` level during the search
    unsafe_pickle: bool = False  # let a generator checkpoint be a pickled module (runs the file's code)
    learn_total: bool = False  # learn the total weight of the synthetic data, not only its split
    w1_warmup: int = 50  # steps of W1 alone before the search (a few epochs), so its mistakes mean something
    w2_warmup: int = 50  # steps of W2 alone (uniform class weights) before the search, so its validation loss means something
    # optimizers
    w_lr: float = Optimizers.w_lr  # learning rate of the network weights (W1, W2)
    arch_lr: float = Optimizers.arch_lr  # learning rate of the architecture weights
    w_grad_clip: float | None = Optimizers.w_grad_clip  # w1's and w2's gradients clipped at this global norm (None: not)
    arch_grad_clip: float | None = Optimizers.arch_grad_clip  # the architecture's (default None: unclipped, as DARTS)
    phi_lr: float = Optimizers.phi_lr  # learning rate of the class-weight parameters phi
    # evaluation of the derived genotype, trained from scratch
    eval_epochs: int = 10  # epochs of training the derived genotype from scratch
    eval_seeds: int = 0  # evaluation seeds 0..n-1, shared by every method and search seed, averaged (0: the search seed)
    eval_channels: int = 8  # evaluation network: initial channels
    eval_layers: int = 3  # evaluation network: cells
    eval_batch_size: int = 64  # evaluation batch size
    eval_lr: float = 0.05  # evaluation: SGD learning rate
    eval_lr_schedule: str = "cosine"  # cosine (DARTS on CIFAR) | exponential (DARTS on ImageNet)
    eval_lr_decay: float = 0.97  # the exponential schedule's factor per epoch (DARTS on ImageNet: 0.97)
    eval_weight_decay: float = 3e-4  # DARTS: 3e-4 on CIFAR, 3e-5 on ImageNet
    eval_label_smoothing: float = 0.0  # DARTS on ImageNet: 0.1 (main and auxiliary loss)
    eval_test_every_epoch: bool = True  # False: test only after the last epoch (a large test set costs more than an epoch)
    drop_path: float = 0.0  # evaluation: drop-path probability
    auxiliary_weight: float = 0.4  # evaluation: weight of the auxiliary head's loss (0: no auxiliary head)
    cutout: int = 16  # CIFAR only, evaluation only (the search sees no Cutout)
    subset_fraction: float = 1.0  # ImageNet: share of the training set searched on (PC-DARTS: 0.125)
    val_fraction: float | None = None  # CIFAR, ImageNet: share of the searched images held out for validation (none: 0.5)
    # runtime
    device: str = "cpu"  # cpu | cuda | cuda:N
    out: str | None = None  # output folder (none: runs/<methods>-<date>-<time>)
    engine: str = "mlo"  # mlo | betty
    allow_inexact: bool = False  # engine betty: run Betty's methods that differ from mlo's estimator (its CG, its finite difference), with a warning
    workers: int = 4  # DataLoader processes on a GPU (pinned memory); 0 on a CPU
    threads: int = 1  # torch intra-op threads; 0 = torch's default. Small CPU models run
    # fastest on one: on a busy 2-core machine two threads were 3-10x slower (OpenMP barriers)
    checkpoint_every: int = 0  # write OUT/checkpoint-* every N rounds of each engine phase (0: no checkpoints)
    precision: str = "fp32"  # fp32 | bf16 | fp16 (fp16: every level with a gradient scaler)
    sync: str = "exact"  # under torchrun: exact | once (only each step's final (hyper)gradient averaged; approximate)
    tensorboard: bool = False  # also write TensorBoard scalars under OUT/tensorboard (needs tensorboard)

    @classmethod
    def from_toml(cls, path: str | Path) -> "RunConfig":
        loaded = config.from_toml(cls, path)  # the file's errors, named as every config names them
        if loaded.preset is None:
            return loaded
        return cls().updated(tomllib.loads(Path(path).read_text()), source=str(path))  # preset first

    def updated(self, values: dict[str, Any], source: str = "flags") -> "RunConfig":
        """A copy with ``values`` applied; unknown keys and wrong types are errors naming the key."""
        preset = values.get("preset")
        if preset in (None, "", "none"):
            return config.updated(self, values, source)
        # the preset's sizes first, so that every other option (file or flag) overrides them
        return config.updated(config.updated(self, preset_options(str(preset), source), source), values, source)

    def data_options(self, search: bool = False) -> dict[str, Any]:
        """Keyword arguments of `mlo.problems.data.load` for this data set; ``search=True``: for
        the search, which never sees Cutout (as DARTS's search; Cutout is for the evaluation) and
        is the only one to read ImageNet's ``subset_fraction``."""
        key = self.dataset.lower().replace("-", "")
        split = {} if self.val_fraction is None else {"val_fraction": self.val_fraction}
        if key.startswith("cifar"):
            return {"cutout": 0 if search else self.cutout, **split}
        if key == "imagenet":
            size = {} if self.image_size is None else {"size": self.image_size}
            # the subset is the search's; the evaluation trains on the whole training set (DARTS)
            return {"subset_fraction": self.subset_fraction if search else 1.0, **split, **size}
        if key == "fashionmnist":
            defaults = DATA_DEFAULTS["fashion-mnist"]
            return {
                "size": self.image_size or defaults["image_size"],
                "train_per_class": self.train_per_class or defaults["train_per_class"],
                "test_per_class": self.test_per_class or defaults["test_per_class"],
            }
        return {}

    def warms_up(self, method: str) -> bool:
        """Whether ``method``'s search starts with the warm-ups (every method not in ``no_warmup``)."""
        return method not in self.no_warmup

    def kl_weight(self) -> float:
        """The cVAE's KL weight: the option, else 0.5 on digits (8x8 images need more detail kept
        to pass the diversity gate) and 1.5 elsewhere (Fashion-MNIST needs sharper class
        identity to pass the agreement gate; chosen on train/val figures only)."""
        if self.generator_kl_weight is not None:
            return self.generator_kl_weight
        return 0.5 if self.dataset == "digits" else 1.5

    def validate(self) -> None:
        unknown = [m for m in self.methods if m not in METHODS]
        if not self.methods or unknown:
            raise ConfigError(f"unknown method(s) {unknown or self.methods}; known methods: {', '.join(METHODS)}")
        if self.dataset.lower().replace("-", "") not in {d.replace("-", "") for d in DATASETS}:
            raise ConfigError(f"unknown dataset {self.dataset!r}; known: {', '.join(DATASETS)}")
        if self.space not in SPACES:
            raise ConfigError(f"space must be one of {', '.join(SPACES)}, got {self.space!r}")
        if self.engine not in ("mlo", "betty"):
            raise ConfigError(f"engine must be 'mlo' or 'betty', got {self.engine!r}")
        if self.mistakes not in ("ce", "error"):
            raise ConfigError(f"mistakes must be 'ce' or 'error', got {self.mistakes!r}")
        if self.mistakes_grad and self.mistakes != "ce":
            raise ConfigError("mistakes_grad needs mistakes = 'ce' (an error rate has no derivative in W1); "
                              "with mistakes = 'error' set mistakes_grad = false")
        at_least(self, 1, ("seeds", "search_rounds", "batch_size", "channels", "layers", "cell_steps", "pc_k", "synthetic_per_step",
                           "eval_epochs", "eval_channels", "eval_layers", "eval_batch_size"))
        if self.precision not in ("fp32", "bf16", "fp16"):
            raise ConfigError(f"precision must be fp32, bf16 or fp16, got {self.precision!r}")
        if self.sync not in SYNCS:
            raise ConfigError(f"sync must be one of {SYNCS}, got {self.sync!r}")
        at_least(self, 0, ("lam", "gamma", "beta", "w_lr", "arch_lr", "phi_lr", "drop_path", "auxiliary_weight", "cutout", "threads", "workers",
                           "generator_warmup", "w1_warmup", "w2_warmup", "checkpoint_every", "eval_seeds", "first_seed",
                           "eval_lr", "eval_weight_decay"))
        for name in ("w_grad_clip", "arch_grad_clip"):
            if getattr(self, name) is not None and not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be > 0 (or absent: not clipped), got {getattr(self, name)}")
        stray = [m for m in self.no_warmup if m not in self.methods]
        if stray:
            raise ConfigError(f"no_warmup names {stray}, not among the methods {self.methods}")
        if self.val_fraction is not None and not 0 < self.val_fraction < 1:
            raise ConfigError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        if self.eval_lr_schedule not in LR_SCHEDULES:
            raise ConfigError(f"eval_lr_schedule must be one of {', '.join(LR_SCHEDULES)}, got {self.eval_lr_schedule!r}")
        if not 0 < self.eval_lr_decay <= 1:
            raise ConfigError(f"eval_lr_decay must be in (0, 1], got {self.eval_lr_decay}")
        if not 0 <= self.eval_label_smoothing < 1:
            raise ConfigError(f"eval_label_smoothing must be in [0, 1), got {self.eval_label_smoothing}")
        if not 0 < self.subset_fraction <= 1:
            raise ConfigError(f"subset_fraction must be in (0, 1], got {self.subset_fraction}")
        if self.imbalance is not None and self.imbalance < 1:
            raise ConfigError(f"imbalance (rho) must be >= 1, got {self.imbalance}")
        if self.space == "pc-darts" and self.channels % self.pc_k:
            raise ConfigError(f"pc_k={self.pc_k} must divide channels={self.channels} for pc-darts")
        specs = ([self.estimator] if self.estimator else []) + list(self.edge_estimators.values())
        for spec in specs:
            try:
                estimators.parse(spec)
            except EstimatorError as err:
                raise ConfigError(f"estimator {spec!r}: {err}") from None
        edges = {f"{u}->{low}" for m in self.methods for u, low in METHODS[m].variant.edges(self.mistakes_grad)}
        for edge in self.edge_estimators:
            if edge.replace(" ", "") not in edges:
                raise ConfigError(
                    f"edge_estimators: {edge!r} is not an edge of {', '.join(self.methods)}; edges: {', '.join(sorted(edges))}"
                )
        if self.engine == "betty":
            self._check_betty()
        if self.generator not in ("cgan", "cvae") and not Path(self.generator).is_file():
            raise ConfigError(f"generator must be 'cvae', 'cgan' or an existing checkpoint file, got {self.generator!r}")
        for name in ("image_size", "train_per_class", "test_per_class"):
            value = getattr(self, name)
            if value is not None and value < (1 if name == "image_size" else 2):
                raise ConfigError(f"{name} must be {'>= 1' if name == 'image_size' else '>= 2'}, got {value}")
        if self.image_size is not None and 28 % self.image_size and self.dataset.lower() != "imagenet":
            raise ConfigError(f"image_size must divide 28 (Fashion-MNIST: 28, 14, 7, 4), got {self.image_size}")
        if self.generator_kl_weight is not None and self.generator_kl_weight <= 0:
            raise ConfigError(f"generator_kl_weight must be > 0, got {self.generator_kl_weight}")
        if self.device.startswith("cuda"):
            import torch

            if not torch.cuda.is_available():
                raise ConfigError(f"device {self.device!r} requested but CUDA is not available on this machine")

    def _check_betty(self) -> None:
        """Every estimator the run would use must have a Betty method that computes the same thing."""
        from mlo.engines.betty import BettyUnsupported, betty_available, betty_method

        if not betty_available():
            raise ConfigError("engine 'betty' needs betty-ml: `make peers` (or see the Makefile) installs it")
        for method in self.methods:
            for spec in [self.estimator or METHODS[method].estimator, *self.edge_estimators.values()]:
                try:
                    betty_method(spec, self.allow_inexact)
                except BettyUnsupported as err:
                    try:
                        inexact = betty_method(spec, allow_inexact=True)
                    except BettyUnsupported:
                        raise ConfigError(
                            f"engine 'betty' cannot run method {method!r}: {err} Or choose an estimator Betty runs: "
                            f"--estimator first_order, neumann or sama, or --estimator finite_difference --set allow_inexact=true"
                        ) from None
                    raise ConfigError(
                        f"engine 'betty' cannot run method {method!r} as mlo does with {spec}: "
                        f"{inexact.mismatch}. Add --set allow_inexact=true to run Betty's method anyway (with a warning), "
                        f"or choose an estimator Betty computes as mlo does (--estimator first_order, neumann or sama)"
                    ) from None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def preset_options(name: str, source: str = "preset") -> dict[str, Any]:
    """The options a preset of `PRESETS` sets: search and evaluation network sizes and budget."""
    from ..darts.presets import PRESETS

    if name not in PRESETS:
        raise ConfigError(f"{source}: unknown preset {name!r}; presets: {', '.join(PRESETS)}")
    p = PRESETS[name]
    return {
        "channels": p.search.C, "layers": p.search.layers, "batch_size": p.search.batch_size,
        "eval_channels": p.evaluation.C, "eval_layers": p.evaluation.layers, "eval_batch_size": p.evaluation.batch_size,
        "eval_epochs": p.eval_epochs, "eval_lr": p.eval_lr,
    }

