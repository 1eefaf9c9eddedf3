"""P-DARTS progressive search: deeper supernets stage by stage, pruning the weakest ops per edge.

A search loop written elsewhere uses it like this::

    stages = PDARTS_STAGES                      # ((5, 8), (11, 5), (17, 3)) at full scale
    arch = Architecture()                       # all 8 ops on every edge
    net = pdarts_supernet(stages[0], arch.op_mask, C=16, num_classes=10)
    ...search stage 0 (weights of net, logits of arch)...
    for stage in stages[1:]:
        arch, mask = pdarts_next_stage(arch, stage)   # keep the stage's number of ops per edge
        net = pdarts_supernet(stage, mask, C=16, num_classes=10)
        ...search this stage...
    genotype = arch.genotype(max_skip=2)       # P-DARTS keeps at most 2 skip-connections

As P-DARTS, each stage starts from freshly initialised supernet weights and architecture logits
(``reinit=False`` carries the surviving logits over instead). Not included: P-DARTS's dropout on
skip-connections during search.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from mlo.errors import ConfigError

from .architecture import Architecture, OpMask
from .search import SuperNet

__all__ = ["Stage", "PDARTS_STAGES", "prune_mask", "pdarts_next_stage", "pdarts_supernet"]


class Stage(NamedTuple):
    """One P-DARTS stage: number of cells in the supernet and ops kept per edge."""

    layers: int
    ops_per_edge: int


PDARTS_STAGES: tuple[Stage, ...] = (Stage(5, 8), Stage(11, 5), Stage(17, 3))


@torch.no_grad()
def prune_mask(arch: Architecture, keep: int) -> OpMask:
    """The op mask keeping, on every edge, the ``keep`` ops of highest weight among those remaining.

    `none` competes like any other op (as in P-DARTS's intermediate stages); it is never chosen
    in a genotype anyway. Raises ValueError if ``keep`` is not in 1..(ops remaining on an edge).
    """
    weights = arch()
    masks = []
    for w, m in ((weights.normal, arch.mask_normal), (weights.reduce, arch.mask_reduce)):
        remaining = int(m.sum(dim=1).min())
        if not 1 <= keep <= remaining:
            raise ConfigError(f"cannot keep {keep} ops per edge: some edge has only {remaining} left")
        score = w.detach().masked_fill(~m, float("-inf"))
        top = score.topk(keep, dim=1).indices
        new = torch.zeros_like(m).scatter_(1, top, True)
        masks.append(new)
    return OpMask(masks[0], masks[1])


def pdarts_next_stage(
    arch: Architecture,
    stage: Stage | tuple[int, int],
    reinit: bool = True,
    generator: torch.Generator | None = None,
) -> tuple[Architecture, OpMask]:
    """Prune ``arch`` to ``stage.ops_per_edge`` ops per edge; return the next stage's architecture and mask.

    The new `Architecture` has the same steps, multiplier and edge normalisation, the pruned
    mask, and fresh logits (``reinit=True``, as P-DARTS) or the old ones (``reinit=False``).
    """
    stage = Stage(*stage)
    mask = prune_mask(arch, stage.ops_per_edge)
    new = Architecture(arch.steps, arch.multiplier, arch.edge_norm, mask, generator=generator)
    new = new.to(arch.alphas_normal.device)
    if not reinit:
        new.load_state_dict({**arch.state_dict(), "mask_normal": mask.normal, "mask_reduce": mask.reduce})
    return new, mask


def pdarts_supernet(stage: Stage | tuple[int, int], op_mask: OpMask, **supernet_kwargs: Any) -> SuperNet:
    """The supernet for a stage: ``stage.layers`` cells, only the ops left in ``op_mask``.

    Other keywords (C, num_classes, in_channels, pc_k, edge_norm, stem, ...) go to `SuperNet`.
    """
    stage = Stage(*stage)
    return SuperNet(layers=stage.layers, op_mask=op_mask, **supernet_kwargs)
