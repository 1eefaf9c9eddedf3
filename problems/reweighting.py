"""Meta-Weight-Net data reweighting (Shu et al., NeurIPS 2019) as a bilevel mlo program.

    classifier  theta:  min  mean_i  V(l_i(theta); phi) * l_i(theta)         l_i: training loss of example i
    weight net  phi:    min  L_val(theta*(phi))                              on clean (or balanced) data

``V`` maps each example's loss to a weight in (0, 1); the example's loss enters ``V`` detached (as
in the paper, the weight is a function of the loss value, not a path for the classifier's
gradient). The weight net learns to down-weight what the clean validation data says hurts:
examples with flipped labels, or head classes of a long-tailed training set.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import mlo

__all__ = ["WeightNet", "mlp", "weighted_loss", "levels"]


class WeightNet(nn.Module):
    """Meta-Weight-Net: a per-example loss (B, 1) -> a weight in (0, 1) (B, 1)."""

    def __init__(self, hidden: int = 100) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(1, hidden), nn.ReLU(), nn.Linear(hidden, 1), nn.Sigmoid())

    def forward(self, losses: Tensor) -> Tensor:
        return self.net(losses)


def mlp(features: int, hidden: int, classes: int, layers: int = 1) -> nn.Sequential:
    """A ReLU MLP ``features -> hidden (x layers) -> classes`` on flattened inputs."""
    widths = [features] + [hidden] * layers
    body: list[nn.Module] = [nn.Flatten()]
    for a, b in zip(widths, widths[1:]):
        body += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*body, nn.Linear(widths[-1], classes))


def weighted_loss(classifier: nn.Module, weights: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """``mean_i V(l_i) l_i``: each example's cross-entropy weighted by the weight net of its value."""
    losses = F.cross_entropy(classifier(x), y, reduction="none")  # (B,)
    return (weights(losses.detach().unsqueeze(1)).squeeze(1) * losses).mean()


def levels(classifier: nn.Module, weights: nn.Module, train: Iterable[Any], val: Iterable[Any],
           lr: float = 0.1, meta_lr: float = 1e-3, momentum: float = 0.0) -> tuple[list[mlo.Problem], dict[str, Sequence[str]]]:
    """The program: ``classifier`` (SGD, weighted training loss) under ``weights`` (Adam, clean
    validation cross-entropy); batches ``(x, y)``."""
    lower = mlo.Problem(
        "classifier", classifier, torch.optim.SGD(classifier.parameters(), lr=lr, momentum=momentum), train,
        loss=lambda batch: weighted_loss(classifier, weights, *batch),
    )
    upper = mlo.Problem(
        "weights", weights, torch.optim.Adam(weights.parameters(), lr=meta_lr), val,
        loss=lambda batch: F.cross_entropy(classifier(batch[0]), batch[1]),
    )
    return [lower, upper], {"weights": ["classifier"]}
