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
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mlo
from mlo import estimators
from mlo.graph import Graph
from programs import Fn, Vector

pytestmark = pytest.mark.usefixtures("one_thread")

FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)


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


def _levels(names: list[str]) -> list[Fn]:
    out = []
    for name in names:
        module = Vector(torch.ones(1))
        out.append(Fn(name, module, torch.optim.SGD(module.parameters(), lr=0.1), lambda b, m=module: (m.x**2).sum()))
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
