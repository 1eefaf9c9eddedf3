"""The implementations a benchmark round can run on: mlo, the hand-written loop, and the peers.

Each entry of `IMPLEMENTATIONS` turns a program copy and an mlo estimator into a function that
runs one round (the lower level's ``steps`` steps, then one upper step), or raises
`NotApplicable` saying why that implementation cannot run that algorithm:

- ``mlo``: ``mlo.Engine`` with the estimator.
- ``mlo-compile``: the same with the lower module compiled by ``torch.compile`` (estimators that
  take first-order gradients only: ``Estimator.double_backward`` is False).
- ``hand``: the hand-written loop (`benchmarks.handwritten`).
- ``hand-engine``: the same loop taking its gradients through autograd's engine directly
  (`mlo.autodiff.grad`, as mlo does): the floor for any framework running these passes.
- ``betty``: the same mlo Problems on Betty's engine through `mlo.engines.betty` (Betty's
  methods that differ from mlo's run, flagged in the note).
- ``higher``: ``higher.innerloop_ctx`` for ``unroll``.
- ``torchopt``: ``torchopt.MetaSGD`` for ``unroll``; ``torchopt.diff.implicit.custom_root`` with
  its Neumann (``solve_inv(ns=True)``) or CG (``solve_cg``) solver for ``neumann``/``cg``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any, cast

import torch
from torch import Tensor

import mlo
from mlo.estimators import CG, Estimator, Neumann, Unroll

from .handwritten import handwritten_round, supports
from mlo import cycle

from .workloads import GRAPH, Copy, as_mlo

__all__ = ["NotApplicable", "Round", "IMPLEMENTATIONS", "build_round"]

Round = Callable[[], Any]


class NotApplicable(Exception):
    """This implementation cannot run this algorithm (the message says why)."""


def mlo_round(c: Copy, estimator: Estimator) -> tuple[Round, str]:
    engine = mlo.Engine(as_mlo(c), GRAPH, estimator)
    return (lambda: engine.run(1)), ""


def mlo_compiled_round(c: Copy, estimator: Estimator, backend: str = "inductor") -> tuple[Round, str]:
    """mlo's round with the lower module compiled (``torch.compile``), for estimators that take
    first-order gradients only: a compiled module's backward cannot be differentiated again."""
    if estimator.double_backward:
        raise NotApplicable(f"torch.compile takes no double backward, which {estimator.name} needs "
                            "(first_order, finite_difference and sama run compiled)")
    c.compile_lower(backend)
    return mlo_round(c, estimator)[0], f"lower module compiled: torch.compile(backend={backend!r})"


def hand_round(c: Copy, estimator: Estimator, direct_engine: bool = False) -> tuple[Round, str]:
    reason = supports(estimator, c)
    if reason:
        raise NotApplicable(reason)
    return handwritten_round(c, estimator, direct_engine), ""


def hand_engine_round(c: Copy, estimator: Estimator) -> tuple[Round, str]:
    return hand_round(c, estimator, direct_engine=True)


def betty_round(c: Copy, estimator: Estimator) -> tuple[Round, str]:
    try:
        from mlo.engines.betty import BettyMismatchWarning, BettyProgram, BettyUnsupported, betty_available
    except ImportError as err:  # pragma: no cover - the adapter itself always imports
        raise NotApplicable(str(err)) from err
    if not betty_available():
        raise NotApplicable("betty-ml is not installed (make peers)")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", BettyMismatchWarning)
        try:
            program = BettyProgram(as_mlo(c), GRAPH, estimator, allow_inexact=True)
        except BettyUnsupported as err:
            raise NotApplicable(str(err)) from err
    note = "; ".join(str(w.message) for w in caught if issubclass(w.category, BettyMismatchWarning))
    return (lambda: program.iterate(1)), note


def _lower_step(c: Copy, lower_it: Any) -> Any:
    """One plain step of the lower level on its next batch; returns that batch."""
    batch = next(lower_it)
    params = c.lower_params()
    for p, g in zip(params, torch.autograd.grad(c.lower_loss(batch), params)):
        p.grad = g
    c.lower_optimizer.step()
    return batch


def _upper_step(c: Copy, grads: Sequence[Tensor]) -> None:
    for p, g in zip(c.upper_params(), grads):
        p.grad = g.detach()
    c.upper_optimizer.step()


def _plain_sgd_lr(c: Copy, who: str) -> float:
    opt = c.lower_optimizer
    groups = opt.param_groups
    if type(opt) is not torch.optim.SGD or len(groups) != 1 or groups[0].get("momentum") or groups[0].get("weight_decay"):
        raise NotApplicable(f"the {who} round covers a lower level with plain SGD (one param group)")
    return float(groups[0]["lr"])


def higher_round(c: Copy, estimator: Estimator) -> tuple[Round, str]:
    if not isinstance(estimator, Unroll):
        raise NotApplicable("higher differentiates through unrolled steps only (unroll)")
    try:
        import higher
    except ImportError as err:
        raise NotApplicable("higher is not installed") from err
    _plain_sgd_lr(c, "higher")
    lower_it, upper_it = cycle(c.lower_batches), cycle(c.upper_batches)
    up = c.upper_params()

    def one_round() -> None:
        for _ in range(c.lower_steps):
            xb = _lower_step(c, lower_it)
        batch = next(upper_it)
        with higher.innerloop_ctx(c.lower, c.lower_optimizer, copy_initial_weights=False) as (fl, diffopt):
            for _ in range(estimator.steps):
                diffopt.step(c.lower_loss(xb, lower=fl))
            loss = c.upper_loss(batch, lower=fl)
            grads = torch.autograd.grad(loss, up, allow_unused=True)
        _upper_step(c, [torch.zeros_like(p) if g is None else g for p, g in zip(up, grads)])

    return one_round, ""


def torchopt_round(c: Copy, estimator: Estimator) -> tuple[Round, str]:
    try:
        import torchopt
    except ImportError as err:
        raise NotApplicable("torchopt is not installed") from err
    lower_it, upper_it = cycle(c.lower_batches), cycle(c.upper_batches)
    up = c.upper_params()
    if isinstance(estimator, Unroll):
        lr = _plain_sgd_lr(c, "TorchOpt")
        meta = torchopt.MetaSGD(c.lower, lr=lr)

        def unrolled() -> None:
            for _ in range(c.lower_steps):
                xb = _lower_step(c, lower_it)
            batch = next(upper_it)
            saved = torchopt.extract_state_dict(c.lower)
            saved_opt = torchopt.extract_state_dict(meta)
            for _ in range(estimator.steps):
                meta.step(c.lower_loss(xb))
            grads = torch.autograd.grad(c.upper_loss(batch), up, allow_unused=True)
            torchopt.recover_state_dict(c.lower, saved)
            torchopt.recover_state_dict(meta, saved_opt)
            _upper_step(c, [torch.zeros_like(p) if g is None else g for p, g in zip(up, grads)])

        return unrolled, ""
    if isinstance(estimator, Neumann):
        if not isinstance(estimator.alpha, float):
            raise NotApplicable("TorchOpt's Neumann solver takes a numeric alpha, not 'auto'")
        solve = torchopt.linear_solve.solve_inv(ns=True, maxiter=estimator.iterations, alpha=estimator.alpha)
    elif isinstance(estimator, CG):
        ridge = estimator.damping or None
        solve = torchopt.linear_solve.solve_cg(maxiter=estimator.iterations, rtol=estimator.tol, atol=0.0, ridge=ridge)
    else:
        raise NotApplicable("TorchOpt runs unroll (MetaSGD) and implicit neumann/cg (custom_root) here")
    def optimality(lower: tuple[Tensor, ...], upper: tuple[Tensor, ...], batch: Any) -> tuple[Tensor, ...]:
        # TorchOpt differentiates this with torch.func transforms: a torch.func gradient, not autograd.grad
        return torch.func.grad(lambda w: c.at(c.lower_loss, batch, w, upper))(lower)

    @torchopt.diff.implicit.custom_root(optimality, argnums=1, solve=solve)
    def best_response(lower: tuple[Tensor, ...], upper: tuple[Tensor, ...], batch: Any) -> tuple[Tensor, ...]:
        return lower  # implicit differentiation at the current iterate, as mlo's estimators

    def implicit() -> None:
        for _ in range(c.lower_steps):
            xb = _lower_step(c, lower_it)
        batch = next(upper_it)
        lower = tuple(p.detach() for p in c.lower_params())
        with warnings.catch_warnings():  # TorchOpt 0.7.3 calls the deprecated functorch.vjp every time
            warnings.simplefilter("ignore", FutureWarning)
            star = cast(tuple[Tensor, ...], best_response(lower, tuple(up), xb))
            grads = torch.autograd.grad(c.at(c.upper_loss, batch, star, up), up, allow_unused=True)
        _upper_step(c, [torch.zeros_like(p) if g is None else g for p, g in zip(up, grads)])

    return implicit, ""


IMPLEMENTATIONS: dict[str, Callable[[Copy, Estimator], tuple[Round, str]]] = {
    "mlo": mlo_round,
    "mlo-compile": mlo_compiled_round,
    "hand": hand_round,
    "hand-engine": hand_engine_round,
    "betty": betty_round,
    "higher": higher_round,
    "torchopt": torchopt_round,
}


def build_round(impl: str, c: Copy, estimator: Estimator) -> tuple[Round, str]:
    """``(round, note)`` for ``impl`` on ``c``; `NotApplicable` when it cannot run it."""
    return IMPLEMENTATIONS[impl](c, estimator)
