"""Data sets as train/val/test splits (`DataSplits`): digits, Fashion-MNIST, CIFAR-10/100, ImageNet, long-tailed.

Nothing here downloads. The digits set ships with scikit-learn; Fashion-MNIST is read from its
four IDX files (``--data-root`` or where Debian's ``dataset-fashion-mnist`` put them); CIFAR and
ImageNet are read from a directory the user provides, and a missing or malformed directory
raises `DataError` saying what was expected there and how to obtain it.

Search protocol (DARTS): ``train`` and ``val`` are two disjoint, stratified, seeded halves of the
official training set (both with training augmentation, as DARTS), ``test`` is the official
test set. An evaluation run retrains on ``train`` + ``val`` and reports error on ``test``.

One module per data set (`sklearn_digits`, `fashion_mnist_idx`, `cifar_batches`,
`image_folders`), the shared pieces beside them (`splits`, `long_tail`, `catalog`: `load` by
name). The error metrics live in `mlo.problems.metrics`, with the programs that report them;
they are re-exported here for the importers that read them from the data package.
"""

from __future__ import annotations

from mlo.errors import DataError

from ..metrics import balanced_error, error
from .catalog import DATASETS, load
from .cifar_batches import CIFAR10_MEAN, CIFAR10_STD, CIFAR100_MEAN, CIFAR100_STD, CifarBatches, Cutout, cifar
from .fashion_mnist_idx import FASHION_MNIST_CLASSES, FASHION_MNIST_FILES, fashion_mnist
from .image_folders import IMAGE_EXTENSIONS, IMAGENET_MEAN, IMAGENET_STD, imagenet
from .long_tail import long_tailed
from .sklearn_digits import digits, digits_images
from .splits import DataSplits, class_counts, labels_of

__all__ = [
    "DataError",
    "DataSplits",
    "DATASETS",
    "digits",
    "digits_images",
    "fashion_mnist",
    "FASHION_MNIST_FILES",
    "FASHION_MNIST_CLASSES",
    "cifar",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "CIFAR100_MEAN",
    "CIFAR100_STD",
    "imagenet",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_EXTENSIONS",
    "long_tailed",
    "load",
    "labels_of",
    "class_counts",
    "error",
    "balanced_error",
    "Cutout",
    "CifarBatches",
]
