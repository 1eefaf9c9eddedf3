"""Property-based tests (hypothesis): random graphs, random estimator options and random
positive-definite quadratic programs, each against an oracle written here from its definition.

Kept fast: few examples, small sizes, no deadline per example (the machine is shared); the
whole module runs in a few seconds.
"""

from __future__ import annotations

import math
import re

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import mlo
from mlo import estimators
from mlo.estimators import CG, Unroll
from mlo.graph import Graph
from mlo.problems.ridge import Vector

from .helpers import BestResponses, Quadratic, conditioned_iterations, quadratic, relative_error

pytestmark = pytest.mark.usefixtures("one_thread")

FAST = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)


# ---------------------------------------------------------------------------------------------- graphs


@st.composite
def graphs(draw: st.DrawFn) -> tuple[list[str], dict[str, list[str]]]:
    """1 to 6 levels and any set of edges between them (self-loops and cycles included)."""
    n = draw(st.integers(1, 6))
    names = [f"l{i}" for i in range(n)]
    pairs = draw(st.sets(st.tuples(st.sampled_from(names), st.sampled_from(names)), max_size=2 * n))
    edges: dict[str, list[str]] = {}
    for upper, lower in sorted(pairs):
        edges.setdefault(upper, []).append(lower)
    return names, edges


def _acyclic(names: list[str], edges: dict[str, list[str]]) -> bool:
    """Kahn's algorithm: repeatedly remove a level with no remaining lowers."""
    remaining = {n: set(edges.get(n, ())) for n in names}
    while remaining:
        free = [n for n, lows in remaining.items() if not lows]
        if not free:
            return False
        for n in free:
            del remaining[n]
        for lows in remaining.values():
            lows.difference_update(free)
    return True


def _reachable(name: str, edges: dict[str, list[str]]) -> set[str]:
    seen: set[str] = set()
    stack = list(edges.get(name, ()))
    while stack:
        n = stack.pop()
        if n not in seen:
            seen.add(n)
            stack.extend(edges.get(n, ()))
    return seen


class _Order(mlo.Hook):
    def __init__(self) -> None:
        self.steps: list[str] = []

    def on_step(self, engine: mlo.Engine, level: str, loss: torch.Tensor) -> None:
        self.steps.append(level)


def _levels(names: list[str]) -> list[mlo.Problem]:
    out = []
    for name in names:
        module = Vector(torch.ones(1))
        out.append(mlo.Problem(name, module, torch.optim.SGD(module.parameters(), lr=0.1), loss=lambda b, m=module: (m.value**2).sum()))
    return out


@FAST
@given(graphs())
def test_a_random_graph_is_scheduled_bottom_up_or_its_cycle_named(graph):
    names, edges = graph
    if not _acyclic(names, edges):
        with pytest.raises(mlo.GraphError, match="graph has a cycle: ") as info:
            Graph.build(names, edges)
        cycle = str(info.value).removeprefix("graph has a cycle: ").split(" -> ")
        assert len(cycle) >= 2 and cycle[0] == cycle[-1]
        assert all(low in edges.get(up, ()) for up, low in zip(cycle, cycle[1:])), cycle  # a real cycle
        return
    g = Graph.build(names, edges)
    assert sorted(g.bottom_up) == sorted(names)
    position = {n: i for i, n in enumerate(g.bottom_up)}
    for upper, lows in edges.items():
        assert all(position[low] < position[upper] for low in lows)
    for n in names:
        assert set(g.descendants(n)) == _reachable(n, edges)
        assert set(g.uppers_of[n]) == {u for u, lows in edges.items() if n in lows}
    # the engine steps every level once per round in that order (first_order: nothing to solve)
    order = _Order()
    mlo.Engine(_levels(names), edges, "first_order", hooks=[order]).run(1)
    assert order.steps == list(g.bottom_up)


# ---------------------------------------------------------------------------------------------- estimator options

OPTIONS = [
    (name, field)
    for name in estimators.names()
    for field in estimators.get(name).options()
]

values = st.one_of(
    st.integers(-3, 60),
    st.floats(allow_nan=True, allow_infinity=True, width=64),
    st.booleans(),
    st.none(),
    st.sampled_from(["auto", "abc", "", "1", "0.5", "total", "partial"]),
)


def _named(err: mlo.EstimatorError, field: str) -> bool:
    return f"option '{field}'" in str(err) or f"option {field!r}" in str(err)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.sampled_from(OPTIONS), values)
def test_a_random_option_value_is_accepted_or_rejected_naming_the_option(option, value):
    name, field = option
    try:
        est = estimators.get(name, **{field: value})
    except mlo.EstimatorError as err:
        assert _named(err, field), str(err)
    else:
        got = getattr(est, field)
        assert got == value or (isinstance(value, int) and got == float(value))
        assert not isinstance(value, bool) or isinstance(estimators.get(name).options()[field], bool)
        assert not (isinstance(got, float) and math.isnan(got))  # NaN is never an accepted option
    # the same value written in a spec string: the same verdict, or a rejection naming the option
    if value is None or isinstance(value, bool) or value == "":
        return
    text = repr(value) if isinstance(value, float) else str(value)
    if re.search(r"[,=:\s]", text):
        return
    try:
        parsed = estimators.parse(f"{name}:{field}={text}")
    except mlo.EstimatorError as err:
        assert _named(err, field) or "bad option" in str(err), str(err)
    else:
        assert parsed == estimators.get(name, **{field: getattr(parsed, field)})


# ---------------------------------------------------------------------------------------------- quadratic programs


@st.composite
def quadratic_programs(draw: st.DrawFn, depth: int, size: int = 3, extra: bool = True) -> Quadratic:
    """A positive-definite quadratic program of the given depth under one top level ``t``:
    middles ``m*`` (depth 3) each over some lows ``l*``, possibly edges from the top straight to a
    low, random sizes and couplings. Each level's loss reads itself, its lowers and its uppers
    (so a middle level is judged by its lows), and with ``extra`` maybe one more level.

    The rule follows the graph: a level's best response moves with its uppers in the graph only.
    A look-ahead follows every dependence its steps read, so the unroll tests use no extra reads
    (a low reading the top directly would be a path the graph does not declare)."""
    lows = [f"l{i}" for i in range(draw(st.integers(1, 2)))]
    mids = [f"m{i}" for i in range(draw(st.integers(1, 2)))] if depth == 3 else []
    graph: dict[str, list[str]] = {}
    if mids:
        for m in mids:
            graph[m] = draw(st.lists(st.sampled_from(lows), min_size=1, max_size=len(lows), unique=True))
        under = [low for low in lows if not any(low in graph[m] for m in mids)]  # reach every low
        skips = draw(st.lists(st.sampled_from(lows), max_size=1, unique=True))
        graph["t"] = mids + sorted(set(under) | set(skips))
    else:
        graph["t"] = lows
    names = ["t", *mids, *lows]
    dims = {v: draw(st.integers(1, size)) for v in names}
    couples: dict[str, list[str]] = {}
    for v in names:
        near = {v, *graph.get(v, ()), *(u for u, lows_of in graph.items() if v in lows_of)}
        more = draw(st.sets(st.sampled_from(names), max_size=1 if extra else 0))
        couples[v] = [n for n in names if n in near | more]
    return quadratic(dims, couples, graph, seed=draw(st.integers(0, 10_000)))


def _at_best_responses(q: Quadratic) -> tuple[BestResponses, dict[str, torch.Tensor]]:
    ref = BestResponses({v: (lambda values, v=v: q.loss(v, values)) for v in q.dims}, q.graph)
    point = ref.equilibrium("t", {v: q.value(v) for v in q.dims})
    with torch.no_grad():
        for name, value in point.items():
            q.problems[name].module.parts[0].copy_(value)
    return ref, point


QUADRATIC = settings(max_examples=8, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)


@pytest.mark.parametrize("depth", [2, 3])
def test_cg_is_exact_on_random_quadratic_programs(float64, depth):
    @QUADRATIC
    @given(quadratic_programs(depth))
    def check(q):
        ref, point = _at_best_responses(q)
        want = ref.hypergradient("t", point)
        got = q.engine(CG(iterations=20, tol=0.0)).hypergradient("t")[0]
        assert relative_error(got, want) < 1e-8

    check()


@pytest.mark.parametrize("depth,size,most,tolerance", [(2, 3, 200, 1e-7), (3, 2, 8, 1e-5)])
def test_long_unroll_approaches_the_exact_value_on_random_quadratic_programs(float64, depth, size, most, tolerance):
    # Each level gets the step size that contracts its reduced objective fastest, rate
    # (hi - lo) / (hi + lo); K steps leave an error of order rate ** K. Nested look-aheads cost
    # K ** 2 steps at depth 3, so there the sizes are smaller and K at most 8.
    @QUADRATIC
    @given(quadratic_programs(depth, size, extra=False))
    def check(q):
        ref, point = _at_best_responses(q)
        want = ref.hypergradient("t", point)
        rate = 0.0
        fixed = {k: t.detach() for k, t in point.items()}
        for level in ref.below("t"):
            H = torch.autograd.functional.hessian(lambda x, v=level: ref.reduced(v, {**fixed, v: x}, fixed), fixed[level])
            lo, hi = (float(e) for e in torch.linalg.eigvalsh(H)[[0, -1]])
            q.problems[level].optimizer.param_groups[0]["lr"] = 2 / (lo + hi)
            rate = max(rate, (hi - lo) / (hi + lo))
        steps = conditioned_iterations(max(rate, 1e-3), tolerance * 1e-2)
        assume(steps <= most)
        got = q.engine(Unroll(steps=steps)).hypergradient("t")[0]
        assert relative_error(got, want) < tolerance

    check()
