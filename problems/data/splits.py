"""What every reader returns (`DataSplits`), labels read without the images, and the seeded,
stratified split the readers share."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from torch.utils.data import ConcatDataset, Dataset, Subset, TensorDataset

from mlo.errors import ArgumentError

__all__ = ["DataSplits", "labels_of", "class_counts", "stratified_split"]


@dataclass(frozen=True)
class DataSplits:
    """Train, validation and test sets of one image classification task.

    Every item is ``(image tensor of shape input_shape, int label in [0, num_classes))``.
    """

    train: Dataset
    val: Dataset
    test: Dataset
    num_classes: int
    input_shape: tuple[int, int, int]  # (C, H, W)
    name: str

    def __repr__(self) -> str:
        sizes = ", ".join(f"{k}={len(getattr(self, k))}" for k in ("train", "val", "test"))  # type: ignore[arg-type]
        return f"DataSplits({self.name!r}, {sizes}, classes={self.num_classes}, shape={self.input_shape})"


def labels_of(dataset: Dataset) -> np.ndarray:
    """The int64 labels of a dataset, without loading images.

    Knows TensorDataset (labels in the last tensor), Subset, ConcatDataset, and datasets with a
    ``targets`` attribute (CifarBatches, torchvision's ImageFolder and CIFAR)."""
    if isinstance(dataset, Subset):
        return labels_of(dataset.dataset)[np.asarray(dataset.indices, dtype=np.int64)]
    if isinstance(dataset, ConcatDataset):
        return np.concatenate([labels_of(d) for d in dataset.datasets])
    if isinstance(dataset, TensorDataset):
        return dataset.tensors[-1].cpu().numpy().astype(np.int64)
    targets = getattr(dataset, "targets", None)
    if targets is not None:
        return np.asarray(targets, dtype=np.int64)
    raise ArgumentError(f"cannot read labels of {type(dataset).__name__} without loading it")


def class_counts(dataset: Dataset, num_classes: int) -> np.ndarray:
    """Number of examples of each class, shape (num_classes,)."""
    return np.bincount(labels_of(dataset), minlength=num_classes)


def stratified_split(
    labels: np.ndarray, fractions: Sequence[float], seed: int
) -> list[np.ndarray]:
    """Split indices into len(fractions)+1 parts; part k gets fractions[k] of every class."""
    rng = np.random.default_rng(seed)
    parts: list[list[np.ndarray]] = [[] for _ in range(len(fractions) + 1)]
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n = len(idx)
        start = 0
        for k, f in enumerate(fractions):
            take = int(round(f * n))
            parts[k].append(idx[start : start + take])
            start += take
        parts[-1].append(idx[start:])
    return [np.sort(np.concatenate(p)) for p in parts]
