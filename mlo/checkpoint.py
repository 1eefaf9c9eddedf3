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
SIGTERM at the end of the round in progress before the process exits (raising `Interrupted`,
which names the checkpoint). `load_latest` restores the newest checkpoint that reads intact,
warning (`CheckpointWarning`) about each newer one it had to skip and why.

Several ranks (data-parallel under torchrun): ``save`` and ``load`` are collective, every rank
calls them, and the checkpoint is a directory written and read with
``torch.distributed.checkpoint`` (`mlo.distributed_checkpoint`): the state every rank holds
identically (parameters, optimizers, schedulers, gradient-transform state, scalers) is stored
once, and each rank's own state (random generators, data position in its shard, hooks' state,
buffers) once per rank, so that every rank resumes exactly. It is written to a temporary
directory and renamed by rank 0 when all ranks have written, and read back by as many ranks as
wrote it. One process keeps the single file.
"""

from __future__ import annotations

import os
import pickle
import re
import shutil
import signal
import threading
import warnings
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

import torch

from . import distributed
from .errors import CheckpointError, CheckpointWarning, ConfigError, first_line
from .hooks import Hook

if TYPE_CHECKING:
    from .engine import Engine

__all__ = [
    "save", "load", "load_latest", "read", "write_atomic", "latest", "Checkpoint", "Interrupted", "CheckpointWarning", "FORMAT",
]

#: the format tag stored in every checkpoint
FORMAT = "mlo-checkpoint/1"


class Interrupted(SystemExit):
    """A run stopped by SIGINT or SIGTERM after `Checkpoint` wrote ``path`` (the exit status is
    128 + the signal number, as a shell reports a process killed by it)."""

    def __init__(self, signum: int, path: Path, round: int) -> None:
        super().__init__(128 + signum)
        self.signum, self.path, self.round = signum, path, round

    def __str__(self) -> str:
        return (f"interrupted by {signal.Signals(self.signum).name} at round {self.round}; "
                f"checkpoint written: {self.path}")


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
    """A checkpoint's contents, read with ``weights_only=True`` onto the CPU: a file, or (every
    rank of a process group) a directory of several ranks, this rank's state."""
    path = Path(path)
    if path.is_dir():
        from . import distributed_checkpoint  # imported only here: torch.distributed.checkpoint is slow to import

        state = distributed_checkpoint.read(path)
        _check_format(path, state)
        return state
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "weights only" in str(err).lower() or "weights_only" in str(err):
            raise CheckpointError(
                f"checkpoint {str(path)!r} holds objects other than tensors and plain values; refused "
                f"(it is read with torch.load(weights_only=True), which runs no pickled code): {first_line(err)}"
            ) from None
        raise CheckpointError(f"checkpoint {str(path)!r} is corrupt: {first_line(err)}") from None
    except Exception as err:  # zip reader errors, EOFError, ...: all mean a damaged file
        raise CheckpointError(
            f"checkpoint {str(path)!r} is truncated or corrupt ({type(err).__name__}: {first_line(err)})"
        ) from None
    _check_format(path, state)
    return state


def _check_format(path: Path, state: Any) -> None:
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {str(path)!r} is not an mlo checkpoint (no {FORMAT!r} tag)")


def save(engine: "Engine", path: str | Path, **extra: Any) -> Path:
    """Write ``engine.state_dict()`` (and ``extra`` plain values, e.g. a config) to ``path``
    atomically. Returns the path. Under a process group every rank calls it, and ``path`` is a
    directory (torch.distributed.checkpoint) holding every rank's state."""
    state = {"format": FORMAT, "engine": engine.state_dict(), "extra": extra}
    if distributed.active():
        from . import distributed_checkpoint  # imported only under a process group (slow to import)

        return distributed_checkpoint.write(state, Path(path), _replicated(engine))
    return write_atomic(state, path)


#: the parts of a level's state that are the same on every rank (derived from averaged gradients)
_REPLICATED_PARTS = ("optimizer", "scheduler", "transform", "last_gradient")


def _replicated(engine: "Engine") -> Callable[[tuple[Any, ...]], bool]:
    """Which tensors of ``engine.state_dict()`` are the same on every rank (by their path): each
    level's parameters, optimizer, scheduler, gradient-transform state and last gradient, and
    the gradient scalers. Everything else (generators, data positions, hooks' state, buffers) is
    each rank's own."""
    parameters = {name: {n for n, _ in p.module.named_parameters()} for name, p in engine.program.problems.items()}

    def replicated(where: tuple[Any, ...]) -> bool:
        if where[:2] == ("engine", "scalers"):
            return True
        if where[:2] != ("engine", "levels") or len(where) < 4:
            return False
        level, part = where[2], where[3]
        if part == "module":
            return len(where) > 4 and where[4] in parameters[level]
        return part in _REPLICATED_PARTS

    return replicated


def load(engine: "Engine", path: str | Path) -> dict[str, Any]:
    """Restore ``engine`` (built on the same program) from ``path``; returns the ``extra`` values
    saved with it. Raises `CheckpointError` naming the file if it cannot be read."""
    state = read(path)
    engine.load_state_dict(state["engine"])
    return dict(state.get("extra", {}))


def load_latest(engine: "Engine", directory: str | Path, prefix: str = "checkpoint") -> Path | None:
    """Restore ``engine`` from the newest checkpoint in ``directory`` (`latest`'s naming) that
    reads intact; returns its path, or ``None`` when there is no checkpoint. Each newer one that
    is truncated or corrupt is skipped with a `CheckpointWarning` naming it and why; when none
    reads, `CheckpointError` lists them all."""
    found = [path for _, path in reversed(_numbered(Path(directory), prefix))]
    problems = []
    for path in found:
        try:
            state = read(path)
        except CheckpointError as err:
            problems.append(str(err))
            continue
        for problem in problems:
            warnings.warn(f"{problem}; skipped, resuming from the older {str(path)!r}", CheckpointWarning, stacklevel=2)
        engine.load_state_dict(state["engine"])
        return path
    if problems:
        raise CheckpointError(f"no checkpoint {prefix}-* in {str(directory)!r} could be read: " + "; ".join(problems))
    return None


def _numbered(directory: Path, prefix: str) -> list[tuple[int, Path]]:
    """The checkpoints ``<prefix>-<round>.pt`` (one process) and ``<prefix>-<round>/`` (several)."""
    pattern = re.compile(re.escape(prefix) + r"-(\d+)(\.pt)?")
    found = []
    for path in directory.glob(f"{prefix}-*") if directory.is_dir() else []:
        match = pattern.fullmatch(path.name)
        if match:
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest(directory: str | Path, prefix: str = "checkpoint") -> Path | None:
    """The newest checkpoint in ``directory`` (by round): ``<prefix>-<round>.pt``, or the
    directory ``<prefix>-<round>`` of several ranks; ``None`` if there is none."""
    found = _numbered(Path(directory), prefix)
    return found[-1][1] if found else None


class Checkpoint(Hook):
    """Save the engine to ``directory/<prefix>-<round>.pt`` (under a process group: the directory
    ``directory/<prefix>-<round>``) every ``every`` rounds, keeping the newest ``keep``, and on
    SIGINT/SIGTERM.

    While ``Engine.run`` runs, SIGINT and SIGTERM are caught: the round in progress finishes, a
    checkpoint is written, and the process exits with status 128 + the signal number. A second
    signal before that ends the process at once (the last checkpoint on disk stays intact).
    """

    def __init__(self, directory: str | Path, every: int, keep: int = 2, prefix: str = "checkpoint", **extra: Any) -> None:
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ConfigError(f"Checkpoint: every must be an int >= 1, got {every!r}")
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
            raise ConfigError(f"Checkpoint: keep must be an int >= 1, got {keep!r}")
        self.directory, self.every, self.keep, self.prefix, self.extra = Path(directory), every, keep, prefix, extra
        self.pending: int | None = None
        self._previous: dict[int, Any] = {}

    def path(self, round: int) -> Path:
        """Where the checkpoint of round ``round`` goes: a file, or a directory under a process group."""
        return self.directory / f"{self.prefix}-{round:08d}{'' if distributed.active() else '.pt'}"

    def save(self, engine: "Engine") -> Path:
        """Write a checkpoint of the engine now (every rank, under a process group); then rank 0
        drops the oldest beyond ``keep``."""
        path = save(engine, self.path(engine.round), **self.extra)
        if distributed.is_main():
            for _, old in _numbered(self.directory, self.prefix)[: -self.keep]:
                if old.is_dir():
                    shutil.rmtree(old)
                else:
                    old.unlink(missing_ok=True)
        distributed.barrier()
        return path

    def on_round(self, engine: "Engine") -> None:
        # every rank stops at the same round when any of them was signalled
        stop = distributed.any_rank(self.pending is not None) if distributed.active() else self.pending is not None
        if engine.round % self.every == 0 or stop:
            path = self.save(engine)
        if stop:
            raise Interrupted(self.pending or signal.SIGTERM, path, engine.round)

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
