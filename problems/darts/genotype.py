"""The discrete DARTS architecture (`Genotype`): its validation and its JSON file format.

A genotype lists, for each of the two cell types, two incoming edges per intermediate node as
``(op name, input index)``. Input index 0 and 1 are the outputs of the two previous cells; index
``2 + i`` is intermediate node ``i`` of the same cell. Node ``i`` may only read indices
``0 .. i + 1``. ``*_concat`` lists the node indices whose outputs are concatenated as the cell
output.

JSON format (what `save` writes and `load` reads)::

    {"normal": [["sep_conv_3x3", 0], ["sep_conv_3x3", 1], ...],
     "normal_concat": [2, 3, 4, 5],
     "reduce": [["max_pool_3x3", 0], ...],
     "reduce_concat": [2, 3, 4, 5]}
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Any

from mlo.errors import GenotypeError

from .ops import PRIMITIVES

__all__ = ["Genotype", "GenotypeError", "DARTS_V2"]

Edge = tuple[str, int]


@dataclass(frozen=True)
class Genotype:
    """A discrete cell pair. Validated on construction; immutable and hashable."""

    normal: tuple[Edge, ...]
    normal_concat: tuple[int, ...]
    reduce: tuple[Edge, ...]
    reduce_concat: tuple[int, ...]

    def __post_init__(self) -> None:
        # Normalise lists (e.g. from JSON) into tuples, then validate.
        for name in ("normal", "reduce"):
            edges = getattr(self, name)
            object.__setattr__(self, name, tuple((op, idx) for op, idx in _as_pairs(edges, name)))
        for name in ("normal_concat", "reduce_concat"):
            object.__setattr__(self, name, tuple(_as_int_list(getattr(self, name), name)))
        self._validate()

    @property
    def steps(self) -> int:
        """Number of intermediate nodes per cell (two incoming edges each)."""
        return len(self.normal) // 2

    def _validate(self) -> None:
        if len(self.normal) == 0 or len(self.normal) % 2:
            raise GenotypeError(
                f"'normal' must list two edges per intermediate node (an even, non-zero count), "
                f"got {len(self.normal)} edges"
            )
        if len(self.reduce) != len(self.normal):
            raise GenotypeError(
                f"'normal' and 'reduce' must have the same number of edges, "
                f"got {len(self.normal)} and {len(self.reduce)}"
            )
        steps = self.steps
        for cell in ("normal", "reduce"):
            for k, (op, idx) in enumerate(getattr(self, cell)):
                node = k // 2
                if op not in PRIMITIVES:
                    raise GenotypeError(
                        f"{cell} edge {k} (node {node}): unknown operation {op!r}; "
                        f"known: {', '.join(PRIMITIVES[1:])}"
                    )
                if op == "none":
                    raise GenotypeError(
                        f"{cell} edge {k} (node {node}): 'none' is not a valid operation in a "
                        "discrete genotype (DARTS never selects it)"
                    )
                if not 0 <= idx < node + 2:
                    raise GenotypeError(
                        f"{cell} edge {k} (node {node}): input index {idx} out of range; node "
                        f"{node} may read inputs 0..{node + 1}"
                    )
            concat = getattr(self, f"{cell}_concat")
            if not concat:
                raise GenotypeError(f"'{cell}_concat' is empty")
            if len(set(concat)) != len(concat):
                raise GenotypeError(f"'{cell}_concat' has repeated entries: {list(concat)}")
            for c in concat:
                if not 2 <= c < steps + 2:
                    raise GenotypeError(
                        f"'{cell}_concat' entry {c} out of range; intermediate nodes are "
                        f"2..{steps + 1}"
                    )

    # -- serialisation ---------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (lists, not tuples)."""
        return {
            "normal": [[op, idx] for op, idx in self.normal],
            "normal_concat": list(self.normal_concat),
            "reduce": [[op, idx] for op, idx in self.reduce],
            "reduce_concat": list(self.reduce_concat),
        }

    def to_json(self, indent: int | None = 2) -> str:
        """The genotype as a JSON string (see the module docstring for the format)."""
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, data: Any) -> Genotype:
        """Build from a dict as written by `to_dict`; raises GenotypeError when malformed."""
        if not isinstance(data, dict):
            raise GenotypeError(f"a genotype must be a JSON object, got {type(data).__name__}")
        keys = ("normal", "normal_concat", "reduce", "reduce_concat")
        missing = [k for k in keys if k not in data]
        if missing:
            raise GenotypeError(f"genotype is missing key(s) {missing}; expected keys {list(keys)}")
        unknown = sorted(set(data) - set(keys))
        if unknown:
            raise GenotypeError(f"genotype has unknown key(s) {unknown}; expected keys {list(keys)}")
        return cls(
            normal=data["normal"],
            normal_concat=data["normal_concat"],
            reduce=data["reduce"],
            reduce_concat=data["reduce_concat"],
        )

    @classmethod
    def from_json(cls, text: str) -> Genotype:
        """Parse a JSON string; raises GenotypeError for invalid JSON or a malformed genotype."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise GenotypeError(f"genotype is not valid JSON: {e}") from None
        return cls.from_dict(data)

    def save(self, path: str | PathLike[str]) -> Path:
        """Write the genotype as JSON to ``path`` (parent folders are created); returns the path."""
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(self.to_json() + "\n")
        return p

    @classmethod
    def load(cls, path: str | PathLike[str]) -> Genotype:
        """Read a genotype JSON file; errors name the file and what is wrong with it."""
        p = Path(path)
        try:
            text = p.read_text()
        except FileNotFoundError:
            raise GenotypeError(f"genotype file {str(p)!r} does not exist") from None
        except (IsADirectoryError, UnicodeDecodeError) as e:
            raise GenotypeError(f"cannot read genotype file {str(p)!r}: {e}") from None
        try:
            return cls.from_json(text)
        except GenotypeError as e:
            raise GenotypeError(f"{str(p)!r}: {e}") from None


def _as_pairs(edges: Any, name: str) -> list[Edge]:
    if isinstance(edges, (str, bytes)) or not hasattr(edges, "__iter__"):
        raise GenotypeError(f"'{name}' must be a list of [op, input index] pairs, got {edges!r}")
    pairs: list[Edge] = []
    for k, edge in enumerate(edges):
        if isinstance(edge, (str, bytes)) or not hasattr(edge, "__len__") or len(edge) != 2:
            raise GenotypeError(f"{name} edge {k}: expected [op, input index], got {edge!r}")
        op, idx = edge
        if not isinstance(op, str):
            raise GenotypeError(f"{name} edge {k}: op name must be a string, got {op!r}")
        if isinstance(idx, bool) or not isinstance(idx, int):
            raise GenotypeError(f"{name} edge {k}: input index must be an integer, got {idx!r}")
        pairs.append((op, idx))
    return pairs


def _as_int_list(values: Any, name: str) -> list[int]:
    if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
        raise GenotypeError(f"'{name}' must be a list of node indices, got {values!r}")
    out = list(values)
    for v in out:
        if isinstance(v, bool) or not isinstance(v, int):
            raise GenotypeError(f"'{name}' entries must be integers, got {v!r}")
    return out


# The cell found by second-order DARTS on CIFAR-10 (Liu et al., 2019, "DARTS_V2"): a
# reference point for baselines and a fixture for tests.
DARTS_V2 = Genotype(
    normal=(
        ("sep_conv_3x3", 0), ("sep_conv_3x3", 1),
        ("sep_conv_3x3", 0), ("sep_conv_3x3", 1),
        ("sep_conv_3x3", 1), ("skip_connect", 0),
        ("skip_connect", 0), ("dil_conv_3x3", 2),
    ),
    normal_concat=(2, 3, 4, 5),
    reduce=(
        ("max_pool_3x3", 0), ("max_pool_3x3", 1),
        ("skip_connect", 2), ("max_pool_3x3", 1),
        ("max_pool_3x3", 0), ("skip_connect", 2),
        ("skip_connect", 2), ("max_pool_3x3", 1),
    ),
    reduce_concat=(2, 3, 4, 5),
)
