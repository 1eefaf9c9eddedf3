"""The quality gate of a generator: are its images of class k recognisably class k, and diverse?

Two figures, measured before the search and printed:

- agreement: the share of generated images that a classifier trained on real data (a one-hidden-
  layer MLP on ``train``) labels as the class they were generated for;
- diversity: the within-class pixel standard deviation of generated images (per class, the
  mean over pixels of the std across that class's images; then the mean over classes), as a
  ratio to the same figure on the real ``train`` images.

Defaults: agreement >= 90 % and diversity ratio >= 0.5. The classifier's accuracy on ``val``
is reported too, so a low agreement can be told apart from a weak classifier. Real images are
streamed in batches (`streams`) and generated ones made one class at a time, so the gate's memory
does not grow with the data set.

A third figure, reported but not gated, asks whether the images teach rather than whether they
are recognised: TSTR ("train on synthetic, test on real"), the accuracy on the real ``val`` of the
same MLP trained only on generated images (``per_class`` of every class), as a share of the
real-trained classifier's accuracy there. Easy prototypes can be recognised at 100 % and still
teach little: TSTR is low when the generated classes miss the variety of the real ones.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset, TensorDataset

from mlo.errors import DataError

from ..data import labels_of
from .streams import ShuffledBatches, class_pixel_std, stream

__all__ = ["GateReport", "quality_gate", "within_class_std", "real_classifier", "tstr_classifier", "MIN_AGREEMENT", "MIN_STD_RATIO"]

MIN_AGREEMENT = 0.90
MIN_STD_RATIO = 0.5


@dataclass(frozen=True)
class GateReport:
    """The gate's figures; ``passed`` when both thresholds hold."""

    agreement: float  # share of generated images labelled as intended, in [0, 1]
    per_class_agreement: list[float]
    generated_std: float
    real_std: float
    classifier_val_accuracy: float
    tstr_accuracy: float | None = None  # real val accuracy of a classifier trained on generated images only
    min_agreement: float = MIN_AGREEMENT
    min_std_ratio: float = MIN_STD_RATIO

    @property
    def std_ratio(self) -> float:
        return self.generated_std / self.real_std if self.real_std > 0 else float("inf")

    @property
    def tstr_share(self) -> float | None:
        """TSTR as a share of the real-trained classifier's val accuracy (1: the generated images
        teach as well as the real ones)."""
        if self.tstr_accuracy is None:
            return None
        return self.tstr_accuracy / self.classifier_val_accuracy if self.classifier_val_accuracy > 0 else float("inf")

    @property
    def passed(self) -> bool:
        return self.agreement >= self.min_agreement and self.std_ratio >= self.min_std_ratio

    def summary(self) -> str:
        verdict = "passes" if self.passed else "FAILS"
        return (
            f"generator quality gate {verdict}: label agreement {100 * self.agreement:.1f} % (need >= "
            f"{100 * self.min_agreement:.0f} %; real-trained classifier {100 * self.classifier_val_accuracy:.1f} % on "
            f"real val), within-class std {self.generated_std:.3f} vs real {self.real_std:.3f} (ratio "
            f"{self.std_ratio:.2f}, need >= {self.min_std_ratio:g}); worst class agreement "
            f"{100 * min(self.per_class_agreement):.1f} %"
        ) + self._tstr_text()

    def _tstr_text(self) -> str:
        if self.tstr_accuracy is None or self.tstr_share is None:
            return ""
        return (f"; TSTR (trained on generated, tested on real val) {100 * self.tstr_accuracy:.1f} %, "
                f"{100 * self.tstr_share:.0f} % of the real-trained classifier's")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "std_ratio": self.std_ratio, "tstr_share": self.tstr_share, "passed": self.passed}


def _mean_of_classes(stds: list[float]) -> float:
    """The mean of the per-class stds that exist (classes with at least 2 images)."""
    present = [s for s in stds if not math.isnan(s)]
    if not present:
        raise DataError("within_class_std: no class has two images")
    return sum(present) / len(present)


def within_class_std(images: Tensor, labels: Tensor, num_classes: int) -> float:
    """Mean over the classes present (with at least 2 images) of the mean pixel std within the class."""
    flat = images.flatten(1)
    stds = [float(flat[labels == k].std(dim=0).mean()) if int((labels == k).sum()) > 1 else math.nan for k in range(num_classes)]
    return _mean_of_classes(stds)


def real_classifier(train: Dataset, num_classes: int, seed: int = 0, epochs: int = 30, workers: int = 0) -> nn.Module:
    """A one-hidden-layer MLP trained on ``train`` with Adam (the gate's judge), its batches
    streamed (``workers`` loader processes). Its loss weights each class by the inverse of its
    frequency, so that a long-tailed ``train`` does not make it deaf to the tail classes it has
    to recognise in generated images."""
    return _mlp_classifier(train, torch.from_numpy(labels_of(train)), num_classes, seed, epochs, workers)


def tstr_classifier(
    generator: nn.Module, num_classes: int, noise_dim: int, per_class: int = 200, seed: int = 0, epochs: int = 30,
    device: torch.device | str = "cpu",
) -> nn.Module:
    """The judge's MLP trained as `real_classifier` is, on ``per_class`` generated images of every
    class instead of real data (the "train on synthetic" half of TSTR)."""
    gen = torch.Generator().manual_seed(seed + 2)
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    noise = torch.randn(len(labels), noise_dim, generator=gen)
    with torch.no_grad():
        fake = generator(noise.to(device), labels.to(device)).float().cpu()  # (K * per_class, C, H, W)
    return _mlp_classifier(TensorDataset(fake, labels), labels, num_classes, seed, epochs)


def _mlp_classifier(data: Dataset, labels: Tensor, num_classes: int, seed: int, epochs: int, workers: int = 0) -> nn.Module:
    """A one-hidden-layer MLP trained on ``data`` (whose labels are ``labels``), Adam,
    class-balanced loss weights, batches streamed; in eval mode."""
    y = labels
    pixels = data[0][0].numel()
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(pixels, 256), nn.ReLU(), nn.Linear(256, num_classes))
    counts = torch.bincount(y, minlength=num_classes).float()
    balance = torch.where(counts > 0, counts.sum() / (num_classes * counts.clamp(min=1)), torch.zeros_like(counts))
    opt = torch.optim.Adam(model.parameters(), 1e-3, weight_decay=1e-4)
    for xb, yb in stream(data, ShuffledBatches(len(y), 128, epochs, seed), workers):
        loss = F.cross_entropy(model(xb.float()), yb, weight=balance)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model.eval()


@torch.no_grad()
def _accuracy(model: nn.Module, dataset: Dataset, workers: int = 0) -> float:
    """The share of ``dataset`` that ``model`` labels correctly, read in batches."""
    hits, seen = 0, 0
    for x, y in stream(dataset, 256, workers):
        hits += int((model(x.float()).argmax(1) == y).sum())
        seen += len(y)
    return hits / max(seen, 1)


def quality_gate(
    generator: nn.Module, train: Dataset, val: Dataset, num_classes: int, noise_dim: int,
    per_class: int = 200, seed: int = 0, device: torch.device | str = "cpu", judge: nn.Module | None = None,
    workers: int = 0, tstr: bool = True,
) -> GateReport:
    """Measure ``generator`` (called ``(noise, labels) -> images``) against the real ``train`` data.
    ``judge``: a classifier from `real_classifier` to reuse (default: one trained here).
    ``workers``: loader processes streaming the real images.
    ``tstr``: also train `tstr_classifier` and score it on ``val`` (``tstr_accuracy``)."""
    judge = judge if judge is not None else real_classifier(train, num_classes, seed, workers=workers)
    gen = torch.Generator().manual_seed(seed + 1)
    noise = torch.randn(num_classes * per_class, noise_dim, generator=gen)  # (K * per_class, noise_dim), class-major
    per_class_agreement, generated_stds = [], []
    with torch.no_grad():
        for k, z in enumerate(noise.split(per_class)):  # one class's images at a time
            labels = torch.full((per_class,), k)
            fake = generator(z.to(device), labels.to(device)).float().cpu()  # (per_class, C, H, W)
            per_class_agreement.append(float((judge(fake).argmax(1) == labels).float().mean()))
            generated_stds.append(float(fake.flatten(1).std(dim=0).mean()) if per_class > 1 else math.nan)
    tstr_accuracy = None
    if tstr:
        student = tstr_classifier(generator, num_classes, noise_dim, per_class, seed, device=device)
        tstr_accuracy = _accuracy(student, val, workers)
    return GateReport(
        agreement=sum(per_class_agreement) / num_classes, per_class_agreement=per_class_agreement,
        generated_std=_mean_of_classes(generated_stds),
        real_std=_mean_of_classes(class_pixel_std(train, num_classes, workers=workers)),
        classifier_val_accuracy=_accuracy(judge, val, workers), tstr_accuracy=tstr_accuracy,
    )
