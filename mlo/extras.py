"""The optional extras of ``pip install mlo`` and the modules each provides, so that a command
that needs a missing one can name the install instead of ending in a traceback.

The core (``import mlo``) needs only torch, numpy and rich; see pyproject.toml for the extras."""

from __future__ import annotations

__all__ = ["EXTRAS", "extra_of", "install_hint"]

#: top-level module -> (the extra that installs it, its name on PyPI)
EXTRAS: dict[str, tuple[str, str]] = {
    "torchvision": ("programs", "torchvision"),
    "sklearn": ("programs", "scikit-learn"),
    "scipy": ("programs", "scipy"),
    "matplotlib": ("programs", "matplotlib"),
    "tensorboard": ("logs", "tensorboard"),
    "higher": ("bench", "higher"),
    "torchopt": ("bench", "torchopt"),
}


def extra_of(error: ImportError) -> str | None:
    """The extra that provides the module ``error`` failed to import, or ``None`` when the module
    belongs to no extra (then the error is not a missing extra and should propagate)."""
    name = (error.name or "").split(".")[0]
    return EXTRAS[name][0] if name in EXTRAS else None


def install_hint(error: ImportError, command: str) -> str | None:
    """One line telling what ``command`` misses and how to install it, or ``None`` when the
    missing module belongs to no extra."""
    extra = extra_of(error)
    if extra is None:
        return None
    package = EXTRAS[(error.name or "").split(".")[0]][1]
    return f"{command} needs {package}, which is not installed; install the {extra!r} extra: pip install 'mlo[{extra}]'"
