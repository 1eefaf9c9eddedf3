"""The data sets by name: `DATASETS` and `load`."""

from __future__ import annotations

from os import PathLike
from typing import Any

from mlo.errors import DataError

from .cifar_batches import cifar
from .fashion_mnist_idx import fashion_mnist
from .image_folders import imagenet
from .long_tail import long_tailed
from .sklearn_digits import digits
from .splits import DataSplits

__all__ = ["DATASETS", "load"]

DATASETS: tuple[str, ...] = ("digits", "fashion-mnist", "cifar10", "cifar100", "imagenet")


def load(
    name: str,
    root: str | PathLike[str] | None = None,
    imbalance: float | None = None,
    seed: int = 0,
    **kw: Any,
) -> DataSplits:
    """Load a data set by name (one of `DATASETS`), optionally long-tailed with factor ``imbalance``.

    ``digits`` needs no ``root``; ``fashion-mnist`` reads ``root`` or the Debian package's folder;
    ``cifar10``, ``cifar100`` and ``imagenet`` read from ``root``. Extra keywords go to `digits`,
    `fashion_mnist`, `cifar` or `imagenet`.
    """
    key = name.lower().replace("-", "")
    if key not in {d.replace("-", "") for d in DATASETS}:
        raise DataError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    if key not in ("digits", "fashionmnist") and root is None:
        where = {
            "cifar10": "a directory containing cifar-10-batches-py/ (the CIFAR-10 python version)",
            "cifar100": "a directory containing cifar-100-python/ (the CIFAR-100 python version)",
            "imagenet": "a directory containing train/ and val/ class folders",
        }[key]
        raise DataError(f"dataset {name!r} needs a data directory: pass root=<{where}>; nothing is downloaded")
    if key == "digits":
        splits = digits(seed=seed, **kw)
    elif key == "fashionmnist":
        splits = fashion_mnist(root, seed=seed, **kw)
    elif key in ("cifar10", "cifar100"):
        assert root is not None
        splits = cifar(root, num_classes=10 if key == "cifar10" else 100, seed=seed, **kw)
    else:
        assert root is not None
        splits = imagenet(root, seed=seed, **kw)
    if imbalance is not None:
        splits = long_tailed(splits, imbalance, seed=seed)
    return splits
