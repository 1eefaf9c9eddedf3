"""Every error mlo raises on purpose is an `mlo.MLOError` (as `mlo.errors` promises), so one
``except mlo.MLOError`` catches them, while each keeps the built-in base callers may catch."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from torch import nn

import mlo

CORE = Path(mlo.__file__).parent
BUILTIN = {"ValueError", "TypeError", "KeyError", "RuntimeError", "IndexError", "FileNotFoundError", "OSError"}
#: raises of built-in exceptions that never leave their function: each is caught a few lines
#: below and re-raised as an MLOError naming the option or the checkpoint
INTERNAL = {("config.py", "TypeError"), ("config.py", "ValueError"), ("distributed_checkpoint.py", "ValueError")}


def _builtin_raises(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Raise) and node.exc is not None:
            call = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
            if isinstance(call, ast.Name) and call.id in BUILTIN:
                found.append((node.lineno, call.id))
    return found


def test_the_bundled_programs_raise_no_bare_builtin_exception():
    """`mlo.problems` too: a bad option or bad data raises ConfigError, DataError, ... (each
    still the ValueError, TypeError or FileNotFoundError it was)."""
    import mlo.problems

    root = Path(mlo.problems.__file__).parent
    stray = [f"{path.relative_to(root)}:{line} raises {name}" for path in sorted(root.rglob("*.py")) for line, name in _builtin_raises(path)]
    assert stray == []


def test_the_core_raises_no_bare_builtin_exception():
    stray = [
        f"{path.relative_to(CORE)}:{line} raises {name}"
        for path in sorted(CORE.rglob("*.py"))
        for line, name in _builtin_raises(path)
        if (path.name, name) not in INTERNAL and not (path.name == "rng.py" and name == "RuntimeError")
    ]
    assert stray == []


def test_argument_errors_are_mlo_errors_and_keep_their_builtin_base():
    with pytest.raises(mlo.ArgumentError, match="module must be an nn.Module") as caught:
        mlo.Problem("fit", "not a module", None, loss=lambda batch: torch.zeros(()))  # type: ignore[arg-type]
    assert isinstance(caught.value, TypeError) and isinstance(caught.value, mlo.MLOError)
    net = nn.Linear(1, 1)
    with pytest.raises(mlo.ProgramError, match="steps must be an int >= 0") as bad:
        mlo.Problem("fit", net, torch.optim.SGD(net.parameters(), 0.1), steps=-1, loss=lambda batch: torch.zeros(()))
    assert isinstance(bad.value, ValueError)
    with pytest.raises(mlo.ConfigError, match="max_norm"):
        mlo.transforms.clip_by_global_norm(0.0)
    with pytest.raises(mlo.UnknownProgramError, match="unknown program 'nonesuch'") as unknown:
        mlo.programs.get("nonesuch")
    assert isinstance(unknown.value, KeyError)
