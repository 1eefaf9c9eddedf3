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
neither the value nor any gradient. For speed, the edges leaving one state are computed together
(see `MixedOp`); the function is that of DARTS's per-edge mixed ops.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mlo.errors import ConfigError

from .architecture import Architecture, ArchWeights, OpMask, full_mask, num_edges
from .ops import PRIMITIVES, BatchNorm2d, DilConv, FactorizedReduce, ReLUConvBN, SepConv, Zero, make_op, use_reference
from .stem import StemKind, build_stem, reduction_indices

__all__ = ["MixedOp", "SearchCell", "SuperNet", "channel_shuffle"]

_NONE = PRIMITIVES.index("none")


def channel_shuffle(x: Tensor, groups: int) -> Tensor:
    """Interleave channels from ``groups`` equal groups (ShuffleNet / PC-DARTS)."""
    b, c, h, w = x.shape
    return x.view(b, groups, c // groups, h, w).transpose(1, 2).reshape(b, c, h, w)


class MixedOp(nn.Module):
    """The mixed operations on the ``n_edges`` edges that leave one state, computed together.

    Edge ``e`` computes ``sum_k w[e, k] * op_{e,k}(x)`` over the candidate ops ``k`` it keeps,
    each edge with its own op weights (DARTS's MixedOp is the case ``n_edges=1``). All edges
    read the same input at the same stride, so each parametric op runs once as ``n_edges``
    grouped copies (`make_op(copies=...)`), and the parameter-free ops (pooling with its
    non-affine BatchNorm, identity) run once and are shared: their outputs are the same on
    every edge. The result equals that of separate per-edge ops, with far fewer kernels.

    ``kept``: per edge, indices into PRIMITIVES of the ops that remain (default: all).
    ``pc_k``: PC-DARTS channel proportion 1/K (1: plain DARTS).
    ``fast``: the parametric ops (which all begin with a ReLU) share one ReLU of the input instead
    of each applying its own to the repeated input (``fast=False``: each op runs whole, the
    reference; `ops.use_reference` switches it with the ops' own fast paths).
    """

    def __init__(
        self,
        C: int,
        stride: int,
        n_edges: int = 1,
        pc_k: int = 1,
        kept: Sequence[Sequence[int]] | None = None,
        fast: bool = True,
    ) -> None:
        super().__init__()
        self.fast = fast
        if C % pc_k:
            raise ConfigError(f"pc_k={pc_k} must divide the channel count C={C}")
        if kept is not None and len(kept) != n_edges:
            raise ConfigError(f"kept lists {len(kept)} edges, expected {n_edges}")
        self.C = C
        self.stride = stride
        self.n_edges = n_edges
        self.pc_k = pc_k
        self.C_op = C // pc_k
        all_ops = list(range(len(PRIMITIVES)))
        keep_sets = [set(all_ops) if kept is None else {int(k) for k in kept[e]} for e in range(n_edges)]
        self.op_indices: list[int] = []  # primitive index of each entry of self.ops
        self.shared: list[bool] = []  # computed once for all edges (parameter-free)
        self.ops = nn.ModuleList()
        for k in all_ops:
            edges = [e for e in range(n_edges) if k in keep_sets[e]]
            name = PRIMITIVES[k]
            if k == _NONE or not edges:
                continue
            if "pool" in name:
                op: nn.Module = nn.Sequential(
                    make_op(name, self.C_op, stride, affine=False), BatchNorm2d(self.C_op, affine=False)
                )
                shared = True
            elif name == "skip_connect" and stride == 1:
                op, shared = make_op(name, self.C_op, stride, affine=False), True
            else:
                op, shared = make_op(name, self.C_op, stride, affine=False, copies=len(edges)), False
            self.op_indices.append(k)
            self.shared.append(shared)
            self.ops.append(op)
            self.register_buffer(f"edges_{k}", torch.tensor(edges, dtype=torch.long), persistent=False)
        self.all_edges = [bool(len(getattr(self, f"edges_{k}")) == n_edges) for k in self.op_indices]
        self.zero = Zero(stride)  # for edges where only `none` remains
        # PC-DARTS: channels that bypass the ops still need the reduction's resolution.
        self.bypass_pool = nn.MaxPool2d(2, 2, ceil_mode=True) if pc_k > 1 and stride == 2 else None

    def forward(self, x: Tensor, weights: Tensor) -> Tensor:
        """x: (B, C, H, W); weights: (n_edges, len(PRIMITIVES)). Returns (B, n_edges, C, H', W')."""
        B = x.shape[0]
        n = self.n_edges
        if self.pc_k > 1:
            x, bypass = x[:, : self.C_op], x[:, self.C_op :]
        # Fast: every parametric op begins with a ReLU, so they share one ReLU of x (then skip theirs).
        source = F.relu(x) if self.fast else x
        stacked: dict[int, Tensor] = {}  # copies -> source repeated that many times along channels
        grids: dict[int, Tensor] = {}  # copies -> its even pixels, shared by the stride-2 ops that read only them
        out: Tensor | None = None
        for k, op, shared, full in zip(self.op_indices, self.ops, self.shared, self.all_edges):
            edges: Tensor = getattr(self, f"edges_{k}")
            m = len(edges)
            if shared:
                y = op(x).unsqueeze(1)  # (B, 1, C_op, H', W'), the same on every edge
            else:
                if m not in stacked:
                    stacked[m] = source if m == 1 else source.repeat(1, m, 1, 1)
                if self.fast and self.stride == 2 and isinstance(op, (DilConv, FactorizedReduce)):
                    if m not in grids:
                        grids[m] = stacked[m][:, :, ::2, ::2]
                    y = op.activated(stacked[m], grids[m])
                elif self.fast:
                    assert isinstance(op, (SepConv, DilConv, FactorizedReduce))
                    y = op.activated(stacked[m])
                else:
                    y = op(stacked[m])
                y = y.view(B, m, self.C_op, y.shape[-2], y.shape[-1])  # (B, m, C_op, H', W')
            if full:
                w = weights[:, k].reshape(1, n, 1, 1, 1)
                if out is None:
                    out = y * w
                else:
                    out = torch.addcmul(out, y, w)
            else:
                w = weights[edges, k].reshape(1, m, 1, 1, 1)
                y = (y * w).expand(B, m, *y.shape[2:])
                if out is None:
                    out = y.new_zeros(B, n, *y.shape[2:])
                out = out.index_add(1, edges, y)
        if out is None:  # only `none` remains on these edges
            z = self.zero(x)
            out = z.unsqueeze(1).expand(B, n, *z.shape[1:])
        if self.pc_k > 1:
            if self.bypass_pool is not None:
                bypass = self.bypass_pool(bypass)
            bypass = bypass.unsqueeze(1).expand(B, n, *bypass.shape[1:])
            out = torch.cat([out, bypass], dim=2)  # (B, n, C, H', W')
            H, W = out.shape[-2:]
            out = channel_shuffle(out.reshape(B * n, self.C, H, W), self.pc_k).view(B, n, self.C, H, W)
        return out


class SearchCell(nn.Module):
    """A DARTS search cell: two inputs, ``steps`` nodes, each summing mixed ops over all earlier states.

    Edge numbering as `Architecture`: node ``i`` reads states ``0 .. i + 1`` through edges
    ``offset_i + j``. The edges leaving state ``j`` (to nodes ``max(0, j - 1) .. steps - 1``)
    form one `MixedOp`, run as soon as state ``j`` exists.
    """

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
        offsets = [sum(2 + t for t in range(i)) for i in range(steps)]
        self.groups = nn.ModuleList()
        self.targets: list[list[int]] = []  # per source state: the nodes it feeds
        for j in range(steps + 1):
            nodes = list(range(max(0, j - 1), steps))
            edge_ids = [offsets[i] + j for i in nodes]
            kept = None if op_mask is None else [op_mask[e].nonzero().flatten().tolist() for e in edge_ids]
            stride = 2 if reduction and j < 2 else 1
            self.groups.append(MixedOp(C, stride, len(nodes), pc_k, kept))
            self.targets.append(nodes)
            self.register_buffer(f"edge_ids_{j}", torch.tensor(edge_ids, dtype=torch.long), persistent=False)

    def forward(
        self, s0: Tensor, s1: Tensor, weights: Tensor, edge_weights: Tensor | None = None
    ) -> Tensor:
        """weights: (edges, len(PRIMITIVES)); edge_weights: (edges,) or None.

        Returns (B, multiplier * C, H', W')."""
        if edge_weights is not None:
            weights = weights * edge_weights[:, None]  # beta_j * alpha_jk, as PC-DARTS
        states = [self.preprocess0(s0), self.preprocess1(s1)]
        incoming: list[list[Tensor]] = [[] for _ in range(self.steps)]

        def run_group(j: int) -> None:  # all edges leaving state j
            rows = weights.index_select(0, getattr(self, f"edge_ids_{j}"))
            out = self.groups[j](states[j], rows)  # (B, n_j, C, H', W')
            for t, node in enumerate(self.targets[j]):
                incoming[node].append(out[:, t])

        run_group(0)
        run_group(1)
        for i in range(self.steps):
            node_out = incoming[i][0]
            for y in incoming[i][1:]:
                node_out = node_out + y
            states.append(node_out)  # state i + 2
            if i + 2 <= self.steps:
                run_group(i + 2)
        return torch.cat(states[-self.multiplier :], dim=1)


class SuperNet(nn.Module):
    """The DARTS search network: stem, ``layers`` search cells, global pooling, linear classifier.

    ``forward(x, arch)`` with x of shape (B, in_channels, H, W) returns logits (B, num_classes).
    Works from 1x8x8 (CIFAR stem, reductions never go below 1x1) to 3x224x224 (``stem="imagenet"``;
    see `stem_for`). BatchNorm in the cells is non-affine, as DARTS.

    ``edge_norm`` must match the architecture (an `Architecture(edge_norm=True)` carries the
    edge logits); ``op_mask`` (P-DARTS) builds only the ops that remain, and the architecture
    must not give weight to any other.

    ``fast=False`` builds the reference: every op computed op by op with PyTorch's own kernels
    (`ops.use_reference`), the same function, parameters and state dict as the default fast one.
    """

    mask_normal: Tensor
    mask_reduce: Tensor

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
        fast: bool = True,
    ) -> None:
        super().__init__()
        if pc_k < 1 or C % pc_k:
            raise ConfigError(f"pc_k must be a positive divisor of C={C}, got {pc_k}")
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
                raise ConfigError(f"op mask has shape {tuple(m.shape)}, expected {(E, len(PRIMITIVES))}")
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
        use_reference(self, not fast)

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
            raise ConfigError(
                f"the architecture {have} edge weights but the supernet was built with "
                f"edge_norm={self.edge_norm}"
            )
        if self._pruned:
            extra = (w.normal.detach() != 0) & ~self.mask_normal
            extra |= (w.reduce.detach() != 0) & ~self.mask_reduce
            if bool(extra.any()):
                raise ConfigError(
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
