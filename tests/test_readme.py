"""The README and the docs pages as a reader meets them: every Python block runs as written, the
README stays short, its links lead somewhere, and the outputs it quotes can be checked by
`make readme-figures-check`.

A Python block that is illustrative or too slow for the tests is skipped by a comment on the
line just above its fence that says why::

    <!-- test: skip (needs a GPU) -->
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from mlo.benchmarks import readme_figures

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").rglob("*.md"))]
#: a Python block, with the line above its fence (where a skip comment goes)
PYTHON_BLOCK = re.compile(r"(?:^(?P<above>[^\n]*)\n)?^```python\n(?P<code>.*?)^```", re.S | re.M)
SKIP = re.compile(r"<!-- test: skip \((?P<reason>[^)]+)\) -->")
#: the README's size limit, in bytes
README_LIMIT = 15_000


def _blocks() -> list[tuple[str, str, str | None]]:
    """(id, code, skip reason or None) of every Python block of the README and the docs."""
    found = []
    for page in PAGES:
        name = page.relative_to(ROOT).as_posix()
        for index, match in enumerate(PYTHON_BLOCK.finditer(page.read_text())):
            skip = SKIP.search(match["above"] or "")
            found.append((f"{name}:{index}", match["code"], skip["reason"] if skip else None))
    return found


BLOCKS = _blocks()


def test_the_readme_has_a_program_and_stays_short() -> None:
    assert any(block_id.startswith("README.md:") for block_id, _, _ in BLOCKS)
    size = len(README.read_text().encode())
    assert size <= README_LIMIT, f"README.md is {size} bytes; move detail to docs/ (limit {README_LIMIT})"


@pytest.mark.parametrize(("block_id", "code", "skip"), BLOCKS, ids=[block_id for block_id, _, _ in BLOCKS])
def test_python_block_runs(block_id: str, code: str, skip: str | None, one_thread: None) -> None:
    if skip is not None:
        pytest.skip(skip)
    namespace: dict[str, object] = {"__name__": "__readme__"}
    exec(compile(code, block_id, "exec"), namespace)  # noqa: S102


def test_the_readmes_links_lead_to_files() -> None:
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", README.read_text()):
        if "://" not in target:
            assert (ROOT / target).exists(), f"README.md links to {target}, which does not exist"


def test_every_quoted_output_can_be_checked() -> None:
    """Each output block of the README is one the figures script produces, and the script reads
    figures out of it (so `make readme-figures-check` compares something)."""
    quoted = readme_figures.blocks(README.read_text())
    assert set(readme_figures.FIGURES) <= set(quoted), "README.md lacks a readme-figures block"
    for name in readme_figures.FIGURES:
        assert readme_figures.figures_of(name, quoted[name]), f"no figures read from the README's {name!r} block"


def test_the_figures_check_names_each_differing_figure() -> None:
    readme = README.read_text()
    quoted = readme_figures.blocks(readme)["test"]
    passed = int(readme_figures.figures_of("test", quoted)["passed"])
    produced = re.sub(r"\d+ passed", f"{passed + 1} passed", quoted)
    assert readme_figures.differences("test", quoted, quoted) == []
    assert readme_figures.differences("test", quoted, produced) == [f"test: passed: README {passed}, this commit {passed + 1}"]
    rewritten = readme_figures.replace_block(readme, "test", produced)
    assert readme_figures.blocks(rewritten)["test"] == produced
    assert rewritten.replace(produced, quoted) == readme


def test_every_docs_page_is_in_the_sites_navigation() -> None:
    """A page added to docs/ must be listed in mkdocs.yml's nav, or the site hides it."""
    listed = set(re.findall(r":\s*(\S+\.md)\s*$", (ROOT / "mkdocs.yml").read_text(), re.M))
    pages = {page.relative_to(ROOT / "docs").as_posix() for page in (ROOT / "docs").rglob("*.md")}
    assert pages - listed == set(), f"docs pages missing from mkdocs.yml nav: {sorted(pages - listed)}"
    assert listed - pages == set(), f"mkdocs.yml nav names missing pages: {sorted(listed - pages)}"
