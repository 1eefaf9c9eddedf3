"""Fashion-MNIST from its four IDX files (``--data-root`` or Debian's ``dataset-fashion-mnist``)."""

from __future__ import annotations

from os import PathLike
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import TensorDataset

from mlo.errors import ConfigError, DataError

from .splits import DataSplits, stratified_split

__all__ = ["FASHION_MNIST_FILES", "FASHION_MNIST_CLASSES", "fashion_mnist"]

#: The four IDX files of (Fashion-)MNIST, each plain or gzipped (``.gz``).
FASHION_MNIST_FILES = (
    "train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte",
)
_DEBIAN_PACKAGE = "dataset-fashion-mnist"
_DEBIAN_FOLDER = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)


def _debian_fashion_mnist() -> Path | None:
    """The folder where the Debian package put the files (asks ``dpkg -L``), or ``None``."""
    import shutil
    import subprocess

    if shutil.which("dpkg") is not None:
        try:
            listing = subprocess.run(
                ["dpkg", "-L", _DEBIAN_PACKAGE], capture_output=True, text=True, timeout=10, check=False
            ).stdout
        except (OSError, subprocess.SubprocessError):
            listing = ""
        for line in listing.splitlines():
            if Path(line).name.startswith(FASHION_MNIST_FILES[0]):
                return Path(line).parent
    return _DEBIAN_FOLDER if _DEBIAN_FOLDER.is_dir() else None


def _fashion_help(folder: Path | None) -> str:
    where = f"{str(folder)!r} lacks them" if folder is not None else "no folder was given and none was installed"
    return (
        f"Fashion-MNIST needs the IDX files {', '.join(f + '[.gz]' for f in FASHION_MNIST_FILES)} ({where}). "
        f"On Debian/Ubuntu: `sudo apt-get install {_DEBIAN_PACKAGE}` (or `make data`), which puts them in "
        f"{str(_DEBIAN_FOLDER)!r}; or pass --data-root DIR with the four files from "
        "https://github.com/zalandoresearch/fashion-mnist"
    )


def _read_idx(folder: Path, name: str, images: bool) -> Tensor:
    """One IDX file through torchvision's MNIST-format reader; a ``.gz`` file is unpacked to a
    temporary file first (the reader takes plain files)."""
    import gzip
    import tempfile

    from torchvision.datasets.mnist import read_image_file, read_label_file

    reader = read_image_file if images else read_label_file
    plain, packed = folder / name, folder / (name + ".gz")
    try:
        if plain.is_file():
            return reader(str(plain))
        with tempfile.TemporaryDirectory() as tmp:
            target = Path(tmp) / name
            with gzip.open(packed, "rb") as src:
                target.write_bytes(src.read())
            return reader(str(target))
    except (AssertionError, TypeError, ValueError, OSError, EOFError) as err:
        raise DataError(f"cannot read {str(plain if plain.is_file() else packed)!r} as an IDX file: {err!r}") from None


def fashion_mnist(
    root: str | PathLike[str] | None = None,
    seed: int = 0,
    size: int = 28,
    train_per_class: int | None = None,
    test_per_class: int | None = None,
    val_fraction: float = 0.5,
) -> DataSplits:
    """Fashion-MNIST (60k train, 10k test images 1x28x28, 10 classes) from its IDX files.

    ``root``: the folder holding the files (plain or ``.gz``); by default the Debian package's.
    ``size``: images are average-pooled to ``size`` x ``size`` (a divisor of 28: 28, 14, 7, 4, 2).
    ``train_per_class``: a class-balanced seeded subset of that many training images per class
    (default: all 6000); ``test_per_class`` likewise for the test set. ``train``/``val`` are a
    stratified seeded split of the (subset of the) training set, ``val_fraction`` to val; pixels
    are standardised with the mean and std of the ``train`` pixels.
    """
    if size < 1 or 28 % size:
        raise ConfigError(f"fashion-mnist image size must divide 28 (28, 14, 7, 4, 2, 1), got {size}")
    if not 0 < val_fraction < 1:
        raise ConfigError(f"val_fraction must be in (0, 1), got {val_fraction}")
    for name, value in (("train_per_class", train_per_class), ("test_per_class", test_per_class)):
        if value is not None and value < 2:
            raise ConfigError(f"{name} must be >= 2, got {value}")
    folder = Path(root).expanduser() if root is not None else _debian_fashion_mnist()
    if folder is None or not all((folder / f).is_file() or (folder / (f + ".gz")).is_file() for f in FASHION_MNIST_FILES):
        raise DataError(_fashion_help(folder))
    x_train, y_train, x_test, y_test = (
        _read_idx(folder, name, images=i % 2 == 0) for i, name in enumerate(FASHION_MNIST_FILES)
    )
    for x, y, split in ((x_train, y_train, "train"), (x_test, y_test, "t10k")):
        if len(x) != len(y) or tuple(x.shape[1:]) != (28, 28):
            raise DataError(f"{split} IDX files of {str(folder)!r}: {tuple(x.shape)} images, {len(y)} labels; need N x 28 x 28 and N labels")
        if len(y) and (int(y.min()) < 0 or int(y.max()) > 9):
            raise DataError(f"{split} labels of {str(folder)!r} must be in [0, 10), found {int(y.min())}..{int(y.max())}")
    rng = np.random.default_rng(seed)

    def balanced(labels: Tensor, per_class: int | None) -> np.ndarray:
        ys = labels.numpy().astype(np.int64)
        if per_class is None:
            return np.arange(len(ys))
        keep = [rng.permutation(np.flatnonzero(ys == k))[:per_class] for k in range(10)]
        return np.sort(np.concatenate(keep))

    train_keep, test_keep = balanced(y_train, train_per_class), balanced(y_test, test_per_class)

    def pooled(x: Tensor, idx: np.ndarray) -> Tensor:
        images = x[torch.from_numpy(idx)].float().div_(255.0).unsqueeze(1)  # (N, 1, 28, 28)
        return torch.nn.functional.avg_pool2d(images, 28 // size) if size != 28 else images

    xs, ys = pooled(x_train, train_keep), y_train[torch.from_numpy(train_keep)].long()
    val_idx, train_idx = stratified_split(ys.numpy(), [val_fraction], seed)
    if len(train_idx) == 0 or len(val_idx) == 0:
        raise DataError(f"fashion-mnist: too few training images ({len(ys)}) to split into train and val")
    mean, std = float(xs[train_idx].mean()), float(xs[train_idx].std())

    def dataset(x: Tensor, y: Tensor) -> TensorDataset:
        return TensorDataset(((x - mean) / std).contiguous(), y.contiguous())

    t_train, t_val = torch.from_numpy(train_idx), torch.from_numpy(val_idx)
    test = dataset(pooled(x_test, test_keep), y_test[torch.from_numpy(test_keep)].long())
    return DataSplits(
        dataset(xs[t_train], ys[t_train]), dataset(xs[t_val], ys[t_val]), test, 10, (1, size, size), "fashion-mnist"
    )
