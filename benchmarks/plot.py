"""The estimators suite's figure: relative error against cost, one row per program.

Left column: error against Hessian-vector products (as mlo reports them; estimators that report
none are left out of that panel). Right column: error against wall time of one hypergradient.
Log scales on both axes; a swept estimator is a line through its settings, an estimator run at
one setting a single marker.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from .timing import Result

__all__ = ["error_against_cost"]

_FLOOR = 1e-17  # exact answers are drawn at this error so that log axes can show them


def _series(r: Result) -> str:
    return str(r.extra.get("series", r.extra.get("estimator", r.algorithm)))


def error_against_cost(results: Sequence[Result], path: str | Path) -> Path:
    """Write the figure for ``results`` of the estimators suite to ``path`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    problems = list(dict.fromkeys(r.problem for r in results))
    names = list(dict.fromkeys(_series(r) for r in results))
    colors = {n: plt.get_cmap("tab10")(i % 10) for i, n in enumerate(names)}
    fig, axes = plt.subplots(len(problems), 2, figsize=(12, 3.4 * len(problems)), squeeze=False)
    for row, problem in zip(axes, problems):
        series: dict[str, list[Result]] = defaultdict(list)
        for r in results:
            if r.problem == problem and not math.isnan(r.extra.get("relative_error", math.nan)):
                series[_series(r)].append(r)
        uncounted = []
        for name, rs in series.items():
            err = [max(r.extra["relative_error"], _FLOOR) for r in rs]
            style = {"color": colors[name], "label": name, "marker": "o", "markersize": 4}
            with_hvps = [(r.extra["hvps"], e) for r, e in zip(rs, err) if r.extra.get("hvps")]
            if with_hvps:
                xs, ys = zip(*with_hvps)
                row[0].plot(xs, ys, **style)
            else:
                uncounted.append(name)
            row[1].plot([r.median_s * 1e3 for r in rs], err, **style)
        if uncounted:
            row[0].text(0.02, 0.02, "no HVP count: " + ", ".join(uncounted), transform=row[0].transAxes,
                        fontsize=7, color="0.35")
        for ax, xlabel in zip(row, ("Hessian-vector products (reported by mlo)", "wall time per hypergradient (ms)")):
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel(xlabel)
            ax.set_ylabel("relative error")
            ax.set_title(problem)
            ax.grid(True, which="major", alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=8, loc="best")
    fig.suptitle("Hypergradient estimators: relative error against cost (lower levels at their optimum)")
    fig.tight_layout(rect=(0, 0, 1, 0.98))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
