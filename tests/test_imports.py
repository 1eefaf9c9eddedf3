"""The install fits the role: ``import mlo`` pulls in none of the optional extras (nor the slow
torch.distributed.checkpoint), the core runs without them, and the `mlo` command names the extra
to install when a program needs a missing one.

Each check runs in a fresh interpreter, since this process has long imported everything. A
missing package is simulated the way Python itself spells "not importable": ``sys.modules[name] =
None`` makes ``import name`` raise ModuleNotFoundError."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from mlo.extras import EXTRAS, extra_of, install_hint

ROOT = Path(__file__).resolve().parents[1]
#: the extras' top-level modules, plus the part of torch that only multi-rank checkpoints need
NOT_AT_IMPORT = (*EXTRAS, "betty", "torch.distributed.checkpoint", "torch.utils.tensorboard")
BLOCK_EXTRAS = f"import sys\nfor name in {sorted({*EXTRAS, 'betty'})!r}:\n    sys.modules[name] = None\n"


def _python(code: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_import_mlo_pulls_in_no_extra() -> None:
    out = _python(f"import sys, mlo\nprint([m for m in {NOT_AT_IMPORT!r} if m in sys.modules])")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", f"import mlo imported {out.stdout.strip()}"


def test_the_core_runs_without_any_extra() -> None:
    """The README's program (its first Python block) runs with every extra unimportable."""
    program = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)[0]
    out = _python(BLOCK_EXTRAS + "import torch\ntorch.set_num_threads(1)\n" + program)
    assert out.returncode == 0, out.stderr


@pytest.mark.parametrize("argv", [["--help"], ["run", "--help"], ["check", "--help"], ["bench", "--help"]])
def test_help_needs_no_extra(argv: list[str]) -> None:
    out = _python(BLOCK_EXTRAS + f"from mlo.cli import main\nraise SystemExit(main({argv!r}))")
    assert out.returncode == 0, out.stderr
    assert "usage" in out.stdout


@pytest.mark.slow
def test_a_program_missing_an_extra_names_the_install() -> None:
    """`mlo run lfm-cw` on the digits (scikit-learn's data set) with scikit-learn missing: one
    line naming the package and the extra, exit status 2, no traceback."""
    code = "import sys\nsys.modules['sklearn'] = None\nfrom mlo.cli import main\nraise SystemExit(main(['run', 'lfm-cw', '--rounds', '1', '--eval-epochs', '1']))"
    out = _python(code, timeout=300)
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr
    assert "scikit-learn" in out.stderr and "pip install 'mlo[programs]'" in out.stderr


def test_install_hint_names_the_extra_and_ignores_other_modules() -> None:
    missing = ModuleNotFoundError("No module named 'torchvision.datasets'", name="torchvision.datasets")
    assert extra_of(missing) == "programs"
    assert install_hint(missing, "mlo run x") == (
        "mlo run x needs torchvision, which is not installed; install the 'programs' extra: pip install 'mlo[programs]'"
    )
    assert extra_of(ModuleNotFoundError("No module named 'tensorboard'", name="tensorboard")) == "logs"
    assert install_hint(ModuleNotFoundError("No module named 'nothing_of_mlo'", name="nothing_of_mlo"), "mlo") is None


def test_every_extra_module_belongs_to_an_extra_of_pyproject() -> None:
    import tomllib

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for module, (extra, package) in EXTRAS.items():
        assert any(req.startswith(package) for req in extras[extra]), f"{module}: {package} is not in the {extra!r} extra"
    core = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert sorted(req.split(">")[0].split("=")[0].split("<")[0] for req in core) == ["numpy", "rich", "torch"]
