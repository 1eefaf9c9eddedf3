"""ImageNet, or any tree of class folders (torchvision's ImageFolder layout), from ``root/train``
and ``root/val``."""

from __future__ import annotations

from os import PathLike
from pathlib import Path

import numpy as np
from torch.utils.data import Subset

from mlo.errors import ConfigError, DataError

from .splits import DataSplits, labels_of, stratified_split

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "IMAGE_EXTENSIONS", "imagenet"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


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
        raise ConfigError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if not 0 < subset_fraction <= 1:
        raise ConfigError(f"subset_fraction must be in (0, 1], got {subset_fraction}")
    if size < 1:
        raise ConfigError(f"size must be >= 1, got {size}")
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
        _, kept = stratified_split(labels, [1 - subset_fraction], seed + 1)
    else:
        kept = np.arange(len(labels))
    val_rel, train_rel = stratified_split(labels[kept], [val_fraction], seed)
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
