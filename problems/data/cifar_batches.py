"""CIFAR-10/100 from the official python batch files, with DARTS's training augmentation (Cutout)."""

from __future__ import annotations

import pickle
from collections.abc import Sequence
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset, Subset

from mlo.errors import ConfigError, DataError

from .splits import DataSplits, labels_of, stratified_split

__all__ = ["CIFAR10_MEAN", "CIFAR10_STD", "CIFAR100_MEAN", "CIFAR100_STD", "Cutout", "CifarBatches", "cifar"]

CIFAR10_MEAN = (0.49139968, 0.48215827, 0.44653124)
CIFAR10_STD = (0.24703233, 0.24348505, 0.26158768)
CIFAR100_MEAN = (0.50707516, 0.48654887, 0.44091784)
CIFAR100_STD = (0.26733429, 0.25643846, 0.27615047)


class Cutout:
    """Zero a ``length`` x ``length`` square at a uniformly random centre of a (C, H, W) tensor.

    The square is clipped at the borders (DeVries & Taylor, 2017; used by DARTS evaluation)."""

    def __init__(self, length: int) -> None:
        if length < 1:
            raise ConfigError(f"cutout length must be positive, got {length}")
        self.length = length

    def __call__(self, img: Tensor) -> Tensor:
        h, w = img.shape[-2:]
        cy = int(torch.randint(h, (1,)))
        cx = int(torch.randint(w, (1,)))
        half = self.length // 2
        y0, y1 = max(0, cy - half), min(h, cy + self.length - half)
        x0, x1 = max(0, cx - half), min(w, cx + self.length - half)
        img = img.clone()
        img[..., y0:y1, x0:x1] = 0.0
        return img

    def __repr__(self) -> str:
        return f"Cutout(length={self.length})"


@dataclass(frozen=True)
class _CifarLayout:
    folder: str
    train_files: tuple[str, ...]
    test_file: str
    meta_file: str
    meta_key: str
    label_key: str
    url: str


_CIFAR = {
    10: _CifarLayout(
        "cifar-10-batches-py",
        tuple(f"data_batch_{i}" for i in range(1, 6)),
        "test_batch",
        "batches.meta",
        "label_names",
        "labels",
        "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
    ),
    100: _CifarLayout(
        "cifar-100-python",
        ("train",),
        "test",
        "meta",
        "fine_label_names",
        "fine_labels",
        "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
    ),
}


def _cifar_help(layout: _CifarLayout, folder: Path) -> str:
    files = ", ".join(layout.train_files + (layout.test_file, layout.meta_file))
    archive = layout.url.rsplit("/", 1)[-1]
    return (
        f"expected the python version of CIFAR in {str(folder)!r} with the files {files}. "
        f"Download {archive} ('CIFAR python version') from https://www.cs.toronto.edu/~kriz/cifar.html "
        f"and extract it into {str(folder.parent)!r} (tar xzf {archive} -C {str(folder.parent)!r})"
    )


def _read_pickle(path: Path, layout: _CifarLayout, folder: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            entry = pickle.load(f, encoding="latin1")
    except Exception as e:  # any unpickling failure means the file is not a CIFAR batch
        raise DataError(f"cannot read {str(path)!r} ({type(e).__name__}: {e}); {_cifar_help(layout, folder)}") from None
    if not isinstance(entry, dict):
        raise DataError(f"{str(path)!r} is not a CIFAR python batch (a pickled dict); {_cifar_help(layout, folder)}")
    return entry


class CifarBatches(Dataset):
    """Images and labels read from CIFAR python batch files (the official pickle format).

    Items are ``(transform(PIL image), label)``. ``data`` is uint8 (N, 32, 32, 3); ``targets``
    a list of ints; ``classes`` the label names. Structure is validated and errors are `DataError`.
    (torchvision's CIFAR classes do the same reading but also require the official MD5 sums.)
    """

    def __init__(
        self, folder: Path, files: Sequence[str], layout: _CifarLayout, num_classes: int, transform: Any = None
    ) -> None:
        datas, targets = [], []
        for name in files:
            path = folder / name
            entry = _read_pickle(path, layout, folder)
            if "data" not in entry or layout.label_key not in entry:
                raise DataError(
                    f"{str(path)!r} lacks the keys 'data' and {layout.label_key!r}; {_cifar_help(layout, folder)}"
                )
            data = np.asarray(entry["data"])
            labels = np.asarray(entry[layout.label_key], dtype=np.int64).reshape(-1)
            if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
                raise DataError(
                    f"{str(path)!r}: 'data' must be uint8 of shape (N, 3072), got {data.dtype} "
                    f"{data.shape}; {_cifar_help(layout, folder)}"
                )
            if len(labels) != len(data):
                raise DataError(f"{str(path)!r}: {len(data)} images but {len(labels)} labels")
            if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
                raise DataError(
                    f"{str(path)!r}: labels must be in [0, {num_classes}), found "
                    f"{labels.min()}..{labels.max()} (is this CIFAR-{num_classes}?)"
                )
            datas.append(data)
            targets.append(labels)
        self.data = np.concatenate(datas).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # (N, H, W, C)
        self.targets: list[int] = np.concatenate(targets).tolist()
        meta = _read_pickle(folder / layout.meta_file, layout, folder)
        self.classes: list[str] = list(meta.get(layout.meta_key, []))
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        img: Any = Image.fromarray(self.data[index])
        if self.transform is not None:
            img = self.transform(img)
        return img, self.targets[index]


def cifar(
    root: str | PathLike[str],
    num_classes: int = 10,
    augment: bool = True,
    cutout: int = 16,
    val_fraction: float = 0.5,
    seed: int = 0,
) -> DataSplits:
    """CIFAR-10/100 from ``root`` (containing ``cifar-10-batches-py/`` or ``cifar-100-python/``).

    ``train``/``val``: stratified seeded split of the official training set (``val_fraction``
    of each class to val), both with the training transform; ``test``: the official test set.
    Training transform (DARTS): random crop 32 with padding 4, horizontal flip, normalisation,
    then Cutout of ``cutout`` pixels (0 disables it). ``augment=False`` keeps normalisation only.
    """
    from torchvision import transforms as T

    if num_classes not in _CIFAR:
        raise ConfigError(f"CIFAR has 10 or 100 classes, got num_classes={num_classes}")
    if not 0 < val_fraction < 1:
        raise ConfigError(f"val_fraction must be in (0, 1), got {val_fraction}")
    layout = _CIFAR[num_classes]
    root_path = Path(root).expanduser()
    folder = root_path if root_path.name == layout.folder else root_path / layout.folder
    if not folder.is_dir():
        raise DataError(f"CIFAR-{num_classes} directory {str(folder)!r} not found; {_cifar_help(layout, folder)}")
    needed = layout.train_files + (layout.test_file, layout.meta_file)
    missing = [f for f in needed if not (folder / f).is_file()]
    if missing:
        raise DataError(f"{str(folder)!r} is missing {', '.join(missing)}; {_cifar_help(layout, folder)}")

    mean, std = (CIFAR10_MEAN, CIFAR10_STD) if num_classes == 10 else (CIFAR100_MEAN, CIFAR100_STD)
    normalise = [T.ToTensor(), T.Normalize(mean, std)]
    train_tf: list[Any] = []
    if augment:
        train_tf += [T.RandomCrop(32, padding=4), T.RandomHorizontalFlip()]
    train_tf += normalise
    if augment and cutout > 0:
        train_tf.append(Cutout(cutout))
    full_train = CifarBatches(folder, layout.train_files, layout, num_classes, T.Compose(train_tf))
    test = CifarBatches(folder, (layout.test_file,), layout, num_classes, T.Compose(normalise))
    if len(full_train) < 2 or len(test) < 1:
        raise DataError(f"{str(folder)!r} holds too few images ({len(full_train)} train, {len(test)} test)")
    val_idx, train_idx = stratified_split(labels_of(full_train), [val_fraction], seed)
    return DataSplits(
        Subset(full_train, train_idx.tolist()),
        Subset(full_train, val_idx.tolist()),
        test,
        num_classes,
        (3, 32, 32),
        f"cifar{num_classes}",
    )
