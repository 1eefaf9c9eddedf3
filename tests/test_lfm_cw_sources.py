"""LFM-CW's synthetic data sources: the conditional VAE, the quality gate that judges a generator,
the ``lfm-cw-aug`` source, safe checkpoint loading, and the learned total weight."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from mlo.problems.lfm_cw.augment import AugmentedReal
from mlo.problems.lfm_cw.class_weights import ClassWeights
from mlo.problems.lfm_cw.cvae import ConditionalVAE, pretrain_cvae
from mlo.problems.lfm_cw.gate import quality_gate, real_classifier, within_class_std
from mlo.problems.lfm_cw.generator import load_generator

from .helpers import PROTOTYPE_CLASSES as K, PROTOTYPE_SHAPE as SHAPE, prototypes as _prototypes

pytestmark = pytest.mark.usefixtures("one_thread")


def _dataset(n: int, seed: int, noise: float = 0.5) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(K).repeat(n)
    images = _prototypes()[labels] + noise * torch.randn(len(labels), *SHAPE, generator=g)
    return TensorDataset(images, labels)


class _Fixed(nn.Module):
    """A 'generator' from a rule: ``fn(labels, noise) -> images``."""

    def __init__(self, fn) -> None:  # type: ignore[no-untyped-def]
        super().__init__()
        self.fn = fn

    def forward(self, noise: Tensor, labels: Tensor) -> Tensor:
        return self.fn(labels, noise)


def test_within_class_std_is_the_mean_pixel_std_per_class() -> None:
    images = torch.tensor([[0.0, 0.0], [2.0, 4.0], [1.0, 1.0], [1.0, 1.0]]).view(4, 1, 1, 2)
    labels = torch.tensor([0, 0, 1, 1])
    # class 0: pixel stds (unbiased) sqrt(2) and sqrt(8); class 1: 0 and 0
    want = ((2.0**0.5 + 8.0**0.5) / 2 + 0.0) / 2
    assert within_class_std(images, labels, 2) == pytest.approx(want)


def test_gate_passes_real_like_data_and_fails_collapsed_or_mislabelled_generators() -> None:
    train, val = _dataset(40, 0), _dataset(20, 1)
    protos = _prototypes()
    judge = real_classifier(train, K, epochs=10)
    good = _Fixed(lambda k, z: protos[k] + 0.5 * z[:, :36].view(-1, *SHAPE))
    report = quality_gate(good, train, val, K, noise_dim=36, per_class=50, judge=judge)
    assert report.passed and report.agreement > 0.95 and 0.8 < report.std_ratio < 1.2
    assert report.classifier_val_accuracy > 0.95
    collapsed = _Fixed(lambda k, z: protos[k])  # right labels, no diversity at all
    report = quality_gate(collapsed, train, val, K, noise_dim=36, per_class=50, judge=judge)
    assert not report.passed and report.agreement > 0.95 and report.std_ratio == 0.0
    assert "FAILS" in report.summary()
    shifted = _Fixed(lambda k, z: protos[(k + 1) % K] + 0.5 * z[:, :36].view(-1, *SHAPE))  # wrong class
    report = quality_gate(shifted, train, val, K, noise_dim=36, per_class=50, judge=judge)
    assert not report.passed and report.agreement < 0.1 and report.std_ratio > 0.8


def test_conditional_vae_learns_its_classes_and_stays_in_the_data_range() -> None:
    train, val = _dataset(40, 0), _dataset(20, 1)
    vae = pretrain_cvae(train, K, SHAPE, seed=0, steps=150, noise_dim=4, kl_weight=1.0)
    low, high = float(train.tensors[0].min()), float(train.tensors[0].max())
    with torch.no_grad():
        images = vae(torch.randn(8, 4), torch.arange(K).repeat(2))
    assert images.shape == (8, *SHAPE) and float(images.min()) >= low and float(images.max()) <= high
    report = quality_gate(vae, train, val, K, noise_dim=4, per_class=50, judge=real_classifier(train, K, epochs=10))
    assert report.agreement > 0.9, report.summary()


def test_augmented_real_returns_shifted_real_images_of_the_requested_class() -> None:
    train = _dataset(3, 0)
    images, labels = train.tensors
    source = AugmentedReal(images, labels, K, shift=0)
    z = torch.randn(12, 4, generator=torch.Generator().manual_seed(0))
    want = torch.arange(K).repeat(3)
    out = source(z, want)
    for x, k in zip(out, want):  # each output is one of the real images of its class
        assert any(torch.equal(x, real) for real in images[labels == k])
    assert torch.equal(source(z, want), out)  # the noise decides everything
    shifted = AugmentedReal(images, labels, K, shift=1, flip=True)(z, want)
    assert shifted.shape == out.shape and not torch.equal(shifted, out)
    background = float(images.min())
    for x, k in zip(shifted, want):  # a shift by at most one pixel (and maybe a mirror) of a real image
        candidates = [r for r in images[labels == k]] + [r.flip(-1) for r in images[labels == k]]
        padded = [torch.nn.functional.pad(r, (1, 1, 1, 1), value=background) for r in candidates]
        crops = [p[:, dy : dy + 6, dx : dx + 6] for p in padded for dy in range(3) for dx in range(3)]
        assert any(torch.equal(x, c) for c in crops)
    with pytest.raises(ValueError, match="each of the 5 classes"):
        AugmentedReal(images, labels, 5)


def test_generator_checkpoints_load_without_running_code_unless_allowed(tmp_path: Path) -> None:
    vae = ConditionalVAE(K, SHAPE, noise_dim=32)
    vae.low.fill_(-1.0)
    torch.save(vae.state_dict(), tmp_path / "vae.pt")
    loaded = load_generator(tmp_path / "vae.pt", K, SHAPE)
    z, k = torch.randn(3, 32), torch.arange(3)
    assert isinstance(loaded, ConditionalVAE) and torch.equal(loaded(z, k), vae.eval()(z, k))
    torch.save(vae, tmp_path / "module.pt")  # a pickled module: code runs when it is unpickled
    with pytest.raises(ValueError, match="module.pt.*allow_pickle=True.*trust"):
        load_generator(tmp_path / "module.pt", K, SHAPE)
    assert torch.equal(load_generator(tmp_path / "module.pt", K, SHAPE, allow_pickle=True)(z, k), vae(z, k))


def test_learned_total_weight_scales_the_class_weights_and_gets_a_gradient() -> None:
    w = ClassWeights(K, beta=1.0, learn_total=True)
    assert float(w().sum()) == pytest.approx(K)
    with torch.no_grad():
        w.log_total.fill_(0.5)  # type: ignore[union-attr]
        w.phi.copy_(torch.tensor([0.0, 1.0, 2.0, 3.0]))
    c = w()
    assert float(c.sum()) == pytest.approx(K * float(torch.exp(torch.tensor(0.5))))
    assert torch.allclose(c / c.sum(), torch.softmax(w.phi, 0))
    (grad,) = torch.autograd.grad((c * torch.arange(K)).sum(), [w.log_total])
    assert float(grad) == pytest.approx(float((c * torch.arange(K)).sum()))
    assert ClassWeights(K).log_total is None
