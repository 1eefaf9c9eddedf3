"""`make readme-figures`: run the commands whose output the README quotes, at this commit, write
that output into README.md and the figures, with the torch version, the commit and the machine,
into benchmarks/readme-figures/results.json.

`make readme-figures-check` (``--check``) rewrites nothing: it lists every README figure that
differs from what this commit produces, on the figures that are deterministic on one torch
build (parameter counts, errors at fixed seeds, the generator's gate, test counts), and exits 1
if any does. Times are recorded but never compared.

The README marks each quoted output as a block that this script owns::

    <!-- readme-figures: NAME -->
    ```text
    the command's output
    ```
    <!-- /readme-figures -->

and one provenance line, ``<!-- readme-figures: provenance -->...<!-- /readme-figures -->``.
The same parser reads the figures from the README's block and from the fresh output, so a
figure is compared exactly as it is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
RESULTS = ROOT / "benchmarks" / "readme-figures" / "results.json"
BLOCK = re.compile(r"(<!-- readme-figures: (?P<name>[\w-]+) -->\n)(?P<body>.*?)(\n?<!-- /readme-figures -->)", re.S)
#: the width rich lays its tables out to when the output is captured (a pipe has no width)
COLUMNS = "100"

__all__ = ["Figure", "FIGURES", "blocks", "figures_of", "differences", "replace_block", "main"]


@dataclass(frozen=True)
class Figure:
    """A quoted output: the command that prints it, and how to read its deterministic figures."""

    name: str
    #: what the reader runs to see this output (shown in messages)
    command: str
    #: run the command in a scratch folder; returns the text the README shows
    run: Callable[[Path], str]
    #: figure name -> value, read from that text (the README's block or a fresh run)
    parse: Callable[[str], dict[str, str]]


def _python(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": COLUMNS, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True)


def _run_demo(scratch: Path) -> str:
    out = scratch / "demo"
    done = _python("-m", "mlo", "run", "lfm-cw", "--out", str(out))
    if done.returncode != 0:
        raise RuntimeError(f"the demo failed (exit {done.returncode}):\n{done.stderr[-2000:]}")
    return done.stdout.replace(str(out), "runs/lfm-cw-<time>").strip()


def _parse_demo(text: str) -> dict[str, str]:
    found: dict[str, str] = {}
    text = " ".join(text.split())  # rich wraps long lines at the console's width
    row = re.search(r"│ lfm-cw\s*│\s*(\d+)\s*│\s*[\d.]+\s*│\s*([\d.]+k?)\s*│\s*([\d.]+) ± ([\d.]+|—)\s*│", text)
    if row:
        found.update(seeds=row[1], params=row[2], test_error_percent=row[3], test_error_std=row[4])
    gate = re.search(
        r"label agreement ([\d.]+) %.*?classifier ([\d.]+) %.*?std ([\d.]+) vs real ([\d.]+) \(ratio ([\d.]+).*?"
        r"worst class agreement ([\d.]+) %", text, re.S,
    )
    if gate:
        keys = ("gate_agreement", "gate_real_classifier", "gate_std", "gate_real_std", "gate_std_ratio", "gate_worst_class")
        found.update(zip(keys, gate.groups()))
    return found


def _run_tests(scratch: Path) -> str:
    mypy = _python("-m", "mypy")
    tests = _python("-m", "pytest", "-p", "no:cacheprovider")  # pyproject adds -q; -qq would drop the summary line
    lines = [line for line in (mypy.stdout + tests.stdout).splitlines() if line.strip()]
    success = next((line for line in lines if line.startswith(("Success:", "Found "))), "mypy printed no summary")
    summary = next((line.strip("= ") for line in reversed(lines) if re.search(r"\d+ (passed|failed)", line)), "no summary")
    return f"{success}\n{summary}"


def _parse_tests(text: str) -> dict[str, str]:
    found: dict[str, str] = {}
    mypy = re.search(r"Success: no issues found in (\d+) source files", text)
    if mypy:
        found["mypy_files"] = mypy[1]
    for outcome in ("passed", "failed", "skipped", "errors"):
        count = re.search(rf"(\d+) {outcome}", text)
        found[outcome] = count[1] if count else "0"
    return found


FIGURES: dict[str, Figure] = {
    figure.name: figure
    for figure in (
        Figure("demo", "make demo", _run_demo, _parse_demo),
        Figure("test", "make test", _run_tests, _parse_tests),
    )
}


def blocks(readme: str) -> dict[str, str]:
    """The README's figure blocks: name -> the text inside its fence."""
    return {m["name"]: _unfenced(m["body"]) for m in BLOCK.finditer(readme)}


def _unfenced(body: str) -> str:
    lines = body.strip("\n").splitlines()
    if lines and lines[0].startswith("```"):
        lines = lines[1:-1] if lines[-1].startswith("```") else lines[1:]
    return "\n".join(lines)


def figures_of(name: str, text: str) -> dict[str, str]:
    """The deterministic figures that the block ``name`` shows in ``text``."""
    return FIGURES[name].parse(text)


def differences(name: str, quoted: str, produced: str) -> list[str]:
    """One line per figure of block ``name`` that differs between the README and a fresh run
    (a figure the README does not show, or a fresh run does not print, differs too)."""
    old, new = figures_of(name, quoted), figures_of(name, produced)
    return [
        f"{name}: {key}: README {old.get(key, '(missing)')}, this commit {new.get(key, '(missing)')}"
        for key in sorted(old.keys() | new.keys())
        if old.get(key) != new.get(key)
    ]


def replace_block(readme: str, name: str, text: str, fence: str = "text") -> str:
    """``readme`` with the block ``name`` holding ``text`` (fenced, unless ``fence`` is empty)."""
    body = f"```{fence}\n{text}\n```" if fence else text
    replaced, count = BLOCK.subn(lambda m: m[1] + body + m[4] if m["name"] == name else m[0], readme)
    if count == 0 or name not in blocks(readme):
        raise KeyError(f"README.md has no block <!-- readme-figures: {name} -->")
    return replaced


def _git(*args: str) -> str:
    done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)
    return done.stdout.strip() if done.returncode == 0 else "unknown"


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        model = re.search(r"model name\s*:\s*(.+)", cpuinfo.read_text())
        cpu = model[1].strip() if model else cpu
    return f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}"


def _provenance() -> dict[str, str]:
    import torch

    commit = _git("rev-parse", "--short", "HEAD")
    if _git("status", "--porcelain", "--untracked-files=no"):
        commit += " (with uncommitted changes)"
    return {"commit": commit, "torch": torch.__version__, "python": platform.python_version(), "machine": _machine()}


def _provenance_line(runs: dict[str, dict[str, object]]) -> str:
    """One sentence saying where the README's outputs come from: one run, or one per block."""
    def where(run: dict[str, object]) -> str:
        return f"commit {run['commit']}, torch {run['torch']}, Python {run['python']}, on {run['machine']}"

    places = {where(run) for run in runs.values()}
    if len(places) == 1:
        return f"Figures from {places.pop()}."
    return " ".join(f"`{name}` from {where(run)}." for name, run in sorted(runs.items()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python benchmarks/readme_figures.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="rewrite nothing; list the README figures that differ")
    parser.add_argument("--only", default=",".join(FIGURES), help=f"comma-separated blocks to run (default: {','.join(FIGURES)})")
    args = parser.parse_args(argv)
    names = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = [name for name in names if name not in FIGURES]
    if unknown:
        parser.error(f"unknown block(s) {', '.join(unknown)}; blocks: {', '.join(FIGURES)}")
    readme = README.read_text()
    quoted = blocks(readme)
    provenance = _provenance()
    runs: dict[str, dict[str, object]] = json.loads(RESULTS.read_text())["figures"] if RESULTS.exists() else {}
    found: list[str] = []
    with tempfile.TemporaryDirectory() as scratch:
        for name in names:
            figure = FIGURES[name]
            print(f"running {figure.command} ...", file=sys.stderr, flush=True)
            start = time.perf_counter()
            produced = figure.run(Path(scratch))
            seconds = round(time.perf_counter() - start, 1)
            runs[name] = {**provenance, "command": figure.command, "seconds": seconds, "figures": figure.parse(produced), "output": produced}
            if name not in quoted:
                found.append(f"{name}: README.md has no block <!-- readme-figures: {name} -->")
                continue
            found.extend(differences(name, quoted[name], produced))
            readme = replace_block(readme, name, produced)
    if args.check:
        print("\n".join(found) if found else f"every README figure of {', '.join(names)} matches this commit")
        return 1 if found else 0
    if "provenance" in quoted:
        readme = replace_block(readme, "provenance", _provenance_line(runs), fence="")
    README.write_text(readme)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"figures": runs}, indent=2) + "\n")
    print(f"README.md and {RESULTS.relative_to(ROOT)} rewritten; figures that changed:")
    print("\n".join(found) if found else "none")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
