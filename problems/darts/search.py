"""The DARTS search supernet: mixed operations, search cells, and `SuperNet.forward(x, arch)`.

The architecture is not a submodule: `forward` takes it (an `Architecture`, or the
`ArchWeights` it returns), so the supernet weights and the architecture can live on different
optimization levels. Options of the same classes give the DARTS variants:

- PC-DARTS partial channels (``pc_k=K``): each mixed op sees ``C // K`` channels, the others
  bypass it (max-pooled at stride 2), then channels are shuffled in K groups.
- PC-DARTS edge normalisation (``edge_norm=True``): each node's incoming edges are weighted by
  the architecture's per-node softmax edge weights.
- P-DARTS pruning (``op_mask``): only the ops that remain are built and run.

The `none` op is never computed: its output is zero whatever its weight, so skipping it changes
neither the value nor any gradient.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .architecture import Architecture, ArchWeights, OpMask, full_mask, num_edges
from .ops import PRIMITIVES, FactorizedReduce, ReLUConvBN, Zero, make_op
from .stem import StemKind, build_stem, reduction_indices

__all__ = ["MixedOp", "SearchCell", "SuperNet", "channel_shuffle"]

_NONE = PRIMITIVES.index("none")


def channel_shuffle(x: Tensor, groups: int) -> Tensor:
    """Interleave channels from ``groups`` equal groups (ShuffleNet / PC-DARTS)."""
    b, c, h, w = x.shape
    return x.view(b, groups, c // groups, h, w).transpose(1, 2).reshape(b, c, h, w)


class MixedOp(nn.Module):
    """Weighted sum of candidate ops on one edge: ``sum_k w[k] * op_k(x)``.

    ``kept``: indices into PRIMITIVES of the ops that remain on this edge (default: all).
    ``pc_k``: PC-DARTS channel proportion 1/K (1: plain DARTS).
    """

    def __init__(self, C: int, stride: int, pc_k: int = 1, kept: Sequence[int] | None = None) -> None:
        super().__init__()
        if C % pc_k:
            raise ValueError(f"pc_k={pc_k} must divide the channel count C={C}")
        self.stride = stride
        self.pc_k = pc_k
        self.C_op = C // pc_k
        indices = list(range(len(PRIMITIVES))) if kept is None else sorted(int(k) for k in kept)
        self.op_indices = [k for k in indices if k != _NONE]
        self.ops = nn.ModuleList()
        for k in self.op_indices:
            name = PRIMITIVES[k]
            op = make_op(name, self.C_op, stride, affine=False)
            if "pool" in name:
                op = nn.Sequential(op, nn.BatchNorm2d(self.C_op, affine=False))
            self.ops.append(op)
        self.zero = Zero(stride)
        # PC-DARTS: channels that bypass the ops still need the reduction's resolution.
        self.bypass_pool = nn.MaxPool2d(2, 2, ceil_mode=True) if pc_k > 1 and stride == 2 else None

    def forward(self, x: Tensor, weights: Tensor) -> Tensor:
        """x: (B, C, H, W); weights: (len(PRIMITIVES),). Returns (B, C, H/stride, W/stride)."""
        if self.pc_k > 1:
            x, bypass = x[:, : self.C_op], x[:, self.C_op :]
        out: Tensor | None = None
        for k, op in zip(self.op_indices, self.ops):
            y = weights[k] * op(x)
            out = y if out is None else out + y
        if out is None:  # only `none` remains on this edge
            out = self.zero(x)
        if self.pc_k > 1:
            if self.bypass_pool is not None:
                bypass = self.bypass_pool(bypass)
            out = channel_shuffle(torch.cat([out, bypass], dim=1), self.pc_k)
        return out


class SearchCell(nn.Module):
    """A DARTS search cell: two inputs, ``steps`` nodes, each summing mixed ops over all earlier states."""

    def __init__(
        self,
        steps: int,
        multiplier: int,
        C_prev_prev: int,
        C_prev: int,
        C: int,
        reduction: bool,
        reduction_prev: bool,
        pc_k: int = 1,
        op_mask: Tensor | None = None,
    ) -> None:
        super().__init__()
        self.reduction = reduction
        self.steps = steps
        self.multiplier = multiplier
        if reduction_prev:
            self.preprocess0: nn.Module = FactorizedReduce(C_prev_prev, C, affine=False)
        else:
            self.preprocess0 = ReLUConvBN(C_prev_prev, C, 1, 1, 0, affine=False)
        self.preprocess1 = ReLUConvBN(C_prev, C, 1, 1, 0, affine=False)
        self.edges = nn.ModuleList()
        e = 0
        for i in range(steps):
            for j in range(2 + i):
                stride = 2 if reduction and j < 2 else 1
                kept = None if op_mask is None else op_mask[e].nonzero().flatten().tolist()
                self.edges.append(MixedOp(C, stride, pc_k, kept))
                e += 1

    def forward(
        self, s0: Tensor, s1: Tensor, weights: Tensor, edge_weights: Tensor | None = None
    ) -> Tensor:
        """weights: (edges, len(PRIMITIVES)); edge_weights: (edges,) or None.

        Returns (B, multiplier * C, H', W')."""
        states = [self.preprocess0(s0), self.preprocess1(s1)]
        e = 0
        for _ in range(self.steps):
            s: Tensor | None = None
            for h in states:
                y = self.edges[e](h, weights[e])
                if edge_weights is not None:
                    y = edge_weights[e] * y
                s = y if s is None else s + y
                e += 1
            assert s is not None
            states.append(s)
        return torch.cat(states[-self.multiplier :], dim=1)


class SuperNet(nn.Module):
    """The DARTS search network: stem, ``layers`` search cells, global pooling, linear classifier.

    ``forward(x, arch)`` with x of shape (B, in_channels, H, W) returns logits (B, num_classes).
    Works from 1x8x8 (CIFAR stem, reductions never go below 1x1) to 3x224x224 (``stem="imagenet"``;
    see `stem_for`). BatchNorm in the cells is non-affine, as DARTS.

    ``edge_norm`` must match the architecture (an `Architecture(edge_norm=True)` carries the
    edge logits); ``op_mask`` (P-DARTS) builds only the ops that remain, and the architecture
    must not give weight to any other.
    """

    def __init__(
        self,
        C: int = 16,
        num_classes: int = 10,
        layers: int = 8,
        in_channels: int = 3,
        steps: int = 4,
        multiplier: int = 4,
        stem_multiplier: int = 3,
        pc_k: int = 1,
        edge_norm: bool = False,
        op_mask: OpMask | None = None,
        stem: StemKind = "cifar",
    ) -> None:
        super().__init__()
        if pc_k < 1 or C % pc_k:
            raise ValueError(f"pc_k must be a positive divisor of C={C}, got {pc_k}")
        self.C = C
        self.num_classes = num_classes
        self.layers = layers
        self.steps = steps
        self.multiplier = multiplier
        self.pc_k = pc_k
        self.edge_norm = edge_norm
        mask = op_mask if op_mask is not None else full_mask(steps)
        E = num_edges(steps)
        for m in mask:
            if tuple(m.shape) != (E, len(PRIMITIVES)):
                raise ValueError(f"op mask has shape {tuple(m.shape)}, expected {(E, len(PRIMITIVES))}")
        self.register_buffer("mask_normal", mask.normal.clone().bool(), persistent=False)
        self.register_buffer("mask_reduce", mask.reduce.clone().bool(), persistent=False)
        self._pruned = not bool(mask.normal.all() and mask.reduce.all())

        s = build_stem(stem, in_channels, C, stem_multiplier)
        self.stem = s.module
        C_pp, C_p, reduction_prev = s.C_prev_prev, s.C_prev, s.reduction_prev
        C_curr = C
        reductions = reduction_indices(layers)
        self.cells = nn.ModuleList()
        for i in range(layers):
            reduction = i in reductions
            if reduction:
                C_curr *= 2
            cell_mask = mask.reduce if reduction else mask.normal
            self.cells.append(
                SearchCell(steps, multiplier, C_pp, C_p, C_curr, reduction, reduction_prev, pc_k, cell_mask)
            )
            reduction_prev = reduction
            C_pp, C_p = C_p, multiplier * C_curr
        self.global_pooling = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(C_p, num_classes)

    def new_architecture(
        self, generator: torch.Generator | None = None, init_scale: float = 1e-3
    ) -> Architecture:
        """An `Architecture` matching this supernet (steps, multiplier, edge_norm, op mask)."""
        return Architecture(
            self.steps,
            self.multiplier,
            self.edge_norm,
            OpMask(self.mask_normal.cpu(), self.mask_reduce.cpu()),
            init_scale,
            generator,
        )

    def _check(self, arch: Architecture | ArchWeights) -> ArchWeights:
        w = arch() if isinstance(arch, Architecture) else arch
        if (w.normal_edges is not None) != self.edge_norm:
            have = "has" if w.normal_edges is not None else "has no"
            raise ValueError(
                f"the architecture {have} edge weights but the supernet was built with "
                f"edge_norm={self.edge_norm}"
            )
        if self._pruned:
            extra = (w.normal.detach() != 0) & ~self.mask_normal
            extra |= (w.reduce.detach() != 0) & ~self.mask_reduce
            if bool(extra.any()):
                raise ValueError(
                    "the architecture gives weight to ops this supernet has pruned; build the "
                    "supernet with the architecture's op_mask"
                )
        return w

    def forward(self, x: Tensor, arch: Architecture | ArchWeights) -> Tensor:
        """x: (B, in_channels, H, W) -> logits (B, num_classes)."""
        w = self._check(arch)
        s0, s1 = self.stem(x)
        for cell in self.cells:
            if cell.reduction:
                s0, s1 = s1, cell(s0, s1, w.reduce, w.reduce_edges)
            else:
                s0, s1 = s1, cell(s0, s1, w.normal, w.normal_edges)
        out = self.global_pooling(s1).flatten(1)  # (B, C_prev)
        return self.classifier(out)
