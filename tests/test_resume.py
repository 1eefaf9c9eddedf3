"""`mlo run --resume` and interrupted runs as a user meets them: resuming a copied folder works in
that folder, a damaged newest checkpoint falls back to the one before it (saying so), options
given with --resume are named as ignored, and Ctrl-C ends with one line saying how to resume."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest

from mlo.checkpoint import CheckpointWarning
from mlo.cli import main, one_line_warnings

pytestmark = pytest.mark.usefixtures("one_thread")

#: a search of 3 rounds and 1 evaluation epoch on digits, checkpointed every round
TINY = ["darts-2nd", "--rounds", "3", "--eval-epochs", "1", "--set", "batch_size=16", "--set", "layers=1",
        "--set", "channels=2", "--set", "cell_steps=1", "--set", "eval_layers=1", "--set", "eval_channels=2",
        "--set", "w1_warmup=0", "--checkpoint-every", "1"]


@pytest.fixture(scope="module")
def whole(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The output folder of a tiny run never interrupted."""
    out = tmp_path_factory.mktemp("resume") / "whole"
    assert main(["run", *TINY, "--out", str(out)]) == 0
    return out


def _unfinished_copy(whole: Path, copy: Path) -> Path:
    """``whole`` copied to ``copy`` as if killed after its search: checkpoints, no results."""
    shutil.copytree(whole, copy)
    (copy / "results.json").unlink()
    return copy


def _outcome(out: Path) -> dict[str, object]:
    run = json.loads((out / "results.json").read_text())["runs"][0]
    return {"test_error": run["test_error"], "params": run["params"], "genotype": (out / run["genotype"]).read_text(),
            "history": [{k: v for k, v in h.items() if k != "seconds"} for h in run["history"]]}


def test_resume_of_a_copied_folder_works_in_that_folder_and_names_ignored_options(
    whole: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = (whole / "results.json").read_bytes()
    copy = _unfinished_copy(whole, tmp_path / "copy")
    capsys.readouterr()
    assert main(["run", "--resume", str(copy), "--rounds", "50", "--set", "lam=2"]) == 0
    err = capsys.readouterr().err
    assert f"config.json names the folder {str(whole)!r}; resuming in {str(copy)!r}" in err
    assert "ignored: --rounds 50, --set lam=2" in err
    assert (whole / "results.json").read_bytes() == before  # the original folder is untouched
    assert json.loads((copy / "results.json").read_text())["config"]["out"] == str(copy)
    assert _outcome(copy) == _outcome(whole)


def test_a_truncated_newest_checkpoint_is_skipped_for_the_previous_one_saying_so(whole: Path, tmp_path: Path) -> None:
    copy = _unfinished_copy(whole, tmp_path / "copy")
    newest = sorted(copy.glob("checkpoint-*-search-*.pt"))[-1]
    newest.write_bytes(newest.read_bytes()[:300])
    with pytest.warns(CheckpointWarning) as caught:
        assert main(["run", "--resume", str(copy)]) == 0
    (warned,) = [w for w in caught if w.category is CheckpointWarning]
    with one_line_warnings("mlo run"):  # as the command shows it: one line naming the file and why
        line = warnings.formatwarning(warned.message, warned.category, warned.filename, warned.lineno)
    assert line.startswith(f"mlo run: warning: CheckpointWarning: checkpoint {str(newest)!r} is truncated or corrupt (")
    assert re.search(r"; skipped, resuming from the older '[^']*-00000002\.pt'\n$", line) and line.count("\n") == 1
    assert _outcome(copy) == _outcome(whole)  # one round run again from round 2: the same run


def _interrupt(args: list[str], out: Path, ready: str) -> tuple[int, str]:
    """``mlo run ARGS --out OUT`` in a child, sent SIGINT once the glob ``ready`` matches in OUT;
    its exit status and stderr."""
    proc = subprocess.Popen([sys.executable, "-m", "mlo", "run", *args, "--out", str(out)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 240
    while not list(out.glob(ready)) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err


def test_ctrl_c_with_checkpoints_names_the_checkpoint_and_the_resume_command(tmp_path: Path) -> None:
    out = tmp_path / "run"
    long = [*TINY, "--rounds", "1000"]
    status, err = _interrupt(long, out, "checkpoint-*-search-*.pt")
    assert status == 130, err
    assert "Traceback" not in err
    assert "interrupted by SIGINT at round" in err and "checkpoint written: " + str(out / "checkpoint-darts-2nd-seed0-search-") in err
    assert f"resume with: mlo run --resume {out}" in err


def test_ctrl_c_without_checkpoints_is_one_line(tmp_path: Path) -> None:
    out = tmp_path / "run"
    long = [*TINY[:-2], "--rounds", "1000"]  # without --checkpoint-every
    status, err = _interrupt(long, out, "metrics-*.jsonl")
    assert status == 130, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "interrupted; no checkpoint was written" in lines[0], err
