"""Logs and progress as hooks: JSON lines per round, TensorBoard, a rich progress bar.

Nothing is printed unless one of these is given to the Engine. Each round's record:

    {"round": 3, "seconds": 0.21, "gpu_peak_bytes": null,
     "levels": {"w": {"loss": 0.52, "grad_norm": 0.13, "steps": 1}, ...},
     "estimators": {"hyper->w": {"residual": 3e-7, "iterations": 10.0, "hvps": 10.0}}}

``loss`` is the level's mean loss over its steps in the round; ``grad_norm`` the L2 norm of the
(hyper)gradient of its last step (before its gradient transform); ``estimators`` what each
edge's estimator reported at its last evaluation (CG residual and iterations, Hessian-vector
products, the finite-difference epsilon, ...); ``seconds`` the round's wall time;
``gpu_peak_bytes`` the peak CUDA memory allocated during the round (``null`` without CUDA).
With several ranks, only rank 0 writes (`mlo.distributed.is_main`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from . import distributed
from .autodiff import Tensors
from .hooks import Hook

if TYPE_CHECKING:
    from .engine import Engine

__all__ = ["RoundMetrics", "JSONLines", "TensorBoard", "Progress"]


class RoundMetrics(Hook):
    """Collects each round's record (see the module docstring) and hands it to ``write``."""

    def __init__(self) -> None:
        self._losses: dict[str, list[Tensor]] = {}
        self._norms: dict[str, Tensor] = {}
        self._start = time.perf_counter()

    def on_run_start(self, engine: "Engine") -> None:
        self._start = time.perf_counter()
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.reset_peak_memory_stats()

    def on_step(self, engine: "Engine", level: str, loss: Tensor) -> None:
        self._losses.setdefault(level, []).append(loss)

    def on_gradient(self, engine: "Engine", level: str, grads: Tensors) -> None:
        with torch.no_grad():
            self._norms[level] = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(list(grads)))) if grads else torch.zeros(())

    def record(self, engine: "Engine") -> dict[str, Any]:
        """This round's record; resets the per-round accumulators."""
        now = time.perf_counter()
        levels = {}
        for name, losses in self._losses.items():
            norm = self._norms.get(name)
            levels[name] = {
                "loss": float(torch.stack(losses).double().mean()),
                "grad_norm": None if norm is None else float(norm),
                "steps": len(losses),
            }
        peak = None
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            peak = int(torch.cuda.max_memory_allocated())
            torch.cuda.reset_peak_memory_stats()
        record = {
            "round": engine.round,
            "seconds": now - self._start,
            "gpu_peak_bytes": peak,
            "levels": levels,
            "estimators": {f"{u}->{low}": dict(info) for (u, low), info in engine.diagnostics.by_edge.items()},
        }
        self._losses, self._norms, self._start = {}, {}, now
        return record

    def on_round(self, engine: "Engine") -> None:
        record = self.record(engine)
        if distributed.is_main():
            self.write(record)

    def write(self, record: dict[str, Any]) -> None:
        """Where the record goes; subclasses define it."""
        raise NotImplementedError


class JSONLines(RoundMetrics):
    """Append one JSON object per round to ``path`` (rank 0 only)."""

    def __init__(self, path: str | Path) -> None:
        super().__init__()
        self.path = Path(path)

    def write(self, record: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


class TensorBoard(RoundMetrics):
    """Write each round's record as TensorBoard scalars under ``log_dir`` (rank 0 only):
    ``<level>/loss``, ``<level>/grad_norm``, ``<upper>-><lower>/<diagnostic>``, ``round/seconds``,
    ``round/gpu_peak_bytes``. Needs the ``tensorboard`` package (``pip install mlo[logs]``)."""

    def __init__(self, log_dir: str | Path) -> None:
        super().__init__()
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ImportError(
                "mlo.logs.TensorBoard needs the tensorboard package: pip install tensorboard (or mlo[logs]); "
                "mlo.logs.JSONLines writes the same records without it"
            ) from None
        self.writer = SummaryWriter(str(log_dir)) if distributed.is_main() else None

    def write(self, record: dict[str, Any]) -> None:
        if self.writer is None:
            return
        step = record["round"]
        for level, values in record["levels"].items():
            for key in ("loss", "grad_norm"):
                if values[key] is not None:
                    self.writer.add_scalar(f"{level}/{key}", values[key], step)
        for edge, info in record["estimators"].items():
            for key, value in info.items():
                self.writer.add_scalar(f"{edge}/{key}", value, step)
        self.writer.add_scalar("round/seconds", record["seconds"], step)
        if record["gpu_peak_bytes"] is not None:
            self.writer.add_scalar("round/gpu_peak_bytes", record["gpu_peak_bytes"], step)
        self.writer.flush()

    def on_run_end(self, engine: "Engine") -> None:
        if self.writer is not None:
            self.writer.flush()


class Progress(Hook):
    """A rich progress bar over rounds with each level's latest mean loss (rank 0 only).

    Args:
        total: rounds expected (the bar's length); ``None`` for an open-ended bar.
        description: the bar's label.
        progress: an existing ``rich.progress.Progress`` to add the bar to (several phases in
            one display); by default the hook makes one and shows it while ``Engine.run`` runs.
    """

    def __init__(self, total: int | None = None, description: str = "rounds", progress: Any | None = None) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
        from rich.progress import Progress as RichProgress

        self.own = progress is None
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TextColumn("{task.fields[losses]}"))
        self.progress = RichProgress(*columns, transient=False, disable=not distributed.is_main()) if progress is None else progress
        self.task = self.progress.add_task(description, total=total, losses="")
        self._losses: dict[str, list[Tensor]] = {}

    def on_run_start(self, engine: "Engine") -> None:
        if self.own:
            self.progress.start()

    def on_step(self, engine: "Engine", level: str, loss: Tensor) -> None:
        self._losses.setdefault(level, []).append(loss)

    def on_round(self, engine: "Engine") -> None:
        shown = "  ".join(f"{k} {float(torch.stack(v).double().mean()):.3f}" for k, v in self._losses.items())
        self._losses = {}
        self.progress.update(self.task, completed=engine.round, losses=shown)

    def on_run_end(self, engine: "Engine") -> None:
        if self.own:
            self.progress.stop()
