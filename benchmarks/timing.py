"""The shared measuring harness of every suite: interleaved timing, peak memory, JSON output.

Timing. Each contender is a built implementation with a ``step()`` that runs one round. After
``warmup`` rounds each, the contenders run round-robin: repetition ``r`` times one round of each,
in an order drawn at random for it (seeded: the same orders every run). Slow drifts of a noisy
machine (other processes, thermal state) then hit every implementation alike, and ratios taken
repetition by repetition (`paired_ratio`) cancel them. Random orders, not a rotation: a round
finds the caches as the round before it left them, and under a rotation every contender always
follows the same one (measured: mlo's small reweighting unroll(1) round, always after higher's,
took 1.050 of hand-engine's; a second copy of it in the same run, always after mlo's, 1.032).
With random orders every contender follows every other about equally often.
``time.perf_counter`` around each round. The garbage collector is run once before the timed
rounds and then left to run as it normally would (an implementation that creates reference
cycles pays for collecting them).

Peak memory, measured in a separate, untimed round per contender (the tracking slows the round):

- CPU: every tensor storage created during the round is recorded when an ATen op returns it (a
  ``TorchDispatchMode`` sees every op, forward, backward and optimizer alike) and released when
  its storage is freed (a weak reference on the storage); the peak of the bytes alive, counted
  from the round's start. This is what the implementation allocates for tensors, whatever
  library does it; tensors alive before the round (parameters, data, optimizer state) are not
  counted, and neither are Python objects.
- CUDA: ``torch.cuda.max_memory_allocated`` during the round, less what was allocated at its start.
"""

from __future__ import annotations

import gc
import json
import math
import os
import platform
import random
import statistics
import sys
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

__all__ = [
    "Contender",
    "Result",
    "measure",
    "peak_memory_mb",
    "paired_ratio",
    "summary",
    "machine_info",
    "versions",
    "write_json",
    "MEMORY_METHOD",
]

MEMORY_METHOD = (
    "CPU: peak bytes of tensor storages alive during one untimed round, counted from its start "
    "(TorchDispatchMode records each storage an op creates; a weak reference on the storage "
    "releases it); CUDA: torch.cuda.max_memory_allocated above the round's start"
)


@dataclass
class Contender:
    """One implementation of one benchmark, built and ready: ``step()`` runs one round."""

    problem: str
    impl: str
    step: Callable[[], Any]
    #: the algorithm as this implementation runs it (e.g. "neumann(10)"); shown in the table
    algorithm: str = ""
    #: how this implementation's computation differs from the others', if it does
    note: str = ""


@dataclass
class Result:
    """What one contender measured. Times in seconds per round, memory in MiB."""

    problem: str
    impl: str
    algorithm: str
    median_s: float
    q1_s: float
    q3_s: float
    iqr_s: float
    peak_mb: float
    samples_s: list[float]
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


class _StorageTracker(TorchDispatchMode):
    """Tracks bytes of tensor storages created while active; ``peak`` is the most alive at once."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._seen: dict[int, weakref.ref] = {}

    def _release(self, key: int, nbytes: int, _ref: weakref.ref) -> None:
        if self._seen.get(key) is _ref:
            del self._seen[key]
            self.live -= nbytes

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor) or t.device.type != "cpu":
                continue
            storage = t.untyped_storage()
            key = id(storage)
            if key in self._seen and self._seen[key]() is storage:
                continue
            nbytes = storage.nbytes()
            ref: weakref.ref

            def release(r: weakref.ref, key: int = key, nbytes: int = nbytes) -> None:
                self._release(key, nbytes, r)

            ref = weakref.ref(storage, release)
            self._seen[key] = ref
            self.live += nbytes
            self.peak = max(self.peak, self.live)
        return out


def peak_memory_mb(step: Callable[[], Any], device: torch.device | str = "cpu") -> float:
    """Peak MiB of tensor memory one call of ``step`` allocates (see the module docstring)."""
    device = torch.device(device)
    if device.type == "cuda":
        gc.collect()  # so that garbage from earlier rounds does not count in the baseline
        torch.cuda.synchronize(device)
        start = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - start) / 2**20
    tracker = _StorageTracker()
    with tracker:
        step()
    return tracker.peak / 2**20


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(
    contenders: Sequence[Contender],
    repeats: int,
    warmup: int = 2,
    device: torch.device | str = "cpu",
    memory: bool = True,
) -> list[Result]:
    """Time ``contenders`` interleaved (see the module docstring) and measure their peak memory."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    device = torch.device(device)
    for c in contenders:
        for _ in range(warmup):
            c.step()
    _sync(device)
    samples: list[list[float]] = [[] for _ in contenders]
    order = list(range(len(contenders)))
    shuffler = random.Random(0)
    gc.collect()
    for _ in range(repeats):
        shuffler.shuffle(order)
        for i in order:
            _sync(device)
            t0 = time.perf_counter()
            contenders[i].step()
            _sync(device)
            samples[i].append(time.perf_counter() - t0)
    peaks = [peak_memory_mb(c.step, device) if memory else float("nan") for c in contenders]
    results = []
    for c, s, peak in zip(contenders, samples, peaks):
        med, q1, q3 = summary(s)
        results.append(Result(c.problem, c.impl, c.algorithm, med, q1, q3, q3 - q1, peak, list(s), c.note))
    return results


def summary(samples: Sequence[float]) -> tuple[float, float, float]:
    """Median, first and third quartile of ``samples``."""
    if len(samples) == 1:
        return samples[0], samples[0], samples[0]
    q1, med, q3 = statistics.quantiles(samples, n=4, method="inclusive")
    return med, q1, q3


def paired_ratio(num: Result, den: Result) -> float:
    """Median over repetitions of ``num``'s time over ``den``'s in the same repetition."""
    pairs = [a / b for a, b in zip(num.samples_s, den.samples_s) if b > 0]
    return statistics.median(pairs) if pairs else float("nan")


def machine_info() -> dict[str, Any]:
    """Where the numbers were measured."""
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": sys.version.split()[0],
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    return info


def _version(module: str) -> str | None:
    try:
        mod = __import__(module)
    except Exception:  # an optional peer that is missing or broken is reported as absent
        return None
    return str(getattr(mod, "__version__", "unknown"))


def versions() -> dict[str, str | None]:
    """Versions of torch, mlo and the peers (``None``: not installed)."""
    return {name: _version(name) for name in ("torch", "mlo", "betty", "higher", "torchopt", "numpy")}


def write_json(path: str | Path, suite: str, config: dict[str, Any], results: Sequence[Result], **extra: Any) -> Path:
    """Write a suite's results with the machine, versions and config they came from."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "suite": suite,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine_info(),
        "versions": versions(),
        "config": config,
        "results": [asdict(r) for r in results],
        **extra,
    }
    path.write_text(json.dumps(_finite(doc), indent=2, default=_jsonable, allow_nan=False))
    return path


def _finite(value: Any) -> Any:
    """NaN and infinities (a measurement that did not happen) become ``null``: strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    return repr(value)
