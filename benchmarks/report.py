"""Ratios between implementations and the rich tables every suite prints.

A ratio compares two implementations measured in the same interleaved run: the median over
repetitions of their per-repetition time ratio (robust to slow drifts of the machine), and,
for reference, the ratio of their medians. Peak memory ratios are ratios of the measured peaks.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from rich.console import Console
from rich.table import Table

from .timing import Result, paired_ratio

__all__ = ["Ratio", "ratio", "ratios_table", "results_table", "print_tables", "make_console"]


@dataclass
class Ratio:
    """``num`` against ``den`` on one problem and algorithm, and the target it is held to."""

    problem: str
    algorithm: str
    num: str
    den: str
    time_ratio: float
    ratio_of_medians: float
    memory_ratio: float
    time_target: float | None = None
    #: the time ratio must be strictly below the target (otherwise at most the target)
    strict: bool = False
    memory_target: float | None = None
    note: str = ""

    @property
    def time_met(self) -> bool | None:
        if self.time_target is None or math.isnan(self.time_ratio):
            return None
        return self.time_ratio < self.time_target if self.strict else self.time_ratio <= self.time_target

    @property
    def memory_met(self) -> bool | None:
        if self.memory_target is None or math.isnan(self.memory_ratio):
            return None
        return self.memory_ratio <= self.memory_target

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "time_met": self.time_met, "memory_met": self.memory_met}


def ratio(num: Result, den: Result, time_target: float | None = None, strict: bool = False,
          memory_target: float | None = None, note: str = "") -> Ratio:
    """``num``'s time and memory over ``den``'s, from their measured samples."""
    mem = num.peak_mb / den.peak_mb if den.peak_mb > 0 else float("nan")
    return Ratio(num.problem, num.algorithm, num.impl, den.impl, paired_ratio(num, den),
                 num.median_s / den.median_s, mem, time_target, strict, memory_target, note)


def _fmt_ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3g}"


def _mark(met: bool | None) -> str:
    return "" if met is None else (" [green]ok[/]" if met else " [red]missed[/]")


def results_table(results: Sequence[Result], title: str, extra_columns: Sequence[str] = (),
                  show_algorithm: bool = True) -> Table:
    """One row per result: median and IQR per round in ms, peak MiB, any ``extra`` columns, note."""
    table = Table(title=title, show_lines=False)
    names = ("problem", "algorithm", "impl") if show_algorithm else ("problem", "impl")
    for col in (*names, "median ms", "IQR ms", "peak MiB", *extra_columns, "note"):
        table.add_column(col, justify="left" if col in (*names, "note") else "right", overflow="fold")
    for r in results:
        extras = [_fmt_extra(r.extra.get(col)) for col in extra_columns]
        note = r.note if len(r.note) <= 60 else r.note[:57] + "..."
        head = (r.problem, r.algorithm, r.impl) if show_algorithm else (r.problem, r.impl)
        table.add_row(*head, _fmt_ms(r.median_s), _fmt_ms(r.iqr_s), f"{r.peak_mb:.3g}", *extras, note)
    return table


def _fmt_extra(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def ratios_table(ratios: Sequence[Ratio], title: str) -> Table:
    """One row per ratio: time (paired median), ratio of medians, memory, and the targets."""
    table = Table(title=title)
    for col in ("problem", "algorithm", "ratio", "time", "of medians", "target", "peak memory", "target", "note"):
        table.add_column(col, overflow="fold")
    for q in ratios:
        t_target = "" if q.time_target is None else f"{'<' if q.strict else '<='} {q.time_target:g}"
        m_target = "" if q.memory_target is None else f"<= {q.memory_target:g}"
        note = q.note if len(q.note) <= 50 else q.note[:47] + "..."
        table.add_row(q.problem, q.algorithm, f"{q.num}/{q.den}", f"{q.time_ratio:.3f}{_mark(q.time_met)}",
                      f"{q.ratio_of_medians:.3f}", t_target, f"{q.memory_ratio:.3f}{_mark(q.memory_met)}", m_target,
                      note)
    return table


def make_console() -> Console:
    """A console for the suites' output: the terminal's width, or 160 columns when piped to a file."""
    return Console() if sys.stdout.isatty() else Console(width=160)


def print_tables(*tables: Table, console: Console | None = None) -> None:
    console = console or make_console()
    for table in tables:
        console.print(table)
