"""Classification error metrics of the bundled programs: top-1 error and class-balanced error, in percent."""

from __future__ import annotations

import torch
from torch import Tensor

from mlo.errors import ConfigError

__all__ = ["error", "balanced_error"]


def error(preds: Tensor, labels: Tensor) -> float:
    """Top-1 error in percent."""
    if preds.numel() == 0:
        raise ConfigError("error() of an empty prediction set")
    return 100.0 * float((preds.view(-1) != labels.view(-1)).float().mean())


def balanced_error(preds: Tensor, labels: Tensor, num_classes: int) -> float:
    """Mean over classes of the per-class error, in percent (classes absent from labels are skipped)."""
    preds, labels = preds.view(-1).cpu(), labels.view(-1).cpu()
    if labels.numel() == 0:
        raise ConfigError("balanced_error() of an empty prediction set")
    wrong = (preds != labels).double()
    total = torch.bincount(labels, minlength=num_classes).double()
    wrong_per_class = torch.zeros(num_classes, dtype=torch.float64).index_add_(0, labels, wrong)
    present = total > 0
    return 100.0 * float((wrong_per_class[present] / total[present]).mean())
