"""Gradient transforms: what a level does to its (hyper)gradient before its optimizer steps.

The shape is optax's: a transform is a pair of functions, ``init(params) -> state`` and
``update(grads, state, params) -> (grads, state)``, and transforms compose with `chain`. A level
takes one as ``Problem(..., transform=...)``; the engine keeps its state (part of
``Engine.state_dict``) and applies it to the gradient of every step of that level, after the
non-finite check and before ``optimizer.step()``. An update that returns ``None`` as the
gradient absorbs the step: the optimizer and scheduler do not step (`accumulate` does this
between micro-batches).

    arch = Problem("architecture", ..., transform=mlo.transforms.clip_by_global_norm(5.0))
    w = Problem("w", ..., steps=4, transform=mlo.transforms.accumulate(4))  # 4 micro-batches, 1 step
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .autodiff import Tensors
from .errors import ArgumentError, ConfigError

__all__ = ["GradientTransform", "accumulate", "chain", "clip_by_global_norm", "identity"]


@dataclass(frozen=True)
class GradientTransform:
    """``init(params) -> state`` and ``update(grads, state, params) -> (grads, state)``.

    ``params`` are the level's trainable parameters (``Problem.parameters()`` order) and
    ``grads`` one tensor per parameter; ``update`` may return ``None`` as the gradient to absorb
    the step (no optimizer step). ``state`` is anything ``torch.save(weights_only=True)``
    can hold (tensors, numbers, lists, dicts), so that checkpoints keep it.
    """

    init: Callable[[Tensors], Any]
    update: Callable[[Tensors, Any, Tensors], tuple[Tensors | None, Any]]
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
        raise ConfigError(f"clip_by_global_norm: max_norm must be a number > 0, got {max_norm!r}")
    limit = float(max_norm)

    def update(grads: Tensors, state: Any, params: Tensors) -> tuple[Tensors, Any]:
        if not grads:
            return grads, state
        total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
        # one factor, applied without a host sync: min(1, limit / (norm + 1e-6)) as torch clips
        factor = torch.clamp(limit / (total + 1e-6), max=1.0)
        return tuple(g * factor.to(g.dtype) for g in grads), state

    return GradientTransform(lambda params: None, update, f"clip_by_global_norm({limit:g})")


def accumulate(micro_batches: int) -> GradientTransform:
    """Gradient accumulation: the mean of ``micro_batches`` consecutive gradients, passed on at
    every ``micro_batches``-th step; the steps in between are absorbed (no optimizer step).

    Give the level ``steps`` a multiple of ``micro_batches`` and batches of ``1/micro_batches`` of
    the size: with a loss that is a mean over its batch, the level then steps exactly as it
    would on the whole batch, with a fraction of the activation memory. A level with lowers gets
    the mean of its hypergradients over its micro-batches, each taken with its lowers' batches
    in use; it is the whole batch's hypergradient (the hypergradient is linear in the level's
    own loss) when the lowers' batches are whole. Put it first in a `chain`, so that clipping
    acts on the mean."""
    if isinstance(micro_batches, bool) or not isinstance(micro_batches, int) or micro_batches < 1:
        raise ConfigError(f"accumulate: micro_batches must be an int >= 1, got {micro_batches!r}")

    def init(params: Tensors) -> Any:
        return {"sum": None, "count": 0}

    def update(grads: Tensors, state: Any, params: Tensors) -> tuple[Tensors | None, Any]:
        total = tuple(g.clone() for g in grads) if state["sum"] is None else tuple(torch._foreach_add(list(state["sum"]), list(grads)))
        count = state["count"] + 1
        if count < micro_batches:
            return None, {"sum": list(total), "count": count}
        return tuple(torch._foreach_div(list(total), float(micro_batches))), {"sum": None, "count": 0}

    return GradientTransform(init, update, f"accumulate({micro_batches})")


def chain(*transforms: GradientTransform) -> GradientTransform:
    """Apply ``transforms`` in order; the state is the list of their states. When one absorbs
    the step (returns ``None``), the ones after it are not called."""
    for t in transforms:
        if not isinstance(t, GradientTransform):
            raise ArgumentError(f"chain: expected GradientTransform objects, got {type(t).__name__}: {t!r}")

    def init(params: Tensors) -> Any:
        return [t.init(params) for t in transforms]

    def update(grads: Tensors, state: Any, params: Tensors) -> tuple[Tensors | None, Any]:
        new_state = list(state)
        for i, t in enumerate(transforms):
            out, new_state[i] = t.update(grads, state[i], params)
            if out is None:
                return None, new_state
            grads = out
        return grads, new_state

    return GradientTransform(init, update, "chain(" + ", ".join(map(repr, transforms)) + ")")
