"""The README's Python examples run as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()
EXAMPLES = re.findall(r"```python\n(.*?)```", README, re.S)


def test_readme_has_examples() -> None:
    assert len(EXAMPLES) >= 2


@pytest.mark.parametrize("index", range(len(EXAMPLES)))
def test_readme_example_runs(index: int, one_thread: None) -> None:
    namespace: dict[str, object] = {}
    exec(compile(EXAMPLES[index], f"README example {index}", "exec"), namespace)  # noqa: S102
    engine = namespace.get("engine")
    assert engine is not None
    engine.run(1)  # type: ignore[attr-defined]
