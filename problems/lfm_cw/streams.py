"""A data set's images streamed in batches through a DataLoader, never held whole in memory.

The generator's pretraining and its quality gate read every training image; at ImageNet's
224x224 a search subset as one tensor is tens of gigabytes. These helpers read it batch by batch
instead, in an order fixed by a seed (`ShuffledBatches`, `BalancedBatches`), with ``workers``
loader processes when given. The loaders draw their worker seeds from a private generator, so
streaming consumes nothing of torch's global random state.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler, Subset

from mlo.errors import ConfigError

from ..data import labels_of

__all__ = ["ShuffledBatches", "BalancedBatches", "stream", "data_range", "PixelMoments", "class_pixel_std"]


class ShuffledBatches(Sampler[list[int]]):
    """``epochs`` passes over ``size`` indices, each a fresh seeded permutation cut into batches
    of ``batch_size`` (the last one of an epoch shorter)."""

    def __init__(self, size: int, batch_size: int, epochs: int, seed: int) -> None:
        if size < 1 or batch_size < 1 or epochs < 0:
            raise ConfigError(f"ShuffledBatches: need size, batch_size >= 1 and epochs >= 0, got {size}, {batch_size}, {epochs}")
        self.size, self.batch_size, self.epochs, self.seed = size, batch_size, epochs, seed

    def __iter__(self) -> Iterator[list[int]]:
        gen = torch.Generator().manual_seed(self.seed)
        for _ in range(self.epochs):
            for idx in torch.randperm(self.size, generator=gen).split(self.batch_size):
                yield idx.tolist()

    def __len__(self) -> int:
        return self.epochs * math.ceil(self.size / self.batch_size)


class BalancedBatches(Sampler[list[int]]):
    """``steps`` batches of ``batch_size`` indices drawn with replacement, every class of
    ``labels`` equally likely (each example weighted by the inverse of its class count)."""

    def __init__(self, labels: Tensor, batch_size: int, steps: int, seed: int) -> None:
        if len(labels) < 1 or batch_size < 1 or steps < 0:
            raise ConfigError(f"BalancedBatches: need labels, batch_size >= 1 and steps >= 0, got {len(labels)}, {batch_size}, {steps}")
        counts = torch.bincount(labels).double()
        self.weights = 1.0 / counts[labels]  # (N,)
        self.batch_size, self.steps, self.seed = batch_size, steps, seed

    def __iter__(self) -> Iterator[list[int]]:
        gen = torch.Generator().manual_seed(self.seed)
        for _ in range(self.steps):
            yield torch.multinomial(self.weights, self.batch_size, replacement=True, generator=gen).tolist()

    def __len__(self) -> int:
        return self.steps


def stream(dataset: Dataset, batches: Sampler[list[int]] | int, workers: int = 0) -> DataLoader:
    """A DataLoader of ``dataset`` yielding (images, labels) batches: those of the index batches
    ``batches``, or all items in order in batches of the given size."""
    order: dict = {"batch_size": batches} if isinstance(batches, int) else {"batch_sampler": batches}
    return DataLoader(
        dataset, num_workers=workers, persistent_workers=False, generator=torch.Generator().manual_seed(0), **order
    )


def data_range(dataset: Dataset, batch_size: int = 256, workers: int = 0) -> tuple[float, float]:
    """The smallest and largest pixel value of ``dataset``'s images, read in one pass."""
    low, high = math.inf, -math.inf
    for x, _ in stream(dataset, batch_size, workers):
        low, high = min(low, float(x.min())), max(high, float(x.max()))
    return low, high


class PixelMoments:
    """Running per-pixel sums of images (float64), for the mean over pixels of each pixel's
    standard deviation (unbiased) across the images added."""

    def __init__(self) -> None:
        self.n = 0
        self.total: Tensor | None = None
        self.squares: Tensor | None = None

    def add(self, images: Tensor) -> None:
        flat = images.flatten(1).double()  # (B, P)
        total, squares = flat.sum(0), flat.pow(2).sum(0)
        self.total = total if self.total is None else self.total + total
        self.squares = squares if self.squares is None else self.squares + squares
        self.n += flat.shape[0]

    def std(self) -> float:
        """NaN for fewer than two images."""
        if self.n < 2 or self.total is None or self.squares is None:
            return math.nan
        variance = ((self.squares - self.total.pow(2) / self.n) / (self.n - 1)).clamp(min=0.0)
        return float(variance.sqrt().mean())


def class_pixel_std(dataset: Dataset, num_classes: int, batch_size: int = 256, workers: int = 0) -> list[float]:
    """`PixelMoments.std` of each class's images in ``dataset`` (NaN for a class with fewer than
    two). One pass in class order, so memory holds one batch and one class's per-pixel sums."""
    labels = labels_of(dataset)
    order = np.argsort(labels, kind="stable").tolist()
    stds = [math.nan] * num_classes
    current, moments = -1, PixelMoments()
    for x, y in stream(Subset(dataset, order), batch_size, workers):
        for k in torch.unique_consecutive(y).tolist():  # y is sorted: one segment per class
            if k != current:
                if current >= 0:
                    stds[current] = moments.std()
                current, moments = k, PixelMoments()
            moments.add(x[y == k])
    if current >= 0:
        stds[current] = moments.std()
    return stds
