"""Gradient transforms: what a level does to its (hyper)gradient before its optimizer steps.

The shape is optax's: a transform is a pair of functions, ``init(params) -> state`` and
``update(grads, state, params) -> (grads, state)``, and transforms compose with `chain`. A level
takes one as ``Problem(..., transform=...)``; the engine keeps its state (part of
``Engine.state_dict``) and applies it to the gradient of every step of that level, after the
non-finite check and before ``optimizer.step()``.

    arch = Problem("architecture", ..., transform=mlo.transforms.clip_by_global_norm(5.0))
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .autodiff import Tensors

__all__ = ["GradientTransform", "chain", "clip_by_global_norm", "identity"]


@dataclass(frozen=True)
class GradientTransform:
    """``init(params) -> state`` and ``update(grads, state, params) -> (grads, state)``.

    ``params`` are the level's trainable parameters (``Problem.parameters()`` order) and
    ``grads`` one tensor per parameter. ``state`` is anything ``torch.save(weights_only=True)``
    can hold (tensors, numbers, lists, dicts), so that checkpoints keep it.
    """

    init: Callable[[Tensors], Any]
    update: Callable[[Tensors, Any, Tensors], tuple[Tensors, Any]]
    name: str = "transform"

    def __repr__(self) -> str:
        return self.name


def identity() -> GradientTransform:
    """Leaves the gradient as it is."""
    return GradientTransform(lambda params: None, lambda grads, state, params: (grads, state), "identity()")


def clip_by_global_norm(max_norm: float) -> GradientTransform:
    """Scale the gradient so that its global L2 norm (over all of the level's parameters) is at
    most ``max_norm``, as ``torch.nn.utils.clip_grad_norm_`` does (DARTS clips at 5)."""
    if isinstance(max_norm, bool) or not isinstance(max_norm, (int, float)) or not max_norm > 0:
        raise ValueError(f"clip_by_global_norm: max_norm must be a number > 0, got {max_norm!r}")
    limit = float(max_norm)

    def update(grads: Tensors, state: Any, params: Tensors) -> tuple[Tensors, Any]:
        if not grads:
            return grads, state
        total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
        # one factor, applied without a host sync: min(1, limit / (norm + 1e-6)) as torch clips
        factor = torch.clamp(limit / (total + 1e-6), max=1.0)
        return tuple(g * factor.to(g.dtype) for g in grads), state

    return GradientTransform(lambda params: None, update, f"clip_by_global_norm({limit:g})")


def chain(*transforms: GradientTransform) -> GradientTransform:
    """Apply ``transforms`` in order; the state is the tuple of their states."""
    for t in transforms:
        if not isinstance(t, GradientTransform):
            raise TypeError(f"chain: expected GradientTransform objects, got {type(t).__name__}: {t!r}")

    def init(params: Tensors) -> Any:
        return [t.init(params) for t in transforms]

    def update(grads: Tensors, state: Any, params: Tensors) -> tuple[Tensors, Any]:
        new_state = []
        for t, s in zip(transforms, state):
            grads, s = t.update(grads, s, params)
            new_state.append(s)
        return grads, new_state

    return GradientTransform(init, update, "chain(" + ", ".join(map(repr, transforms)) + ")")
