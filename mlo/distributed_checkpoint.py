"""Checkpoints of several ranks, written and read with ``torch.distributed.checkpoint`` (DCP).

`mlo.checkpoint.save` / `load` come here when a process group is initialized; the checkpoint is
a directory that every rank writes together (``dcp.save``) and reads together (``dcp.load``):

- the state every rank holds identically (each level's parameters, optimizer, scheduler and
  gradient-transform state, the fp16 scalers) is stored once, under ``shared/<path>`` keys,
  whichever rank DCP picks to write each tensor;
- each rank's own state (its random generators, its data position in its shard, its hooks'
  state, its buffers such as BatchNorm statistics, the round counter) is one entry per rank,
  ``rank<r>``: a ``torch.save`` of that rank's whole state with the shared tensors replaced by
  their keys, so that a resumed rank continues exactly where it stopped.

A checkpoint is written to ``.<name>.tmp`` beside its path; when every rank has written its
files (DCP gathers the ranks' results before rank 0 writes ``.metadata``) rank 0 renames it to
the path, so a crash mid-write leaves the previous checkpoint as it was. It is read back only by
as many ranks as wrote it.

What is trusted when reading: DCP's ``.metadata`` is a pickle (written by torch); mlo reads it
with an unpickler that admits only DCP's metadata classes, ``torch.Size``, torch dtypes and
paths, so it runs no code. DCP reads tensor data with ``torch.load(weights_only=True)``, and each
rank's entry is read the same way. DCP's own byte entries (read with
``torch.load(weights_only=False)``) are never written by mlo, and a checkpoint holding any is
refused. The files' sizes are checked against ``.metadata`` first, so a truncated file is
named; a file damaged inside a tensor's bytes is not detected (no checksums).
"""

from __future__ import annotations

import copy
import io
import os
import pickle
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.filesystem import _StorageInfo

from . import distributed
from .errors import CheckpointError, first_line

__all__ = ["write", "read", "read_metadata"]

#: marks a shared tensor inside a rank's entry: ``{_SHARED: key}``
_SHARED = "mlo-checkpoint/shared-tensor"
_METADATA = ".metadata"

Path_ = tuple[Any, ...]


# ---------------------------------------------------------------------------------------------- write


def write(state: dict[str, Any], path: Path, replicated: Callable[[Path_], bool]) -> Path:
    """Every rank: write ``state`` (this rank's) to the directory ``path`` atomically; the
    tensors at paths where ``replicated(path)`` holds are the same on every rank and stored once.
    Raises `CheckpointError` on every rank if any rank fails; the temporary directory is removed
    and whatever was at ``path`` stays. (A checkpoint replacing one of the same name moves the
    old one to ``.<name>.old`` for the two renames, then removes it.)"""
    tmp = path.with_name(f".{path.name}.tmp")
    if distributed.is_main():
        shutil.rmtree(tmp, ignore_errors=True)  # left by a crashed write
        path.parent.mkdir(parents=True, exist_ok=True)
    distributed.barrier()
    error: BaseException | None = None
    try:
        entries = _entries(state, replicated)
    except Exception as err:  # e.g. a hook state torch.save cannot write
        error = err
    if distributed.any_rank(error is not None):
        _fail(path, tmp, error)
    try:
        dcp.save(entries, storage_writer=dcp.FileSystemWriter(tmp, sync_files=True))
    except (Exception, CheckpointException) as err:  # DCP raises on every rank when any rank failed
        _fail(path, tmp, err)
    distributed.barrier()
    if distributed.is_main():
        old = path.with_name(f".{path.name}.old")
        _fsync_directory(tmp)  # the files' names are on disk before the directory takes the path
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
        _fsync_directory(path.parent)
    distributed.barrier()
    return path


def _fail(path: Path, tmp: Path, error: BaseException | None) -> None:
    distributed.barrier()
    if distributed.is_main():
        shutil.rmtree(tmp, ignore_errors=True)
    distributed.barrier()
    why = f": {_describe(error)}" if error is not None else " on another rank"
    raise CheckpointError(f"checkpoint {str(path)!r} was not written (the previous one, if any, is kept){why}")


def _describe(error: BaseException) -> str:
    """``Type: first line`` of an error; for DCP's, that of each failed rank's."""
    if isinstance(error, CheckpointException):
        return "; ".join(f"rank {r}: {_describe(failure[0])}" for r, failure in sorted(error.failures.items()))
    return f"{type(error).__name__}: {first_line(error)}"


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _entries(state: dict[str, Any], replicated: Callable[[Path_], bool]) -> dict[str, torch.Tensor]:
    """DCP's flat state: ``shared/<path>`` for each replicated tensor, ``rank<r>`` for the rest."""
    shared: dict[str, torch.Tensor] = {}

    def take(where: Path_, t: torch.Tensor) -> Any:
        if not replicated(where):
            return t
        key = "shared/" + "/".join(str(part) for part in where)
        if key in shared:
            raise CheckpointError(f"two tensors of the state map to the checkpoint key {key!r}")
        shared[key] = t.detach()
        return {_SHARED: key}

    own = _map_tensors(state, (), take)
    buffer = io.BytesIO()
    torch.save(own, buffer)
    return {**shared, f"rank{distributed.rank()}": torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8)}


def _map_tensors(value: Any, where: Path_, fn: Callable[[Path_, torch.Tensor], Any]) -> Any:
    """``value`` with every tensor ``t`` at path ``where`` replaced by ``fn(where, t)``; dicts keep
    their type and attributes (a module's ``state_dict`` keeps its ``_metadata``)."""
    if isinstance(value, torch.Tensor):
        return fn(where, value)
    if isinstance(value, dict):
        out = copy.copy(value)
        for key, item in value.items():
            out[key] = _map_tensors(item, (*where, key), fn)
        return out
    if isinstance(value, (list, tuple)):
        items = [_map_tensors(item, (*where, i), fn) for i, item in enumerate(value)]
        return items if isinstance(value, list) else tuple(items)
    return value


# ---------------------------------------------------------------------------------------------- read


class _Refused(pickle.UnpicklingError):
    """A global that DCP's metadata does not use."""


class _MetadataUnpickler(pickle.Unpickler):
    """Rebuilds DCP's metadata and nothing else: any other global in the pickle is refused."""

    _ALLOWED: dict[str, set[str]] = {
        "torch.distributed.checkpoint.metadata": {
            "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "TensorProperties", "ChunkStorageMetadata",
            "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING",
        },
        "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
        "torch.serialization": {"_get_layout"},
        "torch": {"Size"},
        "pathlib": {"Path", "PosixPath", "PurePosixPath"},
        "collections": {"OrderedDict"},
    }

    def find_class(self, module: str, name: str) -> Any:
        if name in self._ALLOWED.get(module, ()):
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise _Refused(f"{module}.{name} is not part of DCP's metadata")


class _Reader(dcp.FileSystemReader):
    """DCP's file reader with `_MetadataUnpickler` for ``.metadata`` (DCP itself uses ``pickle.load``)."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> dcp_metadata.Metadata:
        metadata = read_metadata(Path(self.path))
        storage = getattr(metadata, "storage_meta", None) or dcp_metadata.StorageMeta()
        storage.load_id = self.load_id
        metadata.storage_meta = storage
        return metadata


def read_metadata(path: Path) -> dcp_metadata.Metadata:
    """The checkpoint's DCP metadata, read without running code; `CheckpointError` naming the file."""
    file = path / _METADATA
    try:
        with open(file, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {str(path)!r} has no {_METADATA} (an unfinished write, or not a checkpoint)") from None
    except _Refused as err:
        raise CheckpointError(f"checkpoint file {str(file)!r} holds objects other than DCP's metadata; refused, "
                              f"nothing in it was run ({err})") from None
    except Exception as err:
        raise CheckpointError(f"checkpoint file {str(file)!r} is truncated or corrupt ({_describe(err)})") from None
    if not isinstance(metadata, dcp_metadata.Metadata) or not isinstance(getattr(metadata, "storage_data", None), dict):
        raise CheckpointError(f"checkpoint file {str(file)!r} is not DCP metadata")
    return metadata


def read(path: Path) -> dict[str, Any]:
    """Every rank: this rank's state from the directory ``path``, the shared tensors in place.
    Raises `CheckpointError` (on every rank) naming the damaged file, or saying why it does not fit."""
    state: dict[str, Any] | None = None
    error: CheckpointError | None = None
    try:
        entries = _templates(path)
    except CheckpointError as err:
        error = err
    if distributed.any_rank(error is not None):
        raise error or CheckpointError(f"checkpoint {str(path)!r} could not be read on another rank")
    try:
        dcp.load(entries, storage_reader=_Reader(path))
    except (Exception, CheckpointException) as err:
        raise CheckpointError(f"checkpoint {str(path)!r} could not be read ({_describe(err)})") from None
    try:
        state = _assemble(path, entries)
    except CheckpointError as err:
        error = err
    if distributed.any_rank(error is not None):
        raise error or CheckpointError(f"checkpoint {str(path)!r} could not be read on another rank")
    assert state is not None
    return state


def _templates(path: Path) -> dict[str, torch.Tensor]:
    """Empty tensors for every entry this rank reads (the shared ones and its own), after the
    files were checked against the metadata."""
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    metadata = read_metadata(path)
    for info in metadata.storage_data.values():
        if not isinstance(info, _StorageInfo):
            raise CheckpointError(f"checkpoint file {str(path / _METADATA)!r} is not DCP metadata")
        file = path / info.relative_path
        if not file.is_file():
            raise CheckpointError(f"checkpoint file {str(file)!r} is missing")
        if file.stat().st_size < info.offset + info.length:
            raise CheckpointError(f"checkpoint file {str(file)!r} is truncated ({file.stat().st_size} bytes, "
                                  f"{info.offset + info.length} expected)")
    ranks = sorted(int(m.group(1)) for key in metadata.state_dict_metadata if (m := re.fullmatch(r"rank(\d+)", key)))
    if len(ranks) != distributed.world_size():
        raise CheckpointError(
            f"checkpoint {str(path)!r} was written by {len(ranks)} rank(s); it is read by as many "
            f"(each rank's random state and data shard are its own), not {distributed.world_size()}"
        )
    mine = f"rank{distributed.rank()}"
    out = {}
    for key, meta in metadata.state_dict_metadata.items():
        if key == mine or key.startswith("shared/"):
            if not isinstance(meta, dcp_metadata.TensorStorageMetadata):
                raise CheckpointError(f"checkpoint {str(path)!r}: entry {key!r} is not a tensor (mlo writes none); refused")
            out[key] = torch.empty(meta.size, dtype=meta.properties.dtype)
    return out


def _assemble(path: Path, entries: dict[str, torch.Tensor]) -> dict[str, Any]:
    """This rank's entry read with ``weights_only=True``, its references to shared tensors resolved."""
    key = f"rank{distributed.rank()}"
    try:
        own = torch.load(io.BytesIO(entries[key].numpy().tobytes()), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(f"checkpoint {str(path)!r}: entry {key!r} holds objects other than tensors and plain "
                              f"values; refused ({first_line(err)})") from None
    except Exception as err:
        raise CheckpointError(f"checkpoint {str(path)!r}: entry {key!r} is corrupt ({_describe(err)})") from None

    def resolve(value: Any) -> Any:
        if isinstance(value, dict):
            if set(value) == {_SHARED}:
                if value[_SHARED] not in entries:
                    raise CheckpointError(f"checkpoint {str(path)!r}: entry {key!r} refers to {value[_SHARED]!r}, which is missing")
                return entries[value[_SHARED]]
            out = copy.copy(value)
            for k, v in value.items():
                out[k] = resolve(v)
            return out
        if isinstance(value, (list, tuple)):
            items = [resolve(v) for v in value]
            return items if isinstance(value, list) else tuple(items)
        return value

    state = resolve(own)
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {str(path)!r}: entry {key!r} is not an mlo checkpoint")
    return state

