"""The dependency graph of a program: which levels' best responses depend on which.

``{"hyper": ["weights"]}`` reads "hyper is optimized through weights": the best response of
``weights`` depends on ``hyper``, and ``hyper``'s hypergradient flows through it. Any DAG is
allowed. Levels are kept in the order the user listed them; ``bottom_up`` is a stable
topological order in which every lower level comes before all of its uppers.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from .errors import GraphError, UnknownLevelError

__all__ = ["Graph", "Edge"]

#: an edge of the graph, ``(upper, lower)``: the lower level's best response depends on the upper
Edge = tuple[str, str]


@dataclass(frozen=True)
class Graph:
    """A validated DAG over level names. Build it with ``Graph.build``."""

    levels: tuple[str, ...]
    lowers_of: Mapping[str, tuple[str, ...]]
    uppers_of: Mapping[str, tuple[str, ...]]
    bottom_up: tuple[str, ...]

    @staticmethod
    def build(levels: Sequence[str], edges: Mapping[str, Sequence[str]]) -> "Graph":
        seen: set[str] = set()
        for name in levels:
            if name in seen:
                raise GraphError(f"level {name!r} is listed twice; level names must be unique")
            seen.add(name)
        if not isinstance(edges, Mapping):
            raise GraphError(f"graph must be a mapping {{upper: [lowers]}}, got {type(edges).__name__}")
        lowers: dict[str, tuple[str, ...]] = {name: () for name in levels}
        for upper, lows in edges.items():
            if upper not in seen:
                raise GraphError(f"graph names unknown level {upper!r} (as an upper); known levels: {sorted(seen)}")
            if isinstance(lows, str) or not isinstance(lows, Sequence):
                raise GraphError(f"graph[{upper!r}] must be a list of level names, got {lows!r}")
            for low in lows:
                if low not in seen:
                    raise GraphError(
                        f"graph[{upper!r}] names unknown level {low!r}; known levels: {sorted(seen)}"
                    )
                if low == upper:
                    raise GraphError(f"graph has a cycle: {upper} -> {upper}")
            if len(set(lows)) != len(lows):
                raise GraphError(f"graph[{upper!r}] lists a lower level twice: {list(lows)}")
            lowers[upper] = tuple(lows)
        uppers: dict[str, list[str]] = {name: [] for name in levels}
        for upper in levels:
            for low in lowers[upper]:
                uppers[low].append(upper)
        order = _bottom_up(tuple(levels), lowers)
        return Graph(tuple(levels), lowers, {k: tuple(v) for k, v in uppers.items()}, order)

    def require(self, name: str) -> None:
        """Raise `UnknownLevelError` listing the levels unless ``name`` is one of them."""
        if name not in self.lowers_of:
            raise UnknownLevelError(f"unknown level {name!r}; levels: {list(self.levels)}")

    def descendants(self, name: str) -> tuple[str, ...]:
        """Every level reachable below ``name`` (excluding it), in bottom-up order."""
        self.require(name)
        found: set[str] = set()
        stack = list(self.lowers_of[name])
        while stack:
            low = stack.pop()
            if low not in found:
                found.add(low)
                stack.extend(self.lowers_of[low])
        return tuple(n for n in self.bottom_up if n in found)

    @property
    def edges(self) -> tuple[tuple[str, str], ...]:
        """All (upper, lower) pairs."""
        return tuple((u, low) for u in self.levels for low in self.lowers_of[u])


def _bottom_up(levels: tuple[str, ...], lowers: Mapping[str, tuple[str, ...]]) -> tuple[str, ...]:
    """Depth-first topological order (lowers first), stable in the user's order; reports a cycle."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    order: list[str] = []
    path: list[str] = []

    def visit(name: str) -> None:
        if state.get(name) == 2:
            return
        if state.get(name) == 1:
            cycle = path[path.index(name):] + [name]
            raise GraphError("graph has a cycle: " + " -> ".join(cycle))
        state[name] = 1
        path.append(name)
        for low in lowers[name]:
            visit(low)
        path.pop()
        state[name] = 2
        order.append(name)

    for name in levels:
        visit(name)
    return tuple(order)
