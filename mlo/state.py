"""`LevelState`: the runtime state of one level, held by the Engine in one place.

A `mlo.Problem` declares a level (module, optimizer, data, loss, steps); what changes while a
program runs lives here: the batch in use and the position in the data (`mlo.streams.Stream`),
the gradient of the last step where an estimator reads it (``sama`` under Adam), the gradient
transform's state and the fp16 gradient scaler. The Engine passes what the hypergradient rule
needs from it explicitly (`mlo.hypergradient`); nothing reads it behind the Engine's back.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .streams import Stream

__all__ = ["LevelState"]


@dataclass
class LevelState:
    """What the Engine holds for one level between its steps."""

    #: the batch in use and where the level is in its data
    stream: Stream
    #: whether an estimator of an edge into this level reads ``last_gradient``
    keep_gradient: bool = False
    #: the gradient handed to the optimizer at the level's last step (kept where read, else None)
    last_gradient: tuple[Tensor, ...] | None = None
    #: the state of the level's gradient transform (``Problem.transform``), if it has one
    transform: Any = None
    #: the level's gradient scaler (fp16), if it has one
    scaler: torch.amp.GradScaler | None = None

    @property
    def batch(self) -> Any:
        """The batch the level is on (the last it drew; ``None`` before its first)."""
        return self.stream.batch
