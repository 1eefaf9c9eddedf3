"""scikit-learn's handwritten digits (shipped with scikit-learn, nothing to download)."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import TensorDataset

from mlo.errors import ConfigError

from .splits import DataSplits, stratified_split

__all__ = ["digits_images", "digits"]


def digits_images(size: int = 8, channels: int = 1) -> tuple[Tensor, Tensor]:
    """All of scikit-learn's handwritten digits (1797, no download), in its order: float32 images
    (N, channels, size, size) with pixels in [0, 1] (bilinear resize when ``size`` is not 8,
    the grey channel repeated when ``channels`` > 1) and int64 labels (N,)."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(bunch.target, dtype=torch.long)
    if size != 8:
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    if channels != 1:
        x = x.expand(-1, channels, -1, -1).contiguous()
    return x, y


def digits(seed: int = 0, val_fraction: float = 0.2, test_fraction: float = 0.2) -> DataSplits:
    """scikit-learn's handwritten digits (`digits_images`: 1797 images 1x8x8, 10 classes).

    Stratified, seeded train/val/test split (fractions of the whole set; train gets the rest).
    Pixels are standardised with the mean and std of the training pixels.
    """
    if not (0 < val_fraction < 1 and 0 < test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ConfigError(
            f"need 0 < val_fraction, test_fraction and val_fraction + test_fraction < 1, "
            f"got {val_fraction}, {test_fraction}"
        )
    images, labels = digits_images()
    x, y = images.numpy(), labels.numpy()
    test_idx, val_idx, train_idx = stratified_split(y, [test_fraction, val_fraction], seed)
    mean, std = float(x[train_idx].mean()), float(x[train_idx].std())
    x = (x - mean) / std

    def subset(idx: np.ndarray) -> TensorDataset:
        return TensorDataset(torch.from_numpy(x[idx].copy()), torch.from_numpy(y[idx].copy()))

    return DataSplits(subset(train_idx), subset(val_idx), subset(test_idx), 10, (1, 8, 8), "digits")
