"""Checkpoints: an Engine's whole state (`mlo.Engine.state_dict`) written atomically and read back
with ``torch.load(weights_only=True)``.

    mlo.checkpoint.save(engine, "run/checkpoint.pt")    # temporary file, fsync, rename
    mlo.checkpoint.load(engine, "run/checkpoint.pt")    # same program built again, then this
    engine.run(total - engine.round)                      # ends where an uninterrupted run ends

A write never leaves a half-written file under the checkpoint's name: it goes to a temporary
file in the same directory, is flushed to disk, and replaces the old file in one rename. A
process killed in the middle of a write (``kill -9``) leaves the previous checkpoint intact.
Loading refuses a truncated or corrupt file with `CheckpointError` naming it, and refuses any
payload that is not tensors and plain values (``weights_only``: no pickled code runs).

`Checkpoint` is the hook that saves every N rounds, keeps the last few, and saves on SIGINT or
SIGTERM at the end of the round in progress before the process exits.

Several ranks (data-parallel under torchrun): every rank holds the same state (parameters,
optimizers, generators and data positions are replicated; each rank's data is its share of
the same batches), so rank 0 writes one file with ``torch.save`` and every rank loads it; no
state is sharded, so torch.distributed.checkpoint (made for sharded state) is not needed.
"""

from __future__ import annotations

import os
import pickle
import re
import signal
import threading
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

import torch

from . import distributed
from .errors import CheckpointError
from .hooks import Hook

if TYPE_CHECKING:
    from .engine import Engine

__all__ = ["save", "load", "read", "write_atomic", "latest", "Checkpoint", "FORMAT"]

#: the format tag stored in every checkpoint
FORMAT = "mlo-checkpoint/1"


def write_atomic(obj: Any, path: str | Path) -> Path:
    """``torch.save(obj)`` to ``path`` atomically: a temporary file beside it, fsync, rename,
    then fsync of the directory so that the rename itself is on disk."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return path


def read(path: str | Path) -> dict[str, Any]:
    """A checkpoint's contents, read with ``weights_only=True`` onto the CPU."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "weights only" in str(err).lower() or "weights_only" in str(err):
            raise CheckpointError(
                f"checkpoint {str(path)!r} holds objects other than tensors and plain values; refused "
                f"(it is read with torch.load(weights_only=True), which runs no pickled code): {_first_line(err)}"
            ) from None
        raise CheckpointError(f"checkpoint {str(path)!r} is corrupt: {_first_line(err)}") from None
    except Exception as err:  # zip reader errors, EOFError, ...: all mean a damaged file
        raise CheckpointError(
            f"checkpoint {str(path)!r} is truncated or corrupt ({type(err).__name__}: {_first_line(err)})"
        ) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {str(path)!r} is not an mlo checkpoint (no {FORMAT!r} tag)")
    return state


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [""])[0]


def save(engine: "Engine", path: str | Path, **extra: Any) -> Path:
    """Write ``engine.state_dict()`` (and ``extra`` plain values, e.g. a config) to ``path``
    atomically. Returns the path."""
    return write_atomic({"format": FORMAT, "engine": engine.state_dict(), "extra": extra}, path)


def load(engine: "Engine", path: str | Path) -> dict[str, Any]:
    """Restore ``engine`` (built on the same program) from ``path``; returns the ``extra`` values
    saved with it. Raises `CheckpointError` naming the file if it cannot be read."""
    state = read(path)
    engine.load_state_dict(state["engine"])
    return dict(state.get("extra", {}))


def _numbered(directory: Path, prefix: str) -> list[tuple[int, Path]]:
    pattern = re.compile(re.escape(prefix) + r"-(\d+)\.pt")
    found = []
    for path in directory.glob(f"{prefix}-*.pt") if directory.is_dir() else []:
        match = pattern.fullmatch(path.name)
        if match:
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest(directory: str | Path, prefix: str = "checkpoint") -> Path | None:
    """The newest ``<prefix>-<round>.pt`` in ``directory`` (by round), or ``None``."""
    found = _numbered(Path(directory), prefix)
    return found[-1][1] if found else None


class Checkpoint(Hook):
    """Save the engine to ``directory/<prefix>-<round>.pt`` every ``every`` rounds, keeping the
    newest ``keep`` files, and on SIGINT/SIGTERM.

    While ``Engine.run`` runs, SIGINT and SIGTERM are caught: the round in progress finishes, a
    checkpoint is written, and the process exits with status 128 + the signal number. A second
    signal before that ends the process at once (the last checkpoint on disk stays intact).
    """

    def __init__(self, directory: str | Path, every: int, keep: int = 2, prefix: str = "checkpoint", **extra: Any) -> None:
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"Checkpoint: every must be an int >= 1, got {every!r}")
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
            raise ValueError(f"Checkpoint: keep must be an int >= 1, got {keep!r}")
        self.directory, self.every, self.keep, self.prefix, self.extra = Path(directory), every, keep, prefix, extra
        self.pending: int | None = None
        self._previous: dict[int, Any] = {}

    def path(self, round: int) -> Path:
        return self.directory / f"{self.prefix}-{round:08d}.pt"

    def save(self, engine: "Engine") -> Path:
        """Write a checkpoint of the engine now; drop the oldest beyond ``keep``. Under a process
        group the state is the same on every rank (data-parallel), so rank 0 writes it and the
        others wait for the write to finish."""
        path = self.path(engine.round)
        if distributed.is_main():
            save(engine, path, **self.extra)
            for _, old in _numbered(self.directory, self.prefix)[: -self.keep]:
                old.unlink(missing_ok=True)
        distributed.barrier()
        return path

    def on_round(self, engine: "Engine") -> None:
        # every rank stops at the same round when any of them was signalled
        stop = distributed.any_rank(self.pending is not None) if distributed.active() else self.pending is not None
        if engine.round % self.every == 0 or stop:
            self.save(engine)
        if stop:
            raise SystemExit(128 + (self.pending or signal.SIGTERM))

    def on_run_start(self, engine: "Engine") -> None:
        self.pending = None
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._caught)

    def on_run_end(self, engine: "Engine") -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _caught(self, signum: int, frame: FrameType | None) -> None:
        if self.pending is not None:  # a second signal: stop now
            self.on_run_end(None)  # type: ignore[arg-type]
            signal.raise_signal(signum)
            return
        self.pending = signum
