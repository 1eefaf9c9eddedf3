"""Ridge regression with one learned log-penalty per feature: the bilevel program with a closed form.

    inner(w, h) = 1/2 mean((X w - y)^2) + 1/2 sum(exp(h) w^2) [+ quartic/4 sum(exp(h) w^4)]
    outer(w, h) = 1/2 mean((Xv w - yv)^2) [+ direct/2 sum(h^2)]

With ``quartic = 0`` the inner problem is quadratic: ``A = X^T X / n + diag(exp(h))``,
``w*(h) = A^{-1} X^T y / n`` and ``dw*/dh_i = -A^{-1} e_i exp(h_i) w*_i``, so the hypergradient is

    d outer(w*(h), h) / dh = direct h - exp(h) * w* * A^{-1} Xv^T (Xv w* - yv) / n_v.

The tests, the estimator suite and the speed suite all build their ridge programs from this
module, so they share one set of losses and one closed form.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

import mlo
from mlo.errors import ArgumentError, ConfigError, ProgramError

__all__ = ["Ridge", "Vector", "program"]


class Vector(nn.Module):
    """One trainable vector, ``value``, held as one parameter per part given (``parts``).

    ``Vector(t)`` holds ``t`` as one parameter; ``Vector(a, b)`` holds two parameters (each can
    be its own optimizer param group) and ``value`` is their concatenation. The parts are copies
    of the tensors given."""

    def __init__(self, *parts: Tensor) -> None:
        super().__init__()
        if not parts:
            raise ArgumentError("Vector needs at least one tensor (its parts)")
        self.parts = nn.ParameterList([nn.Parameter(part.detach().clone()) for part in parts])

    @property
    def value(self) -> Tensor:
        """The whole vector: the one parameter itself, or the concatenation of the parts."""
        return self.parts[0] if len(self.parts) == 1 else torch.cat(list(self.parts))


@dataclass(frozen=True)
class Ridge:
    """The data and constants of one ridge HPO program; its losses as functions of tensors."""

    X: Tensor
    y: Tensor
    Xv: Tensor
    yv: Tensor
    direct: float = 0.0
    quartic: float = 0.0

    @staticmethod
    def random(n: int, dim: int, noise: float = 1.0, generator: torch.Generator | None = None,
               dtype: torch.dtype | None = None, **constants: float) -> "Ridge":
        """Gaussian features, targets ``X t + noise * e`` for one Gaussian truth ``t``, drawn from
        ``generator`` (in the order truth, X, Xv, y's noise, yv's noise)."""
        g = generator if generator is not None else torch.Generator().manual_seed(0)
        dtype = dtype or torch.get_default_dtype()
        truth = torch.randn(dim, generator=g, dtype=dtype)
        X, Xv = (torch.randn(n, dim, generator=g, dtype=dtype) for _ in range(2))
        y = X @ truth + noise * torch.randn(n, generator=g, dtype=dtype)
        yv = Xv @ truth + noise * torch.randn(n, generator=g, dtype=dtype)
        return Ridge(X, y, Xv, yv, **constants)

    def inner(self, w: Tensor, h: Tensor) -> Tensor:
        lam = h.exp()
        fit = 0.5 * ((self.X @ w - self.y) ** 2).mean() + 0.5 * (lam * w * w).sum()
        return fit + self.quartic / 4 * (lam * w**4).sum() if self.quartic else fit

    def outer(self, w: Tensor, h: Tensor) -> Tensor:
        # the direct term is kept at direct = 0 too: the outer loss then still reads h (a zero
        # derivative, not a missing one)
        return 0.5 * ((self.Xv @ w - self.yv) ** 2).mean() + self.direct / 2 * (h * h).sum()

    def hessian(self, h: Tensor) -> Tensor:
        """The inner Hessian in w (quadratic case): ``X^T X / n + diag(exp(h))``."""
        self._quadratic()
        return self.X.T @ self.X / self.X.shape[0] + torch.diag(h.exp())

    def optimum(self, h: Tensor) -> Tensor:
        """``w*(h)``, the inner optimum."""
        return torch.linalg.solve(self.hessian(h), self.X.T @ self.y / self.X.shape[0])

    def hypergradient(self, h: Tensor) -> Tensor:
        """The exact ``d outer(w*(h), h) / dh`` (the closed form above)."""
        w = self.optimum(h)
        residual = self.Xv.T @ (self.Xv @ w - self.yv) / self.Xv.shape[0]
        return self.direct * h - h.exp() * w * torch.linalg.solve(self.hessian(h), residual)

    def _quadratic(self) -> None:
        if self.quartic:
            raise ConfigError("the closed form needs quartic = 0 (a quadratic inner problem)")


Optimizer = Callable[..., torch.optim.Optimizer]


def program(ridge: Ridge, w0: Tensor | Sequence[Tensor], h0: Tensor, lower_lr: float | Sequence[float],
            upper: Optimizer = torch.optim.Adam, upper_lr: float = 0.05, names: tuple[str, str] = ("weights", "hyper"),
            lower: Optimizer = torch.optim.SGD) -> list[mlo.Problem]:
    """The two levels, full batch: ``names[0]`` (w, ``lower``: SGD) and ``names[1]`` (h,
    ``upper``: Adam), wired ``{names[1]: [names[0]]}``.

    ``w0`` may be a sequence of parts (a `Vector` of several parameters); ``lower_lr`` is then
    one learning rate for all of them or one per part, each part its own param group."""
    parts = (w0,) if isinstance(w0, Tensor) else tuple(w0)
    lrs = [float(lower_lr)] * len(parts) if isinstance(lower_lr, (int, float)) else [float(r) for r in lower_lr]
    if len(lrs) != len(parts):
        raise ProgramError(f"ridge program: lower_lr has {len(lrs)} learning rates for the {len(parts)} parts of w0")
    w, h = Vector(*parts), Vector(h0)
    groups = [{"params": [p], "lr": r} for p, r in zip(w.parts, lrs)]
    return [
        mlo.Problem(names[0], w, lower(groups, lr=lrs[0]), loss=lambda _: ridge.inner(w.value, h.value)),
        mlo.Problem(names[1], h, upper(h.parameters(), lr=upper_lr), loss=lambda _: ridge.outer(w.value, h.value)),
    ]
