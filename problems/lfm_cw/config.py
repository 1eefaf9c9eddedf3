"""The configuration of `mlo run`: one typed dataclass, filled from defaults, a TOML file and flags.

Every field is checked (`RunConfig.validate`) before any data is loaded or any training starts.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlo import EstimatorError, config, estimators
from mlo.config import ConfigError

from ..data import DATASETS
from .methods import METHODS

__all__ = ["RunConfig", "ConfigError", "SPACES"]

SPACES = ("darts", "pc-darts", "p-darts")


@dataclass
class RunConfig:
    """Everything `mlo run` needs. Defaults are sized for digits on a 2-core CPU (a few minutes)."""

    # what to run
    methods: list[str] = field(default_factory=lambda: ["lfm-cw"])
    seeds: int = 1
    # data
    dataset: str = "digits"
    data_root: str | None = None
    imbalance: float | None = None
    # search
    space: str = "darts"  # darts | pc-darts | p-darts
    search_rounds: int = 30
    batch_size: int = 64
    channels: int = 4
    layers: int = 3
    pc_k: int = 2  # PC-DARTS channel proportion 1/K
    estimator: str | None = None  # overrides the method's estimator on every edge
    edge_estimators: dict[str, str] = field(default_factory=dict)  # {"upper->lower": "cg:iterations=5"}
    # LFM-CW constants (see mlo.problems.lfm_cw.program.Constants)
    lam: float = 1.0
    gamma: float = 1.0
    beta: float = 1.0
    synthetic_per_step: int = 32
    mistakes: str = "ce"
    generator: str = "cgan"  # "cgan" or a checkpoint path
    generator_warmup: int = 300  # GAN steps before the search, so synthetic images look like data
    # optimizers
    w_lr: float = 0.025
    arch_lr: float = 3e-3
    phi_lr: float = 1e-2
    # evaluation of the derived genotype, trained from scratch
    eval_epochs: int = 10
    eval_channels: int = 8
    eval_layers: int = 3
    eval_batch_size: int = 64
    eval_lr: float = 0.05
    drop_path: float = 0.0
    auxiliary_weight: float = 0.4
    cutout: int = 16  # CIFAR/ImageNet only
    # runtime
    device: str = "cpu"
    out: str | None = None
    engine: str = "mlo"  # mlo | betty
    threads: int = 1  # torch intra-op threads; 0 = torch's default. Small CPU models run
    # fastest on one: on a busy 2-core machine two threads were 3-10x slower (OpenMP barriers)

    @classmethod
    def from_toml(cls, path: str | Path) -> "RunConfig":
        return config.from_toml(cls, path)

    def updated(self, values: dict[str, Any], source: str = "flags") -> "RunConfig":
        """A copy with ``values`` applied; unknown keys and wrong types are errors naming the key."""
        return config.updated(self, values, source)

    def validate(self) -> None:
        unknown = [m for m in self.methods if m not in METHODS]
        if not self.methods or unknown:
            raise ConfigError(f"unknown method(s) {unknown or self.methods}; known methods: {', '.join(METHODS)}")
        if self.dataset.lower().replace("-", "") not in DATASETS:
            raise ConfigError(f"unknown dataset {self.dataset!r}; known: {', '.join(DATASETS)}")
        if self.space not in SPACES:
            raise ConfigError(f"space must be one of {', '.join(SPACES)}, got {self.space!r}")
        if self.engine not in ("mlo", "betty"):
            raise ConfigError(f"engine must be 'mlo' or 'betty', got {self.engine!r}")
        if self.mistakes not in ("ce", "error"):
            raise ConfigError(f"mistakes must be 'ce' or 'error', got {self.mistakes!r}")
        for name in ("seeds", "search_rounds", "batch_size", "channels", "layers", "pc_k", "synthetic_per_step",
                     "eval_epochs", "eval_channels", "eval_layers", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("lam", "gamma", "beta", "w_lr", "arch_lr", "phi_lr", "drop_path", "auxiliary_weight", "cutout", "threads",
                     "generator_warmup"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
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
        edges = {f"{u}->{low}" for m in self.methods for u, low in METHODS[m].variant.edges()}
        for edge in self.edge_estimators:
            if edge.replace(" ", "") not in edges:
                raise ConfigError(
                    f"edge_estimators: {edge!r} is not an edge of {', '.join(self.methods)}; edges: {', '.join(sorted(edges))}"
                )
        if self.engine == "betty":
            self._check_betty()
        if self.generator != "cgan" and not Path(self.generator).is_file():
            raise ConfigError(f"generator must be 'cgan' or an existing checkpoint file, got {self.generator!r}")
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
                    betty_method(spec)
                except BettyUnsupported as err:
                    raise ConfigError(f"engine 'betty' cannot run method {method!r}: {err}") from None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
