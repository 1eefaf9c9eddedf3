"""Tests of the data loaders: digits splits, CIFAR and ImageFolder on tiny real-format files, long tails."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from mlo.problems import data
from mlo.problems.data import DataError

from .helpers import write_cifar_batch, write_image_folder

pytestmark = pytest.mark.usefixtures("one_thread")


# -- digits -----------------------------------------------------------------------------------------


def test_digits_split_sizes_types_and_normalisation() -> None:
    s = data.digits(seed=0)
    assert (len(s.train), len(s.val), len(s.test)) == (1079, 359, 359)
    assert s.num_classes == 10 and s.input_shape == (1, 8, 8) and s.name == "digits"
    x, y = s.train[0]
    assert x.shape == (1, 8, 8) and x.dtype == torch.float32
    assert y.dtype == torch.int64
    xs = s.train.tensors[0]
    assert abs(float(xs.mean())) < 1e-5 and abs(float(xs.std()) - 1.0) < 1e-3
    # val/test use the train statistics, so they are only roughly standardised
    assert abs(float(s.test.tensors[0].mean())) < 0.1


def test_digits_splits_are_stratified_and_disjoint() -> None:
    from sklearn.datasets import load_digits

    s = data.digits(seed=0, val_fraction=0.2, test_fraction=0.2)
    totals = np.bincount(load_digits().target, minlength=10)
    for split, frac in ((s.val, 0.2), (s.test, 0.2)):
        counts = data.class_counts(split, 10)
        assert np.array_equal(counts, np.round(frac * totals).astype(int))
    all_counts = sum(data.class_counts(d, 10) for d in (s.train, s.val, s.test))
    assert np.array_equal(all_counts, totals)
    # disjoint: no image (row of pixels) appears in two splits
    rows = [{t.numpy().tobytes() for t in d.tensors[0]} for d in (s.train, s.val, s.test)]
    assert sum(len(r) for r in rows) == len(rows[0] | rows[1] | rows[2])


def test_digits_determinism() -> None:
    a, b, c = data.digits(seed=3), data.digits(seed=3), data.digits(seed=4)
    assert torch.equal(a.train.tensors[0], b.train.tensors[0])
    assert torch.equal(a.test.tensors[1], b.test.tensors[1])
    assert not torch.equal(a.train.tensors[0], c.train.tensors[0])


def test_digits_rejects_bad_fractions() -> None:
    with pytest.raises(ValueError, match="val_fraction"):
        data.digits(val_fraction=0.6, test_fraction=0.5)


# -- metrics ------------------------------------------------------------------------------------------


def test_error_and_balanced_error() -> None:
    labels = torch.tensor([0, 0, 0, 1])
    preds = torch.tensor([0, 0, 0, 0])
    assert data.error(preds, labels) == pytest.approx(25.0)
    assert data.balanced_error(preds, labels, num_classes=3) == pytest.approx(50.0)  # class 2 absent
    assert data.balanced_error(labels, labels, 2) == 0.0


# -- CIFAR on tiny files in the real python pickle format --------------------------------------------


def _tiny_cifar10(root: Path, per_batch: int = 4) -> dict[str, np.ndarray]:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    written = {}
    for i in range(1, 6):
        images = rng.integers(0, 256, size=(per_batch, 3, 32, 32), dtype=np.uint8)
        labels = [(2 * (i - 1) + j) % 10 for j in range(per_batch)]  # 2 images of every class overall
        write_cifar_batch(folder / f"data_batch_{i}", images, labels)
        written[f"data_batch_{i}"] = images
    test_images = rng.integers(0, 256, size=(3, 3, 32, 32), dtype=np.uint8)
    write_cifar_batch(folder / "test_batch", test_images, [7, 1, 4])
    written["test_batch"] = test_images
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"class{k}" for k in range(10)], "num_cases_per_batch": per_batch, "num_vis": 3072}, f, protocol=2)
    return written


def test_cifar10_loader_on_real_format_files(tmp_path: Path) -> None:
    written = _tiny_cifar10(tmp_path)
    s = data.cifar(tmp_path, num_classes=10, augment=True, cutout=16, seed=0)
    assert s.name == "cifar10" and s.num_classes == 10 and s.input_shape == (3, 32, 32)
    assert (len(s.train), len(s.val), len(s.test)) == (10, 10, 3)
    # stratified halves: 20 images, 2 per class -> one of each class in train and in val
    assert data.class_counts(s.train, 10).tolist() == [1] * 10
    assert data.class_counts(s.val, 10).tolist() == [1] * 10
    x, y = s.train[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and isinstance(y, int)
    assert data.labels_of(s.test).tolist() == [7, 1, 4]
    # The test transform is plain normalisation: pixel values match the file exactly.
    x0, y0 = s.test[0]
    mean, std = torch.tensor(data.CIFAR10_MEAN), torch.tensor(data.CIFAR10_STD)
    expected = (torch.from_numpy(written["test_batch"][0]).float() / 255 - mean[:, None, None]) / std[:, None, None]
    torch.testing.assert_close(x0, expected)
    assert y0 == 7


def test_cifar_without_augmentation_keeps_train_pixels(tmp_path: Path) -> None:
    written = _tiny_cifar10(tmp_path)
    s = data.cifar(tmp_path / "cifar-10-batches-py", augment=False, seed=1)  # the folder itself works too
    full = s.train.dataset
    assert isinstance(full, data.CifarBatches)
    idx = s.train.indices[0]
    batch, row = divmod(idx, 4)
    x, _ = s.train[0]
    mean, std = torch.tensor(data.CIFAR10_MEAN), torch.tensor(data.CIFAR10_STD)
    raw = torch.from_numpy(written[f"data_batch_{batch + 1}"][row]).float() / 255
    torch.testing.assert_close(x, (raw - mean[:, None, None]) / std[:, None, None])


def test_cifar100_layout(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    rng = np.random.default_rng(1)
    write_cifar_batch(folder / "train", rng.integers(0, 256, (8, 3, 32, 32), dtype=np.uint8), [0, 99, 5, 50, 0, 99, 5, 50], "fine_labels")
    write_cifar_batch(folder / "test", rng.integers(0, 256, (2, 3, 32, 32), dtype=np.uint8), [3, 98], "fine_labels")
    with open(folder / "meta", "wb") as f:
        pickle.dump({"fine_label_names": [f"c{k}" for k in range(100)]}, f, protocol=2)
    s = data.load("cifar100", root=tmp_path)
    assert s.num_classes == 100 and (len(s.train), len(s.val), len(s.test)) == (4, 4, 2)
    assert sorted(data.labels_of(s.val).tolist()) == [0, 5, 50, 99]


def test_cifar_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(DataError) as info:
        data.cifar(tmp_path / "nowhere")
    msg = str(info.value)
    assert str(tmp_path / "nowhere" / "cifar-10-batches-py") in msg
    assert "data_batch_1" in msg and "batches.meta" in msg and "cifar.html" in msg
    assert isinstance(info.value, FileNotFoundError) and isinstance(info.value, ValueError)


def test_cifar_missing_file(tmp_path: Path) -> None:
    _tiny_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(DataError, match="missing data_batch_3"):
        data.cifar(tmp_path)


@pytest.mark.parametrize(
    "content, message",
    [
        (b"this is not a pickle", "cannot read"),
        (pickle.dumps({"data": np.zeros((2, 100), np.uint8), "labels": [0, 1]}), "shape \\(N, 3072\\)"),
        (pickle.dumps({"data": np.zeros((2, 3072), np.uint8), "labels": [0, 10]}), "labels must be in \\[0, 10\\)"),
        (pickle.dumps({"pixels": 1}), "lacks the keys"),
        (pickle.dumps([1, 2, 3]), "not a CIFAR python batch"),
    ],
)
def test_cifar_malformed_file(tmp_path: Path, content: bytes, message: str) -> None:
    _tiny_cifar10(tmp_path)
    bad = tmp_path / "cifar-10-batches-py" / "data_batch_1"
    bad.write_bytes(content)
    with pytest.raises(DataError, match=message) as info:
        data.cifar(tmp_path)
    assert str(bad) in str(info.value)


def test_cutout_zeroes_a_clipped_square() -> None:
    torch.manual_seed(0)
    cut = data.Cutout(16)
    for _ in range(20):
        out = cut(torch.ones(3, 32, 32))
        zeros = (out[0] == 0).sum().item()
        assert 64 <= zeros <= 256  # a 16x16 square, at worst clipped to 8x8 in a corner
        assert torch.equal(out[0] == 0, out[2] == 0)  # the same square on every channel
    with pytest.raises(ValueError):
        data.Cutout(0)


# -- ImageFolder (ImageNet layout) ---------------------------------------------------------------------


def test_imagenet_loader_on_image_folders(tmp_path: Path) -> None:
    write_image_folder(tmp_path, {"train": {"cat": 4, "dog": 4}, "val": {"cat": 1, "dog": 2}})
    s = data.imagenet(tmp_path, val_fraction=0.5, seed=0)
    assert s.num_classes == 2 and s.input_shape == (3, 224, 224)
    assert (len(s.train), len(s.val), len(s.test)) == (4, 4, 3)
    assert data.class_counts(s.train, 2).tolist() == [2, 2]
    x, y = s.train[0]
    assert x.shape == (3, 224, 224) and y in (0, 1)
    xt, yt = s.test[0]
    assert xt.shape == (3, 224, 224) and yt == 0
    assert data.labels_of(s.test).tolist() == [0, 1, 1]
    small = data.imagenet(tmp_path, val_fraction=0.5, subset_fraction=0.5, seed=0)
    assert len(small.train) + len(small.val) == 4


def test_imagenet_missing_or_empty_folders(tmp_path: Path) -> None:
    write_image_folder(tmp_path, {"train": {"cat": 2, "dog": 2}})
    with pytest.raises(DataError) as info:
        data.imagenet(tmp_path)
    assert str(tmp_path / "val") in str(info.value) and "not found" in str(info.value)
    (tmp_path / "val" / "cat").mkdir(parents=True)
    (tmp_path / "val" / "dog").mkdir()
    with pytest.raises(DataError, match="without images"):
        data.imagenet(tmp_path)
    with pytest.raises(DataError, match="not found"):
        data.imagenet(tmp_path / "absent")


def test_imagenet_class_mismatch(tmp_path: Path) -> None:
    write_image_folder(tmp_path, {"train": {"cat": 2, "dog": 2}, "val": {"cat": 1, "cow": 1}})
    with pytest.raises(DataError, match="differ"):
        data.imagenet(tmp_path)


# -- long tails and dispatch ------------------------------------------------------------------------------


def test_long_tailed_counts_follow_the_profile() -> None:
    s = data.digits(seed=0)
    lt = data.long_tailed(s, rho=10, seed=0)
    for base, split in ((s.train, lt.train), (s.val, lt.val)):
        n_max = int(data.class_counts(base, 10).min())
        expected = [int(np.floor(n_max * 10 ** (-k / 9))) for k in range(10)]
        assert data.class_counts(split, 10).tolist() == expected
    counts = data.class_counts(lt.train, 10)
    assert counts[0] / counts[-1] == pytest.approx(10, rel=0.1)
    assert lt.test is s.test and len(lt.test) == 359
    assert lt.name == "digits-lt10"
    # every kept example comes from the original split, without repeats
    assert len(set(lt.train.indices)) == len(lt.train)
    again = data.long_tailed(s, rho=10, seed=0)
    assert again.train.indices == lt.train.indices


def test_long_tailed_rho_one_and_validation() -> None:
    s = data.digits(seed=0)
    flat = data.long_tailed(s, rho=1)
    counts = data.class_counts(flat.train, 10)
    assert len(set(counts.tolist())) == 1
    for bad in (0.5, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="rho"):
            data.long_tailed(s, rho=bad)


def test_load_dispatch() -> None:
    lt = data.load("digits", imbalance=5, seed=1)
    assert lt.name == "digits-lt5"
    with pytest.raises(ValueError, match="unknown dataset 'mnist'.*digits.*cifar10.*cifar100.*imagenet"):
        data.load("mnist")
    with pytest.raises(DataError, match="needs a data directory"):
        data.load("cifar10")
    with pytest.raises(DataError, match="needs a data directory"):
        data.load("imagenet")
