"""`mlo run lfm-cw` killed with SIGKILL in any phase, then `mlo run --resume OUT`: every run's
results, genotype and per-round log are the same as those of a run never interrupted.

The child stalls when it writes a file whose name matches a pattern (after the file's data is
written, before its rename), says so, and is killed there: a kill at a chosen point of a chosen
phase. The default suite kills in W1's warm-up (where a resume once differed, because the mistakes
W1 had measured were not saved); ``MLO_LONG_TESTS=1`` kills in every phase."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mlo.cli import main

from .helpers import single_threaded, wait_for_line

#: ``mlo run`` (argv after the pattern) that stalls when it syncs a file whose name matches the
#: regular expression ``sys.argv[1]``, after printing "writing"
_STALL = """
import os, re, sys, time
from mlo.cli import main
real, pattern = os.fsync, re.compile(sys.argv[1])
def fsync(fd):
    try:
        name = os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))
    except OSError:
        name = ""
    if pattern.search(name):
        print("writing", flush=True)
        time.sleep(600)
    real(fd)
os.fsync = fsync
sys.exit(main(sys.argv[2:]))
"""

#: two methods (the second with phi frozen: its class weights are no level) and two seeds, at
#: tiny sizes, with every warm-up, fixed evaluation seeds, and a checkpoint every round
_TINY = [
    "lfm-cw", "--methods", "lfm-cw,lfm-cw-mistakes", "--seeds", "2", "--rounds", "3", "--eval-epochs", "1",
    "--set", "batch_size=16", "--set", "layers=1", "--set", "channels=2", "--set", "cell_steps=1",
    "--set", "eval_layers=1", "--set", "eval_channels=2", "--set", "w1_warmup=3", "--set", "w2_warmup=3",
    "--set", "generator_warmup=5", "--set", "synthetic_per_step=8", "--set", "eval_seeds=2", "--checkpoint-every", "1",
]
#: one method and seed through P-DARTS's three stages (two rounds each)
_PDARTS = [
    "lfm-cw", "--space", "p-darts", "--rounds", "6", "--eval-epochs", "1",
    "--set", "batch_size=16", "--set", "layers=1", "--set", "channels=2", "--set", "cell_steps=1",
    "--set", "eval_layers=1", "--set", "eval_channels=2", "--set", "w1_warmup=3", "--set", "w2_warmup=3",
    "--set", "generator_warmup=5", "--set", "synthetic_per_step=8", "--set", "eval_seeds=2", "--checkpoint-every", "1",
]

#: one method and one seed; two methods and one seed; one method and two seeds
_ONE = [a for a in _TINY if a not in ("--methods", "lfm-cw,lfm-cw-mistakes", "--seeds", "2")]
_TWO_METHODS = [a for a in _TINY if a not in ("--seeds", "2")]
_TWO_SEEDS = [a for a in _TINY if a not in ("--methods", "lfm-cw,lfm-cw-mistakes")]

#: phase -> (the file whose write is killed, the argv)
PHASES: dict[str, tuple[str, list[str]]] = {
    "generator (cVAE pretraining)": (r"^\.digits-seed0\.pt\.tmp-", _ONE),
    "W1 warm-up": (r"^\.checkpoint-seed0-warmup-w1-00000002\.pt\.tmp-", _ONE),
    "W1 warm-up end (cache write)": (r"^\.seed0-warmup-w1\.pt\.tmp-", _ONE),
    "W2 warm-up": (r"^\.checkpoint-seed0-warmup-w2-cvae-00000002\.pt\.tmp-", _ONE),
    "search": (r"^\.checkpoint-lfm-cw-seed0-search-00000002\.pt\.tmp-", _ONE),
    "evaluation": (r"^results\.json\.tmp$", _ONE),
    "between methods (2nd method's first round)": (r"^\.checkpoint-lfm-cw-mistakes-seed0-search-00000001\.pt\.tmp-", _TWO_METHODS),
    "search, phi frozen (2nd method)": (r"^\.checkpoint-lfm-cw-mistakes-seed0-search-00000002\.pt\.tmp-", _TWO_METHODS),
    "between seeds (seed 1's W1 warm-up)": (r"^\.checkpoint-seed1-warmup-w1-00000001\.pt\.tmp-", _TWO_SEEDS),
    "P-DARTS stage 1": (r"^\.checkpoint-lfm-cw-seed0-search-stage1-00000001\.pt\.tmp-", _PDARTS),
    "P-DARTS stage 2": (r"^\.checkpoint-lfm-cw-seed0-search-stage2-00000001\.pt\.tmp-", _PDARTS),
    "P-DARTS stage 3": (r"^\.checkpoint-lfm-cw-seed0-search-stage3-00000001\.pt\.tmp-", _PDARTS),
}
DEFAULT = ("W1 warm-up",)


def _without_times(value: Any) -> Any:
    """``value`` with every wall-clock entry removed (they differ between any two runs)."""
    if isinstance(value, dict):
        return {k: _without_times(v) for k, v in value.items() if k not in ("seconds", "search_seconds")}
    if isinstance(value, list):
        return [_without_times(v) for v in value]
    return value


def differences(a: Path, b: Path) -> list[str]:
    """What differs between two output folders of `mlo run`: the runs in results.json (all but
    times), every genotype, per-round log and class-weight history."""
    found = []
    first, second = (_without_times(json.loads((d / "results.json").read_text())["runs"]) for d in (a, b))
    if first != second:
        found.append("results.json runs")
    for pattern in ("genotype-*.json", "log-*.json", "class-weights-*.json"):
        names = sorted(p.name for p in a.glob(pattern))
        if names != sorted(p.name for p in b.glob(pattern)):
            found.append(f"{pattern}: different files")
        found += [name for name in names if (b / name).is_file() and (a / name).read_text() != (b / name).read_text()]
    return found


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[tuple[str, ...], Path]]:
    """The output folder of each argv run without interruption (made when first asked for)."""

    class Runs(dict):  # type: ignore[type-arg]
        def __missing__(self, argv: tuple[str, ...]) -> Path:
            out = tmp_path_factory.mktemp("whole")
            with single_threaded():
                assert main(["run", *argv, "--out", str(out)]) == 0
            self[argv] = out
            return out

    yield Runs()


def kill_and_resume(argv: list[str], pattern: str, out: Path) -> None:
    """Run ``argv`` into ``out`` in a child, SIGKILL it while it writes a file matching
    ``pattern``, then resume it here."""
    proc = subprocess.Popen([sys.executable, "-c", _STALL, pattern, "run", *argv, "--out", str(out)], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    wait_for_line(proc, "writing", timeout=600)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    with single_threaded():
        assert main(["run", "--resume", str(out)]) == 0


@pytest.mark.parametrize("phase", [
    p if p in DEFAULT else pytest.param(p, marks=[pytest.mark.slow, pytest.mark.skipif(
        not os.environ.get("MLO_LONG_TESTS"), reason="a tiny `mlo run` killed and resumed (about 30 s); set MLO_LONG_TESTS=1")])
    for p in PHASES
])
def test_a_kill_in_any_phase_resumes_bit_for_bit(phase: str, uninterrupted: dict[tuple[str, ...], Path], tmp_path: Path) -> None:
    pattern, argv = PHASES[phase]
    whole = uninterrupted[tuple(argv)]
    kill_and_resume(argv, pattern, tmp_path / "killed")
    assert differences(whole, tmp_path / "killed") == []
