"""The ``lfm-cw`` suite: LFM-CW against DARTS first and second order and its ablations.

Planned: on digits and on long-tailed digits, at least 3 seeds, mean +- std of test error and
balanced error, through the shared harness (`benchmarks.timing`). It runs the LFM-CW program,
``mlo.problems.lfm_cw``; until the suite is written on top of it, `run` raises
`SuiteUnavailable` saying so.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["SuiteUnavailable", "run"]


class SuiteUnavailable(NotImplementedError):
    """A benchmark suite whose program is not part of this installation yet."""


def run(quick: bool = False, json_path: str | Path | None = None, out: str | Path | None = None,
        console: Any = None) -> list[Any]:
    """Not available yet: raises `SuiteUnavailable` until ``mlo.problems.lfm_cw`` provides the program."""
    raise SuiteUnavailable(
        "the lfm-cw suite is not implemented yet: it will run the LFM-CW program (mlo.problems.lfm_cw) "
        "against DARTS first/second order and its ablations. Use `mlo bench estimators` or "
        "`mlo bench speed` meanwhile."
    )
