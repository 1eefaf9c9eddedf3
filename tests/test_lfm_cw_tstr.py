"""A generator that teaches: the gate's TSTR (train on synthetic, test on real) and the conditional
VAE's decoder samples."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from mlo.problems.lfm_cw.cvae import ConditionalVAE, pretrain_cvae
from mlo.problems.lfm_cw.gate import GateReport, quality_gate, real_classifier

from .helpers import PROTOTYPE_CLASSES as K, PROTOTYPE_SHAPE as SHAPE, prototypes as _prototypes

pytestmark = pytest.mark.usefixtures("one_thread")


def _dataset(n: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(K).repeat(n)
    return TensorDataset(_prototypes()[labels] + 0.5 * torch.randn(len(labels), *SHAPE, generator=g), labels)


class _Rule(nn.Module):
    def __init__(self, shift: int) -> None:
        super().__init__()
        self.shift = shift

    def forward(self, noise: Tensor, labels: Tensor) -> Tensor:
        return _prototypes()[(labels + self.shift) % K] + 0.5 * noise[:, :36].view(-1, *SHAPE)


def test_tstr_is_near_one_for_real_like_images_and_near_zero_for_mislabelled_ones() -> None:
    train, val = _dataset(40, 0), _dataset(20, 1)
    judge = real_classifier(train, K, epochs=10)
    good = quality_gate(_Rule(0), train, val, K, noise_dim=36, per_class=50, judge=judge)
    assert good.tstr_accuracy is not None and good.tstr_share is not None
    assert good.tstr_share == pytest.approx(good.tstr_accuracy / good.classifier_val_accuracy)
    assert good.tstr_share > 0.95 and "TSTR" in good.summary()
    bad = quality_gate(_Rule(1), train, val, K, noise_dim=36, per_class=50, judge=judge)
    assert bad.tstr_accuracy is not None and bad.tstr_accuracy < 0.1
    recorded = bad.to_dict()
    assert recorded["tstr_accuracy"] == bad.tstr_accuracy and recorded["tstr_share"] == bad.tstr_share


def test_tstr_is_optional_and_reports_without_it() -> None:
    train, val = _dataset(10, 0), _dataset(5, 1)
    report = quality_gate(_Rule(0), train, val, K, noise_dim=36, per_class=10, judge=real_classifier(train, K, epochs=2),
                          tstr=False)
    assert report.tstr_accuracy is None and report.tstr_share is None and "TSTR" not in report.summary()
    assert GateReport(1.0, [1.0], 1.0, 1.0, 0.5).to_dict()["tstr_share"] is None


def test_decoder_samples_are_draws_of_the_mean_at_the_data_range() -> None:
    vae = pretrain_cvae(_dataset(20, 0), K, SHAPE, seed=0, steps=30, noise_dim=4)
    sampler = ConditionalVAE(K, SHAPE, 4, pixels="sample")
    sampler.load_state_dict(vae.state_dict())  # the same weights serve both
    z, k = torch.randn(2000, 4, generator=torch.Generator().manual_seed(0)), torch.arange(K).repeat(500)
    with torch.no_grad():
        means = vae(z, k)
        torch.manual_seed(0)
        draws = sampler(z, k)
    low, high = float(vae.low), float(vae.high)
    assert torch.all((draws == low) | (draws == high))
    # each pixel is at `high` with the mean's probability: compare over the 2000 draws
    share_high = ((draws - low) / (high - low)).mean(0)
    assert torch.allclose(share_high, ((means - low) / (high - low)).mean(0), atol=0.05)
    with pytest.raises(ValueError, match="pixels"):
        ConditionalVAE(K, SHAPE, pixels="median")
