"""The global random number generators' states (torch CPU and CUDA, numpy, python), as values
``torch.load(weights_only=True)`` can read back: tensors, ints, floats, strings and lists."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

__all__ = ["get_state", "set_state"]


def get_state() -> dict[str, Any]:
    """Every global generator's state; CUDA's only where CUDA has been initialized."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()  # type: ignore[misc]
    version, internal, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else [],
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "python": {"version": int(version), "internal": [int(v) for v in internal], "gauss_next": gauss_next},
    }


def set_state(state: dict[str, Any]) -> None:
    """Restore what `get_state` returned."""
    torch.set_rng_state(state["torch"])
    if state["cuda"]:
        if not torch.cuda.is_available():
            raise RuntimeError("the saved state holds CUDA generators but CUDA is not available here")
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss_next"]))
