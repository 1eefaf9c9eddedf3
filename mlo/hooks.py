"""Hooks: what the engine calls before each round, after each step and after each round (progress, logging, checkpoints)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import Tensor

from .autodiff import Tensors

if TYPE_CHECKING:
    from .engine import Engine

__all__ = ["Hook"]


class Hook:
    """Subclass and override what you need; the engine calls every hook in order.

    A hook with state that a resumed run needs returns it from ``state_dict`` (values
    ``torch.load(weights_only=True)`` reads: tensors, numbers, strings, lists, dicts) and takes it
    back in ``load_state_dict``; `mlo.Engine.state_dict` holds every hook's."""

    def on_run_start(self, engine: "Engine") -> None:
        """When ``Engine.run`` starts."""

    def on_run_end(self, engine: "Engine") -> None:
        """When ``Engine.run`` ends, also when it raises."""

    def on_gradient(self, engine: "Engine", level: str, grads: Tensors) -> None:
        """Before ``level``'s gradient transform and optimizer step: its (hyper)gradient, one
        tensor per trainable parameter. Do not modify it."""

    def before_round(self, engine: "Engine") -> None:
        """Before any level steps in a round; ``engine.round`` is the number of rounds done.
        For example: sample this round's tasks, or change a level's data."""

    def on_step(self, engine: "Engine", level: str, loss: Tensor) -> None:
        """After an optimizer step of ``level``; ``loss`` is its (detached) loss at that step.

        For a level with lowers, that is its loss where its hypergradient was evaluated: a lower
        level served by a look-ahead estimator (``unroll``, ``finite_difference``) is at its
        look-ahead parameters there, not at its current ones (see ``Engine.step``)."""

    def on_round(self, engine: "Engine") -> None:
        """After every level has stepped; ``engine.round`` is the number of rounds done."""

    def state_dict(self) -> Any:
        """What a resumed run needs; ``None`` (the default): nothing."""
        return None

    def load_state_dict(self, state: Any) -> None:
        """Take back what ``state_dict`` returned."""
