"""Fashion-MNIST from IDX files: small generated files (plain and gzipped) in the real format,
read through torchvision's MNIST reader; pooling, class-balanced subsets, long tails, errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from mlo.problems import data
from mlo.problems.data import FASHION_MNIST_FILES, DataError

from .helpers import idx, write_fashion_mnist

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("gz", [True, False])
def test_reads_generated_idx_files_and_pools_exactly(tmp_path: Path, gz: bool) -> None:
    arrays = write_fashion_mnist(tmp_path, gz=gz)
    s = data.fashion_mnist(tmp_path, size=14, val_fraction=0.5, seed=0)
    assert s.name == "fashion-mnist" and s.num_classes == 10 and s.input_shape == (1, 14, 14)
    assert (len(s.train), len(s.val), len(s.test)) == (30, 30, 30)
    assert np.array_equal(data.class_counts(s.train, 10), np.full(10, 3))
    # test images: the 2x2 means of the raw pixels / 255, standardised with the train statistics
    raw = torch.from_numpy(arrays["t10k"]).double().div(255.0)
    pooled = raw.view(-1, 14, 2, 14, 2).mean(dim=(2, 4))
    x_test, y_test = s.test.tensors
    assert torch.equal(y_test, torch.from_numpy(arrays["t10k-labels"]).long())
    train_x = s.train.tensors[0].double()
    assert abs(float(train_x.mean())) < 1e-5 and abs(float(train_x.std()) - 1.0) < 1e-3
    # undo the standardisation with two test pixels: an affine map must fit every pixel
    flat_got, flat_want = x_test.double().flatten(), pooled.flatten()
    scale = (flat_got[1] - flat_got[0]) / (flat_want[1] - flat_want[0])
    assert torch.allclose(flat_got, flat_got[0] + scale * (flat_want - flat_want[0]), atol=1e-4)


def test_class_balanced_subsets_and_long_tail(tmp_path: Path) -> None:
    write_fashion_mnist(tmp_path, per_class=(8, 4))
    s = data.fashion_mnist(tmp_path, size=7, train_per_class=4, test_per_class=2, seed=1)
    assert s.input_shape == (1, 7, 7)
    assert np.array_equal(data.class_counts(s.train, 10) + data.class_counts(s.val, 10), np.full(10, 4))
    assert np.array_equal(data.class_counts(s.test, 10), np.full(10, 2))
    lt = data.load("fashion-mnist", root=tmp_path, imbalance=4.0, size=28)
    counts = data.class_counts(lt.train, 10)
    assert lt.name == "fashion-mnist-lt4" and counts[0] == 4 and counts[-1] == 1 and np.all(np.diff(counts) <= 0)


def test_missing_files_say_how_to_install(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist") as err:
        data.fashion_mnist(tmp_path / "nowhere")
    assert FASHION_MNIST_FILES[0] in str(err.value) and "--data-root" in str(err.value)
    write_fashion_mnist(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte"):
        data.fashion_mnist(tmp_path)


def test_malformed_files_and_bad_options_are_refused(tmp_path: Path) -> None:
    write_fashion_mnist(tmp_path, gz=False)
    with pytest.raises(ValueError, match="divide 28"):
        data.fashion_mnist(tmp_path, size=10)
    with pytest.raises(ValueError, match="train_per_class"):
        data.fashion_mnist(tmp_path, train_per_class=1)
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(idx(np.zeros(5, dtype=np.uint8)))
    with pytest.raises(DataError, match="60|images.*labels|labels"):
        data.fashion_mnist(tmp_path)
