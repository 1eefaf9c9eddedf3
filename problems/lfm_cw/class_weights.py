"""Class weights of LFM-CW: ``c = K * softmax(phi + beta * m(W1))``.

``phi`` (one logit per class) is the parameter of the ``class_weights`` level. ``m_k(W1)`` measures
the mistakes of the first model on class k of the validation data: its mean cross-entropy on
that class (``kind="ce"``) or its error rate (``kind="error"``). ``m`` is a buffer refreshed after
every step of ``w1`` on that step's validation batch and smoothed by an exponential moving
average (``momentum``); by itself it carries no gradient into W1. `ClassWeights.tracked` gives
``m`` as a differentiable function of W1's logits on a validation batch (the mistakes path,
LFM-CW's option ``mistakes_grad``): its value is the moving average, its derivative that of the
batch's per-class mistakes, an estimate of ``dm/dW1`` at the current W1. A class W1 gets wrong has a larger
``m_k``, hence a larger weight ``c_k``, hence more weight on its synthetic images in ``w2``.
The weights sum to K, so uniform weights are all ones; with ``learn_total`` a learned scalar
``log_total`` (starting at 0) scales them, ``c = K exp(log_total) softmax(...)``, so that the total
weight of the synthetic data is learned as well as its split between classes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import mlo
from mlo.errors import ConfigError

__all__ = ["ClassWeights", "class_mistakes"]


class ClassWeights(nn.Module):
    """``phi`` (K logits) and the mistakes buffer ``m`` (K); calling it gives ``c`` (K,)."""

    mistakes: Tensor
    measured: Tensor

    def __init__(self, num_classes: int, beta: float = 1.0, momentum: float = 0.9, learn_total: bool = False) -> None:
        super().__init__()
        if num_classes < 2:
            raise ConfigError(f"class weights need at least 2 classes, got {num_classes}")
        if not 0.0 <= momentum < 1.0:
            raise ConfigError(f"mistakes momentum must be in [0, 1), got {momentum}")
        self.num_classes, self.beta, self.momentum = num_classes, float(beta), float(momentum)
        self.phi = nn.Parameter(torch.zeros(num_classes))
        self.log_total = nn.Parameter(torch.zeros(())) if learn_total else None
        self.register_buffer("mistakes", torch.zeros(num_classes))
        self.register_buffer("measured", torch.zeros((), dtype=torch.bool))

    def forward(self, mistakes: Tensor | None = None) -> Tensor:
        """``c`` with the mistakes ``m`` given (e.g. `tracked`), by default the buffer."""
        m = self.mistakes if mistakes is None else mistakes
        split = self.num_classes * torch.softmax(self.phi + self.beta * m, dim=0)  # (K,)
        return split if self.log_total is None else torch.exp(self.log_total) * split

    def tracked(self, logits: Tensor, labels: Tensor) -> Tensor:
        """``m`` as a function of W1's validation ``logits`` (per-class cross-entropy): the value
        of the moving average ``mistakes`` plus ``b - b.detach()``, ``b`` this batch's per-class
        mean cross-entropy, so that its derivative is the batch's (zero for a class the batch
        lacks). Before any mistakes were measured, the value is the batch's own."""
        batch = class_mistakes(logits, labels, self.num_classes, "ce")
        value = torch.where(self.measured, self.mistakes.to(batch.dtype), batch.detach())
        return value + (batch - batch.detach())

    @torch.no_grad()
    def observe(self, logits: Tensor, labels: Tensor, kind: str = "ce") -> None:
        """Fold one batch of W1's validation predictions into the mistakes ``m``."""
        total, count = _class_sums(logits, labels, self.num_classes, kind)
        mlo.distributed.all_sum(total, count)  # under a process group: the ranks' batches together
        batch = total / count.clamp(min=1)
        seen = count > 0
        fresh = torch.where(seen, batch, self.mistakes)
        # the first batch sets m, later ones are averaged in; chosen on the device (no host sync)
        averaged = self.momentum * self.mistakes + (1 - self.momentum) * fresh
        self.mistakes.copy_(torch.where(self.measured, averaged, fresh))
        self.measured.fill_(True)


def class_mistakes(logits: Tensor, labels: Tensor, num_classes: int, kind: str = "ce") -> Tensor:
    """Per-class mean cross-entropy (``"ce"``) or error rate (``"error"``); 0 for absent classes."""
    total, count = _class_sums(logits, labels, num_classes, kind)
    return total / count.clamp(min=1)


def _class_sums(logits: Tensor, labels: Tensor, num_classes: int, kind: str) -> tuple[Tensor, Tensor]:
    """Per class: the sum of the per-sample mistakes and the number of samples."""
    if kind == "ce":
        per_sample = F.cross_entropy(logits, labels, reduction="none")
    elif kind == "error":
        per_sample = (logits.argmax(dim=1) != labels).to(logits.dtype)
    else:
        raise ConfigError(f"mistakes kind must be 'ce' or 'error', got {kind!r}")
    total = torch.zeros(num_classes, dtype=per_sample.dtype, device=per_sample.device).index_add_(0, labels, per_sample)
    return total, _counts(labels, num_classes, per_sample.dtype)


def _counts(labels: Tensor, num_classes: int, dtype: torch.dtype) -> Tensor:
    """Examples per class, (K,); by ``index_add_`` rather than ``bincount``, which on a GPU reads
    the largest label back to the host."""
    ones = torch.ones(labels.shape, dtype=dtype, device=labels.device)
    return torch.zeros(num_classes, dtype=dtype, device=labels.device).index_add_(0, labels, ones)
