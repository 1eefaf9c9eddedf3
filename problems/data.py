"""Data sets as train/val/test splits (`DataSplits`): digits, CIFAR-10/100, ImageNet, long-tailed.

Nothing here downloads. The digits set ships with scikit-learn; Fashion-MNIST is read from its
four IDX files (``--data-root`` or where Debian's ``dataset-fashion-mnist`` put them); CIFAR and
ImageNet are read from a directory the user provides, and a missing or malformed directory raises `DataError` saying
what was expected there and how to obtain it.

Search protocol (DARTS): ``train`` and ``val`` are two disjoint, stratified, seeded halves of the
official training set (both with training augmentation, as DARTS), ``test`` is the official
test set. An evaluation run retrains on ``train`` + ``val`` and reports error on ``test``.
"""

from __future__ import annotations

import math
import pickle
from collections.abc import Sequence
from dataclasses import dataclass, replace
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import ConcatDataset, Dataset, Subset, TensorDataset

from mlo.errors import DataError

__all__ = [
    "DataError",
    "DataSplits",
    "DATASETS",
    "digits",
    "digits_images",
    "fashion_mnist",
    "FASHION_MNIST_FILES",
    "cifar",
    "imagenet",
    "long_tailed",
    "load",
    "labels_of",
    "class_counts",
    "error",
    "balanced_error",
    "Cutout",
    "CifarBatches",
]

DATASETS: tuple[str, ...] = ("digits", "fashion-mnist", "cifar10", "cifar100", "imagenet")

CIFAR10_MEAN = (0.49139968, 0.48215827, 0.44653124)
CIFAR10_STD = (0.24703233, 0.24348505, 0.26158768)
CIFAR100_MEAN = (0.50707516, 0.48654887, 0.44091784)
CIFAR100_STD = (0.26733429, 0.25643846, 0.27615047)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


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


# -- labels and metrics ---------------------------------------------------------------------


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
    raise TypeError(f"cannot read labels of {type(dataset).__name__} without loading it")


def class_counts(dataset: Dataset, num_classes: int) -> np.ndarray:
    """Number of examples of each class, shape (num_classes,)."""
    return np.bincount(labels_of(dataset), minlength=num_classes)


def error(preds: Tensor, labels: Tensor) -> float:
    """Top-1 error in percent."""
    if preds.numel() == 0:
        raise ValueError("error() of an empty prediction set")
    return 100.0 * float((preds.view(-1) != labels.view(-1)).float().mean())


def balanced_error(preds: Tensor, labels: Tensor, num_classes: int) -> float:
    """Mean over classes of the per-class error, in percent (classes absent from labels are skipped)."""
    preds, labels = preds.view(-1).cpu(), labels.view(-1).cpu()
    if labels.numel() == 0:
        raise ValueError("balanced_error() of an empty prediction set")
    wrong = (preds != labels).double()
    total = torch.bincount(labels, minlength=num_classes).double()
    wrong_per_class = torch.zeros(num_classes, dtype=torch.float64).index_add_(0, labels, wrong)
    present = total > 0
    return 100.0 * float((wrong_per_class[present] / total[present]).mean())


def _stratified_split(
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


# -- digits ---------------------------------------------------------------------------------


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
        raise ValueError(
            f"need 0 < val_fraction, test_fraction and val_fraction + test_fraction < 1, "
            f"got {val_fraction}, {test_fraction}"
        )
    images, labels = digits_images()
    x, y = images.numpy(), labels.numpy()
    test_idx, val_idx, train_idx = _stratified_split(y, [test_fraction, val_fraction], seed)
    mean, std = float(x[train_idx].mean()), float(x[train_idx].std())
    x = (x - mean) / std

    def subset(idx: np.ndarray) -> TensorDataset:
        return TensorDataset(torch.from_numpy(x[idx].copy()), torch.from_numpy(y[idx].copy()))

    return DataSplits(subset(train_idx), subset(val_idx), subset(test_idx), 10, (1, 8, 8), "digits")


# -- Fashion-MNIST ----------------------------------------------------------------------------

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
        raise ValueError(f"fashion-mnist image size must divide 28 (28, 14, 7, 4, 2, 1), got {size}")
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    for name, value in (("train_per_class", train_per_class), ("test_per_class", test_per_class)):
        if value is not None and value < 2:
            raise ValueError(f"{name} must be >= 2, got {value}")
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
    val_idx, train_idx = _stratified_split(ys.numpy(), [val_fraction], seed)
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


# -- CIFAR ----------------------------------------------------------------------------------


class Cutout:
    """Zero a ``length`` x ``length`` square at a uniformly random centre of a (C, H, W) tensor.

    The square is clipped at the borders (DeVries & Taylor, 2017; used by DARTS evaluation)."""

    def __init__(self, length: int) -> None:
        if length < 1:
            raise ValueError(f"cutout length must be positive, got {length}")
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
        raise ValueError(f"CIFAR has 10 or 100 classes, got num_classes={num_classes}")
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
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
    val_idx, train_idx = _stratified_split(labels_of(full_train), [val_fraction], seed)
    return DataSplits(
        Subset(full_train, train_idx.tolist()),
        Subset(full_train, val_idx.tolist()),
        test,
        num_classes,
        (3, 32, 32),
        f"cifar{num_classes}",
    )


# -- ImageNet -------------------------------------------------------------------------------


def _imagenet_help(root: Path) -> str:
    return (
        f"expected {str(root / 'train')!r} and {str(root / 'val')!r}, each with one sub-folder per "
        "class holding its images (the ImageFolder layout, e.g. train/n01440764/xxx.JPEG). Get "
        "ILSVRC2012 from https://image-net.org/download (after registration), extract the "
        "training and validation archives, and sort the validation images into class folders"
    )


def _class_folders(split: Path, root: Path) -> list[str]:
    if not split.is_dir():
        raise DataError(f"ImageNet folder {str(split)!r} not found; {_imagenet_help(root)}")
    classes = sorted(d.name for d in split.iterdir() if d.is_dir())
    if not classes:
        raise DataError(f"{str(split)!r} has no class sub-folders; {_imagenet_help(root)}")
    empty = [
        c for c in classes
        if not any(p.suffix.lower() in IMAGE_EXTENSIONS for p in (split / c).rglob("*") if p.is_file())
    ]
    if empty:
        shown = ", ".join(empty[:5]) + (" ..." if len(empty) > 5 else "")
        raise DataError(f"class folder(s) without images in {str(split)!r}: {shown}; {_imagenet_help(root)}")
    return classes


def imagenet(
    root: str | PathLike[str],
    val_fraction: float = 0.5,
    subset_fraction: float = 1.0,
    augment: bool = True,
    seed: int = 0,
    size: int = 224,
) -> DataSplits:
    """ImageNet (or any ImageFolder tree) from ``root/train`` and ``root/val``.

    ``train``/``val``: stratified seeded split of ``subset_fraction`` of ``root/train``
    (PC-DARTS searches on a 12.5 % subset), ``val_fraction`` of it to val, both with the
    training transform; ``test``: ``root/val``. Training transform (DARTS): random resized crop
    224, horizontal flip, colour jitter (0.4, 0.4, 0.4, 0.2), normalisation; test: resize 256,
    centre crop 224, normalisation. ``size`` replaces the crop side 224 (the resize scales with
    it, 256/224 of the crop), for searches at a lower resolution. Class folders of train/ and
    val/ must match.
    """
    from torchvision import datasets
    from torchvision import transforms as T

    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if not 0 < subset_fraction <= 1:
        raise ValueError(f"subset_fraction must be in (0, 1], got {subset_fraction}")
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    resize = round(size * 256 / 224)
    root_path = Path(root).expanduser()
    if not root_path.is_dir():
        raise DataError(f"ImageNet directory {str(root_path)!r} not found; {_imagenet_help(root_path)}")
    train_classes = _class_folders(root_path / "train", root_path)
    val_classes = _class_folders(root_path / "val", root_path)
    if train_classes != val_classes:
        only = sorted(set(train_classes) ^ set(val_classes))[:5]
        raise DataError(
            f"class folders of {str(root_path / 'train')!r} and {str(root_path / 'val')!r} differ "
            f"(e.g. {', '.join(only)}); both need the same classes"
        )
    normalise = [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    if augment:
        train_tf = T.Compose(
            [
                T.RandomResizedCrop(size),
                T.RandomHorizontalFlip(),
                T.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4, hue=0.2),
                *normalise,
            ]
        )
    else:
        train_tf = T.Compose([T.Resize(resize), T.CenterCrop(size), *normalise])
    test_tf = T.Compose([T.Resize(resize), T.CenterCrop(size), *normalise])
    full_train = datasets.ImageFolder(str(root_path / "train"), transform=train_tf)
    test = datasets.ImageFolder(str(root_path / "val"), transform=test_tf)
    labels = labels_of(full_train)
    if subset_fraction < 1:
        _, kept = _stratified_split(labels, [1 - subset_fraction], seed + 1)
    else:
        kept = np.arange(len(labels))
    val_rel, train_rel = _stratified_split(labels[kept], [val_fraction], seed)
    if len(train_rel) == 0 or len(val_rel) == 0:
        raise DataError(
            f"{str(root_path / 'train')!r} has too few images ({len(kept)} kept) to split into train and val"
        )
    return DataSplits(
        Subset(full_train, kept[train_rel].tolist()),
        Subset(full_train, kept[val_rel].tolist()),
        test,
        len(train_classes),
        (3, size, size),
        "imagenet",
    )


# -- long-tailed variants -------------------------------------------------------------------


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
        raise ValueError(f"imbalance factor rho must be a finite number >= 1, got {rho!r}")
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


# -- dispatch -------------------------------------------------------------------------------


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
