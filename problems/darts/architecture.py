"""Architecture parameters of a DARTS cell pair and the rule that turns them into a genotype.

The `Architecture` is its own module, apart from the supernet: its parameters belong to another
optimization level. Calling it returns `ArchWeights` (softmax op weights, and with PC-DARTS edge
normalisation the per-node softmax edge weights), which `SuperNet.forward(x, arch)` consumes.
Because the weights are a plain function of the parameters, ``torch.func.functional_call(arch,
params, ())`` gives weights for any parameter values.

Edges are numbered node by node: node ``i`` (0-based) has incoming edges from inputs
``0 .. i + 1``; with 4 nodes that is 2 + 3 + 4 + 5 = 14 edges. Op weights are indexed by
`PRIMITIVES`. An op mask (P-DARTS pruning) marks the ops still present on each edge; pruned ops
get weight 0 (they are left out of the softmax) and are never chosen in the genotype.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from mlo.errors import ConfigError

from .genotype import Genotype, GenotypeError
from .ops import PRIMITIVES

__all__ = [
    "Architecture",
    "ArchWeights",
    "OpMask",
    "num_edges",
    "full_mask",
    "edge_softmax",
    "derive_genotype",
]

_NONE = PRIMITIVES.index("none")
_SKIP = PRIMITIVES.index("skip_connect")


class OpMask(NamedTuple):
    """Which ops remain on each edge: two bool tensors of shape (edges, len(PRIMITIVES))."""

    normal: Tensor
    reduce: Tensor


class ArchWeights(NamedTuple):
    """What a supernet reads from an architecture.

    ``normal``/``reduce``: (edges, len(PRIMITIVES)) op weights; each row sums to 1 over the
    ops that remain and is 0 on pruned ones. ``normal_edges``/``reduce_edges``: (edges,) edge
    weights, a softmax over the incoming edges of each node (PC-DARTS edge normalisation), or
    None when edge normalisation is off.
    """

    normal: Tensor
    reduce: Tensor
    normal_edges: Tensor | None = None
    reduce_edges: Tensor | None = None


def num_edges(steps: int) -> int:
    """Number of edges in a cell with ``steps`` intermediate nodes (14 for 4)."""
    return sum(2 + i for i in range(steps))


def full_mask(steps: int = 4) -> OpMask:
    """A mask keeping every op on every edge."""
    m = torch.ones(num_edges(steps), len(PRIMITIVES), dtype=torch.bool)
    return OpMask(m, m.clone())


def edge_softmax(betas: Tensor, steps: int) -> Tensor:
    """Softmax of edge logits (edges,) within each node's group of incoming edges."""
    out, start = [], 0
    for i in range(steps):
        end = start + 2 + i
        out.append(betas[start:end].softmax(dim=0))
        start = end
    return torch.cat(out)


def _masked_softmax(logits: Tensor, mask: Tensor) -> Tensor:
    if bool(mask.all()):
        return logits.softmax(dim=-1)
    return logits.masked_fill(~mask, float("-inf")).softmax(dim=-1)


def _derive_cell(
    weights: Tensor, steps: int, edge_weights: Tensor | None, allowed: Tensor
) -> tuple[list[tuple[str, int]], list[int]]:
    """DARTS rule for one cell. Returns the genes and the edge number of each gene."""
    w = weights.detach().double().cpu()
    if edge_weights is not None:
        w = w * edge_weights.detach().double().cpu()[:, None]
    allowed = allowed.cpu().clone()
    allowed[:, _NONE] = False
    score = w.masked_fill(~allowed, float("-inf"))
    genes: list[tuple[str, int]] = []
    edge_ids: list[int] = []
    start = 0
    for i in range(steps):
        n_in = 2 + i
        strength = score[start : start + n_in].max(dim=1).values
        candidates = [j for j in range(n_in) if strength[j] > float("-inf")]
        if len(candidates) < 2:
            raise GenotypeError(
                f"node {i}: fewer than two incoming edges keep an operation other than 'none'; "
                "cannot derive a genotype (check the op mask)"
            )
        # Strongest first; Python's sort is stable, so ties go to the lower input index.
        top2 = sorted(candidates, key=lambda j: -float(strength[j]))[:2]
        for j in top2:
            k = int(score[start + j].argmax())
            genes.append((PRIMITIVES[k], j))
            edge_ids.append(start + j)
        start += n_in
    return genes, edge_ids


def derive_genotype(
    weights: ArchWeights,
    steps: int = 4,
    multiplier: int = 4,
    op_mask: OpMask | None = None,
    max_skip: int | None = None,
) -> Genotype:
    """The discrete genotype by the DARTS rule.

    For each intermediate node: rank its incoming edges by their strongest op other than
    `none` (times the edge weight when edge normalisation is on, as PC-DARTS), keep the top
    two, and on each keep that strongest op. Pruned ops (``op_mask``) are never chosen.

    ``max_skip`` (P-DARTS uses 2): while the normal cell has more skip-connections than this,
    forbid `skip_connect` on the chosen skip edge with the smallest skip weight and derive again.
    (P-DARTS ranks all edges whose best op is a skip; we only consider the chosen ones, which
    is where the cap matters.)
    """
    E = num_edges(steps)
    for name, w in (("normal", weights.normal), ("reduce", weights.reduce)):
        if tuple(w.shape) != (E, len(PRIMITIVES)):
            raise ConfigError(
                f"{name} weights have shape {tuple(w.shape)}, expected {(E, len(PRIMITIVES))} "
                f"for {steps} steps"
            )
    mask = op_mask if op_mask is not None else full_mask(steps)
    concat = tuple(range(2 + steps - multiplier, steps + 2))

    allowed_normal = mask.normal.clone().bool()
    while True:
        normal, ids = _derive_cell(weights.normal, steps, weights.normal_edges, allowed_normal)
        skips = [e for (op, _), e in zip(normal, ids) if op == "skip_connect"]
        if max_skip is None or len(skips) <= max_skip:
            break
        w = weights.normal.detach()
        if weights.normal_edges is not None:
            w = w * weights.normal_edges.detach()[:, None]
        weakest = min(skips, key=lambda e: float(w[e, _SKIP]))
        allowed_normal[weakest, _SKIP] = False
    reduce, _ = _derive_cell(weights.reduce, steps, weights.reduce_edges, mask.reduce.bool())
    return Genotype(normal=tuple(normal), normal_concat=concat, reduce=tuple(reduce), reduce_concat=concat)


class Architecture(nn.Module):
    """Architecture logits of a DARTS cell pair (normal and reduction).

    Parameters: ``alphas_normal``, ``alphas_reduce`` of shape (edges, len(PRIMITIVES)),
    initialised as ``init_scale * randn``; with ``edge_norm=True`` (PC-DARTS) also
    ``betas_normal``, ``betas_reduce`` of shape (edges,). Buffers ``mask_normal``,
    ``mask_reduce`` (bool) hold the ops that remain on each edge (all of them unless given).
    """

    mask_normal: Tensor
    mask_reduce: Tensor
    alphas_normal: nn.Parameter
    alphas_reduce: nn.Parameter
    betas_normal: nn.Parameter | None
    betas_reduce: nn.Parameter | None

    def __init__(
        self,
        steps: int = 4,
        multiplier: int = 4,
        edge_norm: bool = False,
        op_mask: OpMask | None = None,
        init_scale: float = 1e-3,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        if steps < 1 or not 1 <= multiplier <= steps:
            raise ConfigError(f"need steps >= 1 and 1 <= multiplier <= steps, got {steps}, {multiplier}")
        self.steps = steps
        self.multiplier = multiplier
        self.edge_norm = edge_norm
        E, P = num_edges(steps), len(PRIMITIVES)
        mask = op_mask if op_mask is not None else full_mask(steps)
        for name, m in zip(("normal", "reduce"), mask):
            if tuple(m.shape) != (E, P):
                raise ConfigError(f"op mask '{name}' has shape {tuple(m.shape)}, expected {(E, P)}")
            if not bool(m.bool().any(dim=1).all()):
                raise ConfigError(f"op mask '{name}' leaves an edge without any operation")
        self.register_buffer("mask_normal", mask.normal.clone().bool())
        self.register_buffer("mask_reduce", mask.reduce.clone().bool())

        def init(*shape: int) -> nn.Parameter:
            return nn.Parameter(init_scale * torch.randn(*shape, generator=generator))

        self.alphas_normal = init(E, P)
        self.alphas_reduce = init(E, P)
        if edge_norm:
            self.betas_normal = init(E)
            self.betas_reduce = init(E)
        else:
            self.register_parameter("betas_normal", None)
            self.register_parameter("betas_reduce", None)

    @property
    def op_mask(self) -> OpMask:
        """The ops that remain on each edge (copies)."""
        return OpMask(self.mask_normal.clone(), self.mask_reduce.clone())

    def forward(self) -> ArchWeights:
        """Softmax op weights (pruned ops 0) and, with edge normalisation, edge weights."""
        normal = _masked_softmax(self.alphas_normal, self.mask_normal)
        reduce = _masked_softmax(self.alphas_reduce, self.mask_reduce)
        if self.betas_normal is None or self.betas_reduce is None:
            return ArchWeights(normal, reduce)
        return ArchWeights(
            normal,
            reduce,
            edge_softmax(self.betas_normal, self.steps),
            edge_softmax(self.betas_reduce, self.steps),
        )

    def weights(self) -> ArchWeights:
        """Same as calling the module."""
        return self()

    @torch.no_grad()
    def genotype(self, max_skip: int | None = None) -> Genotype:
        """The discrete genotype by the DARTS rule (see `derive_genotype`)."""
        return derive_genotype(self(), self.steps, self.multiplier, self.op_mask, max_skip)

    def extra_repr(self) -> str:
        kept = int(self.mask_normal.sum()), int(self.mask_reduce.sum())
        return f"steps={self.steps}, edge_norm={self.edge_norm}, ops kept (normal, reduce)={kept}"
