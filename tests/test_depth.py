"""The exact hypergradient rule at depth (``hessian="total"``, the default of ``cg`` and ``neumann``)
against its definition, in float64.

The reference (`tests.helpers.BestResponses`) is plain autograd through best responses: the derivative
of F(theta) = L_top(theta, lambda*(theta), w*(lambda*(theta)), ...) with every best response
computed by Newton's method (on a quadratic, one Newton step is the closed form), evaluated where
every level below the top is at its best response. The middle levels' losses read the levels
below them, which is where the per-hop rule (``hessian="partial"``) goes wrong.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import mlo
from mlo.estimators import CG, Neumann, Unroll
from mlo.problems.ridge import Vector

from .helpers import BestResponses, Quadratic, conditioned_iterations, quadratic, relative_error

pytestmark = pytest.mark.usefixtures("float64", "one_thread")

SHAPES = {
    # top -> mid -> low; mid's loss reads low
    "chain3": (
        {"T": 2, "M": 3, "L": 4},
        {"T": ("T", "M", "L"), "M": ("T", "M", "L"), "L": ("M", "L")},
        {"T": ["M"], "M": ["L"]},
    ),
    "chain4": (
        {"T": 2, "A": 3, "B": 3, "C": 4},
        {"T": ("T", "A", "B", "C"), "A": ("T", "A", "B", "C"), "B": ("A", "B", "C"), "C": ("B", "C")},
        {"T": ["A"], "A": ["B"], "B": ["C"]},
    ),
    # two middles sharing one low level, each reading it
    "diamond": (
        {"U": 2, "L1": 3, "L2": 2, "M": 3},
        {"U": ("U", "L1", "L2", "M"), "L1": ("U", "L1", "M"), "L2": ("U", "L2", "M"), "M": ("L1", "L2", "M")},
        {"U": ["L1", "L2"], "L1": ["M"], "L2": ["M"]},
    ),
    # the low level depends on the top directly and through the middle
    "skip": (
        {"T": 2, "A": 3, "B": 4},
        {"T": ("T", "A", "B"), "A": ("T", "A", "B"), "B": ("T", "A", "B")},
        {"T": ["A", "B"], "A": ["B"]},
    ),
}
TOP = {"chain3": "T", "chain4": "T", "diamond": "U", "skip": "T"}


def _set(problems: dict[str, mlo.Problem], values: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, value in values.items():
            problems[name].module.parts[0].copy_(value)


def _at_best_responses(shape: str, seed: int = 0) -> tuple[Quadratic, BestResponses, torch.Tensor]:
    """The quadratic program of ``shape`` with every level below the top at its best response,
    its reference, and the reference hypergradient of the top there."""
    q = quadratic(*SHAPES[shape], seed=seed)
    ref = BestResponses({v: (lambda values, v=v: q.loss(v, values)) for v in q.dims}, q.graph)
    point = ref.equilibrium(TOP[shape], {v: q.value(v) for v in q.dims})
    _set(q.problems, point)
    return q, ref, ref.hypergradient(TOP[shape], point)


def _reduced_hessian(ref: BestResponses, level: str, point: dict[str, torch.Tensor]) -> torch.Tensor:
    fixed = {k: t.detach() for k, t in point.items()}
    x = fixed[level].clone().requires_grad_()
    (g,) = torch.autograd.grad(ref.reduced(level, {**fixed, level: x}, fixed), x, create_graph=True)
    return torch.stack([torch.autograd.grad(g[i], x, retain_graph=True)[0] for i in range(len(g))])


@pytest.mark.parametrize("shape", list(SHAPES))
def test_cg_is_exact_at_any_depth(shape):
    q, _, want = _at_best_responses(shape)
    got = q.engine(CG(iterations=20, tol=0.0)).hypergradient(TOP[shape])[0]
    assert relative_error(got, want) < 1e-8
    # the per-hop rule is another answer on every one of these shapes
    partial = q.engine(CG(iterations=20, tol=0.0, hessian="partial")).hypergradient(TOP[shape])[0]
    assert relative_error(partial, want) > 1e-2


def test_the_per_hop_rule_can_be_far_off():
    # The failure the exact rule fixes, made visible: on this chain "partial" is ~98 % off.
    q, _, want = _at_best_responses("chain3", seed=1)
    partial = q.engine(CG(iterations=20, tol=0.0, hessian="partial")).hypergradient("T")[0]
    assert relative_error(partial, want) > 0.5
    total = q.engine(CG(iterations=20, tol=0.0)).hypergradient("T")[0]
    assert relative_error(total, want) < 1e-8


def test_middle_levels_hypergradients_are_exact():
    # Each middle level's own hypergradient (through the levels below it), away from its own
    # stationary point: the levels below the middle at their best responses, the middle anywhere.
    q = quadratic(*SHAPES["chain4"], seed=4)
    ref = BestResponses({v: (lambda values, v=v: q.loss(v, values)) for v in q.dims}, q.graph)
    point = ref.equilibrium("A", {v: q.value(v) for v in q.dims})
    _set(q.problems, point)
    engine = q.engine(CG(iterations=20, tol=0.0))
    want = ref.hypergradient("A", point)
    assert want.norm() > 1e-2
    assert relative_error(engine.hypergradient("A")[0], want) < 1e-8


def test_neumann_total_is_exact_on_a_chain():
    q, ref, want = _at_best_responses("chain3")
    point = {v: q.value(v) for v in q.dims}
    estimators = {}
    for upper, lower in (("T", "M"), ("M", "L")):
        eig = torch.linalg.eigvalsh(_reduced_hessian(ref, lower, point))
        lo, hi = float(eig[0]), float(eig[-1])
        # the best step, 2 / (lo + hi): the error shrinks by (hi - lo) / (hi + lo) per term
        iterations = conditioned_iterations((hi - lo) / (hi + lo), 1e-11)
        estimators[(upper, lower)] = Neumann(iterations=iterations, alpha=2 / (lo + hi))
    got = q.engine(estimators).hypergradient("T")[0]
    assert relative_error(got, want) < 1e-8


def test_partial_and_total_agree_where_the_lower_has_no_lowers():
    q, _, _ = _at_best_responses("chain3")
    for est in (CG(iterations=20, tol=0.0), Neumann(iterations=5, alpha=0.1)):
        total = q.engine(est).hypergradient("M")[0]
        partial = q.engine(type(est)(**{**est.options(), "hessian": "partial"})).hypergradient("M")[0]
        assert torch.equal(total, partial)


# ---------------------------------------------------------------------------------------------- a non-quadratic bottom


def _softplus_chain(seed: int = 0) -> tuple[dict[str, mlo.Problem], dict[str, list[str]], dict]:
    """top -> mid -> low, low's loss a quadratic plus softplus and log-cosh terms coupling it to
    mid (so its Hessian moves with the point, and the reduced Hessian of mid has a term in the
    third derivatives of low's loss); mid and top quadratic, each reading every level below."""
    g = torch.Generator().manual_seed(seed)
    dims = {"T": 2, "M": 3, "L": 4}

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g)

    def pd(n: int) -> torch.Tensor:
        G = randn(n, n)
        return G.T @ G / n + 0.5 * torch.eye(n)

    Q_L, C, D, E = pd(4), randn(5, 4), randn(5, 3), randn(4, 3)
    Q_M, Q_T = pd(7), pd(9)
    c_M, c_T, B = randn(7), randn(9), randn(3, 2)

    def low(v: dict) -> torch.Tensor:
        w, m = v["L"], v["M"]
        return 0.5 * w @ Q_L @ w + F.softplus(C @ w + D @ m).sum() + torch.log(torch.cosh(w - E @ m)).sum()

    def mid(v: dict) -> torch.Tensor:
        z = torch.cat([v["M"], v["L"]])
        return 0.5 * z @ Q_M @ z + c_M @ z + v["M"] @ B @ v["T"]

    def top(v: dict) -> torch.Tensor:
        z = torch.cat([v["T"], v["M"], v["L"]])
        return 0.5 * z @ Q_T @ z + c_T @ z

    modules = {name: Vector(randn(n)) for name, n in dims.items()}
    fns = {"L": low, "M": mid, "T": top}

    def bound(fn):
        return lambda batch: fn({name: m.value for name, m in modules.items()})

    problems = {
        name: mlo.Problem(name, modules[name], torch.optim.SGD(modules[name].parameters(), lr=0.05), loss=bound(fns[name]))
        for name in dims
    }
    return problems, {"T": ["M"], "M": ["L"]}, fns


def test_cg_is_exact_with_a_non_quadratic_bottom():
    problems, graph, fns = _softplus_chain()
    ref = BestResponses(fns, graph, steps=3)
    point = ref.equilibrium("T", {name: p.module.value.detach() for name, p in problems.items()})
    _set(problems, point)
    want = ref.hypergradient("T", point)

    def engine(**options):
        return mlo.Engine(list(problems.values()), graph, CG(iterations=30, tol=0.0, **options))

    assert relative_error(engine().hypergradient("T")[0], want) < 1e-8
    assert relative_error(engine(hessian="partial").hypergradient("T")[0], want) > 1e-2


# ---------------------------------------------------------------------------------------------- nested unroll


def test_nested_unroll_approaches_the_exact_value():
    q, ref, want = _at_best_responses("chain3", seed=1)
    point = {v: q.value(v) for v in q.dims}
    for level in ("M", "L"):  # the best step size for each level's reduced objective
        eig = torch.linalg.eigvalsh(_reduced_hessian(ref, level, point))
        q.problems[level].optimizer.param_groups[0]["lr"] = float(2 / (eig[0] + eig[-1]))
    errors = [relative_error(q.engine(Unroll(steps=K)).hypergradient("T")[0], want) for K in (2, 4, 8, 16)]
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 1e-3


# ---------------------------------------------------------------------------------------------- the option


def test_the_hessian_option():
    assert mlo.estimators.get("cg", iterations=50, hessian="partial") == CG(iterations=50, hessian="partial")
    assert mlo.estimators.parse("cg:hessian=partial") == CG(hessian="partial")
    assert mlo.estimators.parse("neumann:hessian=partial,alpha=0.1") == Neumann(alpha=0.1, hessian="partial")
    assert CG().hessian == "total" and Neumann().hessian == "total"
    for bad in ("exact", "Total", 1):
        with pytest.raises(mlo.EstimatorError, match="option 'hessian'"):
            mlo.estimators.get("cg", hessian=bad)
    with pytest.raises(mlo.EstimatorError, match="option 'hessian'"):
        mlo.estimators.parse("neumann:hessian=full")


# ---------------------------------------------------------------------------------------------- training


def test_training_with_the_exact_rule_descends_the_true_objective():
    """Run the chain: each lower level takes 5 steps per round (step size 1 / L of its reduced
    objective), the top one along its hypergradient. The true top objective is F(T) =
    L_T(T, M*(T), L*(M*(T))). With the exact rule training reaches a stationary point of F; with
    the per-hop rule it settles elsewhere, here above where it started."""

    def train(hessian: str) -> tuple[float, float, float]:
        q = quadratic(*SHAPES["chain3"], seed=6)
        ref = BestResponses({v: (lambda values, v=v: q.loss(v, values)) for v in q.dims}, q.graph)
        point = ref.equilibrium("T", {v: q.value(v) for v in q.dims})
        _set(q.problems, point)
        for level in ("M", "L"):
            eig = torch.linalg.eigvalsh(_reduced_hessian(ref, level, point))
            q.problems[level].optimizer.param_groups[0]["lr"] = float(1 / eig[-1])
            q.problems[level].steps = 5
        q.problems["T"].optimizer.param_groups[0]["lr"] = 0.2

        def true_objective() -> float:
            values = {v: q.value(v) for v in q.dims}
            return float(q.loss("T", {k: t.detach() for k, t in ref.settle("T", values, values).items()}))

        def slope() -> float:  # the norm of dF/dT
            values = {v: q.value(v) for v in q.dims}
            return float(ref.hypergradient("T", ref.equilibrium("T", values)).norm())

        before = (true_objective(), slope())
        mlo.Engine(list(q.problems.values()), q.graph, CG(iterations=20, tol=0.0, hessian=hessian)).run(30)
        return before, (true_objective(), slope())

    (start, start_slope), (after, slope) = train("total")
    assert after < start - 1.0 and slope < 1e-2 * start_slope
    _, (after_partial, slope_partial) = train("partial")
    assert after_partial > start and slope_partial > 0.1 * start_slope


def _shared_lower_program(calls: dict[str, int]) -> tuple[list[mlo.Problem], dict[str, list[str]], dict]:
    """LFM-CW's shape: ``a`` looks ahead of ``w1`` and of ``w2`` (unroll), ``w2``'s best response
    follows ``w1`` too (an implicit edge on its own loss); ``w1``'s loss does not read ``w2``."""
    g = torch.Generator().manual_seed(3)
    A, c, t = torch.randn(3, 3, generator=g, dtype=torch.float64), torch.randn(3, generator=g, dtype=torch.float64), torch.randn(3, generator=g, dtype=torch.float64)
    a, w1, w2 = (Vector(torch.randn(3, generator=g, dtype=torch.float64)) for _ in range(3))

    def w2_loss(_: object) -> torch.Tensor:
        calls["w2"] += 1
        return 0.5 * ((w2.value - torch.tanh(A @ w1.value)) ** 2).sum() + 0.5 * (a.value.exp() * w2.value**2).sum()

    problems = [
        mlo.Problem("w2", w2, torch.optim.SGD(w2.parameters(), lr=0.1), loss=w2_loss),
        mlo.Problem("w1", w1, torch.optim.SGD(w1.parameters(), lr=0.1),
                    loss=lambda _: 0.5 * ((w1.value - c) ** 2).sum() + 0.5 * (a.value.exp() * w1.value**2).sum()),
        mlo.Problem("a", a, torch.optim.SGD(a.parameters(), lr=0.1),
                    loss=lambda _: (w1.value**2).sum() + ((w2.value - t) ** 2).sum()),
    ]
    estimators = {("a", "w1"): Unroll(), ("a", "w2"): Unroll(), ("w1", "w2"): CG(iterations=20, hessian="partial")}
    return problems, {"a": ["w1", "w2"], "w1": ["w2"]}, estimators


def test_a_lookaheads_gradient_serves_the_curvature_of_the_same_lower_at_the_same_point():
    """The look-ahead of ``w2`` forms the differentiable gradient of ``w2``'s loss at the point;
    the implicit edge ``w1 -> w2`` needs the same gradient there, and takes it instead of one more
    forward and backward pass of ``w2``'s loss. The same hypergradient (to float64 rounding) as
    at a point given as values computed from the parameters, where nothing is shared."""
    calls = {"w2": 0}
    problems, graph, estimators = _shared_lower_program(calls)
    shared = mlo.hypergradient("a", problems, graph, estimators, batches={})
    used_shared, calls["w2"] = calls["w2"], 0
    params = {p.name: tuple(q * 1.0 for q in p.parameters()) for p in problems}  # computed values: nothing shared
    apart = mlo.hypergradient("a", problems, graph, estimators, batches={}, point=params)
    assert used_shared == calls["w2"] - 1
    for x, y in zip(shared.gradient, apart.gradient):
        assert relative_error(x, y) < 1e-12 and x.abs().max() > 0


def test_derivative_wanted_names_the_evaluated_level_and_those_below_it():
    """Inside an evaluation, `mlo.derivative_wanted` is True for the level evaluated and the
    levels below it in the graph (the only ones whose parameters its derivatives are taken in),
    False for the others; outside any evaluation it is True. Recorded in the bottom level's loss,
    which every evaluation here reads."""
    g = torch.Generator().manual_seed(0)
    low, mid, top, side = (Vector(torch.randn(2, generator=g, dtype=torch.float64)) for _ in range(4))
    names = ("low", "mid", "top", "side")
    seen: list[frozenset[str]] = []

    def low_loss(_: object) -> torch.Tensor:
        seen.append(frozenset(n for n in names if mlo.derivative_wanted(n)))
        return 0.5 * ((low.value - mid.value - side.value) ** 2).sum() + (low.value**4).sum()

    problems = [
        mlo.Problem("low", low, torch.optim.SGD(low.parameters(), lr=0.1), loss=low_loss),
        mlo.Problem("mid", mid, torch.optim.SGD(mid.parameters(), lr=0.1),
                    loss=lambda _: ((low.value - 1.0) ** 2).sum() + 0.5 * ((mid.value - top.value) ** 2).sum()),
        mlo.Problem("top", top, torch.optim.SGD(top.parameters(), lr=0.1), loss=lambda _: ((mid.value + 2.0) ** 2).sum()),
        mlo.Problem("side", side, torch.optim.SGD(side.parameters(), lr=0.1), loss=lambda _: ((low.value + 3.0) ** 2).sum()),
    ]
    graph = {"top": ["mid"], "mid": ["low"], "side": ["low"]}
    engine = mlo.Engine(problems, graph, "unroll:steps=1")
    for level, want in [("low", {"low"}), ("mid", {"mid", "low"}), ("top", {"top", "mid", "low"}), ("side", {"side", "low"})]:
        seen.clear()
        engine.step(level)
        assert seen and all(s == want for s in seen), (level, seen)
    seen.clear()
    engine.hypergradient("side")
    assert seen and all(s == {"side", "low"} for s in seen)
    seen.clear()
    low_loss(None)
    assert seen == [frozenset(names)]  # outside an evaluation: every level
