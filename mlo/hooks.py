"""Hooks: what the engine calls before each round, after each step and after each round (progress, logging, checkpoints)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor

if TYPE_CHECKING:
    from .engine import Engine

__all__ = ["Hook"]


class Hook:
    """Subclass and override what you need; the engine calls every hook in order."""

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
