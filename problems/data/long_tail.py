"""Long-tailed (imbalanced) variants of a data set's train and val splits."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
from torch.utils.data import Subset

from mlo.errors import ConfigError

from .splits import DataSplits, labels_of

__all__ = ["long_tailed"]


def _long_tailed_indices(labels: np.ndarray, num_classes: int, rho: float, rng: np.random.Generator) -> np.ndarray:
    counts = np.bincount(labels, minlength=num_classes)
    available = counts[counts > 0]
    if len(available) == 0:
        return np.arange(0)
    n_max = int(available.min())  # every class can supply the head count
    keep: list[np.ndarray] = []
    for k in range(num_classes):
        if counts[k] == 0:
            continue
        exponent = k / (num_classes - 1) if num_classes > 1 else 0.0
        n_k = max(1, int(math.floor(n_max * rho ** (-exponent))))
        idx = np.flatnonzero(labels == k)
        keep.append(rng.choice(idx, size=n_k, replace=False))
    return np.sort(np.concatenate(keep))


def long_tailed(splits: DataSplits, rho: float, seed: int = 0) -> DataSplits:
    """An imbalanced variant: class k keeps ``floor(n_max * rho ** (-k / (K - 1)))`` examples.

    Applied to train and to val (same profile, each with its own ``n_max``: the smallest class
    count of that split, so every class can supply it); ``test`` stays balanced. ``rho`` is the
    imbalance factor (largest class / smallest class), at least 1; ``rho=1`` keeps ``n_max`` of
    every class. The kept examples are a seeded random choice within each class.
    """
    if not (isinstance(rho, (int, float)) and math.isfinite(rho) and rho >= 1):
        raise ConfigError(f"imbalance factor rho must be a finite number >= 1, got {rho!r}")
    rng = np.random.default_rng(seed)
    K = splits.num_classes
    train_idx = _long_tailed_indices(labels_of(splits.train), K, float(rho), rng)
    val_idx = _long_tailed_indices(labels_of(splits.val), K, float(rho), rng)
    return replace(
        splits,
        train=Subset(splits.train, train_idx.tolist()),
        val=Subset(splits.val, val_idx.tolist()),
        name=f"{splits.name}-lt{rho:g}",
    )
