"""`Stream`: a level's position in its data, saved and restored for an exact resume.

A stream draws a level's batches from ``Problem.batches()`` and remembers where it is, so that a
resumed run draws exactly the batches an uninterrupted run would, without replaying every batch
drawn so far:

- data with ``state_dict`` / ``load_state_dict`` (`mlo.loader.SeekableLoader`, torchdata's
  ``StatefulDataLoader``): its position before the batch in use; loading seeks there and draws
  that batch again;
- any other data (a ``DataLoader``, a list): the random state at the start of the current pass
  (the global generators, and the generators the ``DataLoader`` and its sampler hold) and the
  number of batches drawn in it, and the pass's number (a ``DistributedSampler``'s epoch);
  loading restores that state, restarts the pass (a shuffled ``DataLoader`` draws the same
  permutation) and replays the pass's batches only.

Data that draws from a generator of its own that it does not expose is exact only with
``state_dict`` / ``load_state_dict``.
"""

from __future__ import annotations

from typing import Any

import torch

from . import rng
from .errors import ProgramError
from .problem import Problem

__all__ = ["Stream"]


def _stateful(obj: Any) -> bool:
    """Whether ``obj`` saves and restores its own position (``state_dict`` / ``load_state_dict``)."""
    return callable(getattr(obj, "state_dict", None)) and callable(getattr(obj, "load_state_dict", None))


def _generators(data: Any) -> list[torch.Generator]:
    """The generators a DataLoader and its sampler draw from (each once)."""
    found: dict[int, torch.Generator] = {}
    sampler = getattr(data, "sampler", None)
    for owner in (data, sampler, getattr(getattr(data, "batch_sampler", None), "sampler", None)):
        g = getattr(owner, "generator", None)
        if isinstance(g, torch.Generator):
            found.setdefault(id(g), g)
    return list(found.values())


class Stream:
    """The batches of one level: the batch in use, how many were drawn, and where in its data."""

    def __init__(self, problem: Problem) -> None:
        self.problem = problem
        self.seekable = _stateful(problem.data)
        #: the generators the data draws from, found once (a list or tuple draws from none)
        self._generators = [] if isinstance(problem.data, (list, tuple)) else _generators(problem.data)
        self.batch: Any = None
        self.drawn = 0
        self._restart()

    def _restart(self, first_pass: int = 0) -> None:
        self.batch = None
        self._iterator = self.problem.batches(None if self.seekable else self._on_pass, first_pass)
        self._passes = first_pass  # passes begun, counting from the run's start
        self._pass: dict[str, Any] | None = None
        self._in_pass = 0
        self._before: Any = None

    def _on_pass(self) -> None:
        data = self.problem.data
        self._pass = {
            # a list or tuple draws no random numbers when iterated, so there is nothing to replay;
            # capturing the global generators costs ~0.2 ms, once per pass: every round for a full batch
            "rng": None if isinstance(data, (list, tuple)) else rng.get_state(),
            "generators": [g.get_state() for g in self._generators],
            "number": self._passes,
        }
        self._passes += 1
        self._in_pass = 0

    def draw(self) -> Any:
        """The next batch, which becomes the batch in use."""
        if self.seekable:
            self._before = self.problem.data.state_dict()  # type: ignore[union-attr]
        self.batch = next(self._iterator)
        self._in_pass += 1
        self.drawn += 1
        return self.batch

    def state_dict(self) -> dict[str, Any]:
        if self.seekable:
            data = self._before if self.drawn else self.problem.data.state_dict()  # type: ignore[union-attr]
            return {"drawn": self.drawn, "data": data}
        return {"drawn": self.drawn, "pass": self._pass, "in_pass": self._in_pass}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Go to a saved position. Moves the global generators: restore them afterwards."""
        saved_pass = state.get("pass")
        self._restart(int(saved_pass.get("number", 0)) if saved_pass is not None else 0)
        drawn = int(state["drawn"])
        if self.seekable and state.get("data") is not None:
            self.problem.data.load_state_dict(state["data"])  # type: ignore[union-attr]
            replay = min(drawn, 1)
        elif state.get("pass") is not None:
            saved = state["pass"]
            if saved["rng"] is not None:
                rng.set_state(saved["rng"])
            generators = self._generators
            if len(generators) != len(saved["generators"]):
                raise ProgramError(
                    f"level {self.problem.name!r}: its data holds {len(generators)} generator(s), "
                    f"the saved state {len(saved['generators'])}"
                )
            for g, g_state in zip(generators, saved["generators"]):
                g.set_state(g_state)
            replay = int(state["in_pass"])
        else:  # saved without a position (an older state, or nothing drawn): replay everything
            replay = drawn
        for _ in range(replay):
            self.draw()
        self.drawn = drawn
