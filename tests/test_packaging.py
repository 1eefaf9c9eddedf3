"""The one `mlo` namespace installs from a wheel as well as in editable mode: the folders
problems/, engines/ and benchmarks/ become mlo.problems, mlo.engines and mlo.benchmarks."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"mlo": "mlo", "problems": "mlo/problems", "engines": "mlo/engines", "benchmarks": "mlo/benchmarks"}


def _source_modules() -> set[str]:
    """Every .py file of the four folders, as its path inside the installed package."""
    found = set()
    for folder, target in FOLDERS.items():
        for path in (ROOT / folder).rglob("*.py"):
            if "__pycache__" not in path.parts:
                found.add(f"{target}/{path.relative_to(ROOT / folder).as_posix()}")
    return found


def test_editable_install_maps_the_folders_into_one_namespace() -> None:
    import mlo
    import mlo.benchmarks
    import mlo.engines
    import mlo.problems

    for module, folder in ((mlo, "mlo"), (mlo.problems, "problems"), (mlo.engines, "engines"), (mlo.benchmarks, "benchmarks")):
        assert Path(module.__file__).resolve().parent == ROOT / folder


@pytest.mark.slow
def test_wheel_holds_every_module_and_imports_on_its_own(tmp_path: Path) -> None:
    pip = [sys.executable, "-m", "pip"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(ROOT)], check=True)
    (wheel,) = tmp_path.glob("mlo-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = sorted(_source_modules() - names)
    assert not missing, f"modules missing from the wheel (add their packages to pyproject.toml): {missing}"
    assert "mlo/py.typed" in names

    target = tmp_path / "site"
    subprocess.run([*pip, "install", "-q", "--no-deps", "--target", str(target), str(wheel)], check=True)
    code = (
        "import mlo, mlo.problems.darts, mlo.problems.lfm_cw.experiment, mlo.engines, mlo.benchmarks.cli, mlo.cli;"
        "print(mlo.__file__)"
    )
    env = {**os.environ, "PYTHONPATH": str(target)}
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, check=True, capture_output=True, text=True)
    assert Path(out.stdout.strip()).resolve().is_relative_to(target.resolve())
