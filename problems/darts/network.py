"""The discrete DARTS evaluation network built from a `Genotype` (with auxiliary head and drop path).

Structure as DARTS's evaluation networks: stem, ``layers`` cells (reductions at ``layers // 3``
and ``2 * layers // 3``), global pooling, linear classifier; the auxiliary head reads the output
of cell ``2 * layers // 3``. Differences, all for small inputs: the auxiliary head pools to 2x2
adaptively (DARTS's fixed 5x5/3 pooling assumes an 8x8 feature map, which a 32x32 image gives
but an 8x8 image does not), and the classifier pools adaptively (any input size).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .genotype import Genotype
from .ops import FactorizedReduce, Identity, ReLUConvBN, make_op
from .stem import StemKind, build_stem, reduction_indices

__all__ = ["NetworkFromGenotype", "AuxiliaryHead", "drop_path"]


def drop_path(x: Tensor, drop_prob: float) -> Tensor:
    """Zero whole samples of a branch with probability ``drop_prob``, rescaling the others."""
    if drop_prob <= 0.0:
        return x
    keep = 1.0 - drop_prob
    mask = torch.empty(x.shape[0], 1, 1, 1, device=x.device, dtype=x.dtype).bernoulli_(keep)
    return x * mask / keep


class Cell(nn.Module):
    """A discrete cell: two edges into each intermediate node, as listed by the genotype."""

    def __init__(
        self,
        genotype: Genotype,
        C_prev_prev: int,
        C_prev: int,
        C: int,
        reduction: bool,
        reduction_prev: bool,
    ) -> None:
        super().__init__()
        self.reduction = reduction
        if reduction_prev:
            self.preprocess0: nn.Module = FactorizedReduce(C_prev_prev, C)
        else:
            self.preprocess0 = ReLUConvBN(C_prev_prev, C, 1, 1, 0)
        self.preprocess1 = ReLUConvBN(C_prev, C, 1, 1, 0)
        edges = genotype.reduce if reduction else genotype.normal
        self.concat = genotype.reduce_concat if reduction else genotype.normal_concat
        self.steps = len(edges) // 2
        self.indices = [idx for _, idx in edges]
        self.ops = nn.ModuleList(
            make_op(name, C, 2 if reduction and idx < 2 else 1, affine=True) for name, idx in edges
        )
        self.multiplier = len(self.concat)

    def forward(self, s0: Tensor, s1: Tensor, drop_prob: float) -> Tensor:
        states = [self.preprocess0(s0), self.preprocess1(s1)]
        for i in range(self.steps):
            s: Tensor | None = None
            for k in (2 * i, 2 * i + 1):
                op = self.ops[k]
                h = op(states[self.indices[k]])
                if self.training and drop_prob > 0 and not isinstance(op, Identity):
                    h = drop_path(h, drop_prob)
                s = h if s is None else s + h
            assert s is not None
            states.append(s)
        return torch.cat([states[i] for i in self.concat], dim=1)


class AuxiliaryHead(nn.Module):
    """DARTS's auxiliary classifier, made size-agnostic.

    ReLU, average pooling to 2x2 (DARTS's 5x5 stride-3 pooling when the map is at least 5
    pixels, then adaptive pooling to exactly 2x2, which is a no-op for DARTS's 8x8 maps),
    1x1 conv to 128, BN, ReLU, 2x2 conv to 768, BN, ReLU, linear.
    """

    def __init__(self, C: int, num_classes: int) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(C, 128, 1, bias=False),
            nn.BatchNorm2d(128),
            nn.ReLU(inplace=True),
            nn.Conv2d(128, 768, 2, bias=False),
            nn.BatchNorm2d(768),
            nn.ReLU(inplace=True),
        )
        self.classifier = nn.Linear(768, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(x)
        if min(x.shape[-2:]) >= 5:
            x = F.avg_pool2d(x, 5, stride=3, padding=0, count_include_pad=False)
        x = F.adaptive_avg_pool2d(x, 2)  # (B, C, 2, 2)
        x = self.features(x)  # (B, 768, 1, 1)
        return self.classifier(x.flatten(1))


class NetworkFromGenotype(nn.Module):
    """The evaluation network for a genotype.

    ``forward(x)`` returns logits (B, num_classes); ``forward_aux(x)`` returns
    ``(logits, aux_logits)`` with ``aux_logits`` None when ``auxiliary`` is off. Drop path is
    active in training mode with probability ``self.drop_path_prob`` (the training loop ramps it).
    """

    def __init__(
        self,
        genotype: Genotype,
        C: int = 36,
        num_classes: int = 10,
        layers: int = 20,
        in_channels: int = 3,
        auxiliary: bool = False,
        drop_path_prob: float = 0.0,
        stem: StemKind = "cifar",
        stem_multiplier: int = 3,
    ) -> None:
        super().__init__()
        self.genotype = genotype
        self.drop_path_prob = drop_path_prob
        self.aux_index = 2 * layers // 3
        s = build_stem(stem, in_channels, C, stem_multiplier)
        self.stem = s.module
        C_pp, C_p, reduction_prev = s.C_prev_prev, s.C_prev, s.reduction_prev
        C_curr = C
        reductions = reduction_indices(layers)
        self.cells = nn.ModuleList()
        C_aux = C_p
        for i in range(layers):
            reduction = i in reductions
            if reduction:
                C_curr *= 2
            cell = Cell(genotype, C_pp, C_p, C_curr, reduction, reduction_prev)
            self.cells.append(cell)
            reduction_prev = reduction
            C_pp, C_p = C_p, cell.multiplier * C_curr
            if i == self.aux_index:
                C_aux = C_p
        self.auxiliary_head = AuxiliaryHead(C_aux, num_classes) if auxiliary else None
        self.global_pooling = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(C_p, num_classes)

    def forward_aux(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """x: (B, in_channels, H, W) -> (logits, auxiliary logits or None), each (B, num_classes)."""
        aux: Tensor | None = None
        s0, s1 = self.stem(x)
        for i, cell in enumerate(self.cells):
            s0, s1 = s1, cell(s0, s1, self.drop_path_prob)
            if i == self.aux_index and self.auxiliary_head is not None:
                aux = self.auxiliary_head(s1)
        logits = self.classifier(self.global_pooling(s1).flatten(1))
        return logits, aux

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, in_channels, H, W) -> logits (B, num_classes)."""
        return self.forward_aux(x)[0]
