"""Data-parallel collectives: the one place mlo talks to ``torch.distributed``.

When a process group is initialized (``torchrun`` plus ``torch.distributed.init_process_group``
in the script), every rank runs the same program on its shard of each level's data, and the
engine averages across ranks at the few places where derivatives are formed. Without a process
group (or with one rank) every function here is the identity, and costs nothing.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["active", "rank", "world_size", "is_main"]


def active() -> bool:
    """Whether a process group with more than one rank is initialized."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    """The number of ranks (1 without a process group)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main() -> bool:
    """Whether this process is rank 0: the one that writes results, logs and plots."""
    return rank() == 0
