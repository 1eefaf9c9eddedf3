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
named.

The unpickler's allow-list names torch internals (``_StorageInfo``, ``_MEM_FORMAT_ENCODING``,
``_get_layout``). A torch that renamed one of them cannot read these checkpoints with this mlo:
the error names the torch version and the missing name, rather than failing somewhere inside
the unpickler. A metadata file naming a DCP class the list does not hold (written by another
torch) is refused with the same details.

Checksums: each rank also writes ``checksums/rank<r>``, the CRC-32 of every entry it holds (the
shared tensors and its own entry), as JSON bytes. Reading verifies every entry read against
them, so a byte flipped inside a tensor's data is named (entry and file) instead of loading
silently. Checkpoints written before checksums existed are read without the check.
"""

from __future__ import annotations

import copy
import io
import os
import pickle
import importlib
import json
import re
import shutil
import zlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint.api import CheckpointException

from . import distributed
from .errors import CheckpointError, first_line

__all__ = ["write", "read", "read_metadata", "METADATA_NAMES", "missing_names", "checksum"]

#: marks a shared tensor inside a rank's entry: ``{_SHARED: key}``
_SHARED = "mlo-checkpoint/shared-tensor"
_METADATA = ".metadata"
#: the entry holding rank r's checksums: ``_CHECKSUMS + "rank<r>"``
_CHECKSUMS = "checksums/"

#: the globals DCP's ``.metadata`` pickle may name, by module; the only ones the reader builds.
#: Some are torch internals that a torch release may rename (`read_metadata` then says which).
METADATA_NAMES: Mapping[str, frozenset[str]] = {
    "torch.distributed.checkpoint.metadata": frozenset({
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "TensorProperties", "ChunkStorageMetadata",
        "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING",
    }),
    "torch.distributed.checkpoint.filesystem": frozenset({"_StorageInfo"}),
    "torch.serialization": frozenset({"_get_layout"}),
    "torch": frozenset({"Size"}),
    "pathlib": frozenset({"Path", "PosixPath", "PurePosixPath"}),
    "collections": frozenset({"OrderedDict"}),
}

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
    mine = f"rank{distributed.rank()}"
    entries = {**shared, mine: torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8)}
    sums = json.dumps({key: checksum(t) for key, t in entries.items()}, sort_keys=True).encode()
    entries[_CHECKSUMS + mine] = torch.frombuffer(bytearray(sums), dtype=torch.uint8)
    return entries


def checksum(t: torch.Tensor) -> int:
    """The CRC-32 of a tensor's bytes (its dtype's bytes in memory order, on the CPU)."""
    data = t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
    return zlib.crc32(data.numpy().tobytes())


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


class _UnknownDCPName(pickle.UnpicklingError):
    """A global of torch's DCP modules that the allow-list does not hold (another torch version's)."""


def missing_names(allowed: Mapping[str, frozenset[str]] = METADATA_NAMES) -> list[str]:
    """The names of ``allowed`` that this torch does not have (``module.name``): the torch internals
    DCP's metadata was built from, renamed or removed by a torch release."""
    missing: list[str] = []
    for module, names in allowed.items():
        try:
            found = importlib.import_module(module)
        except ImportError:
            missing.extend(f"{module}.{name}" for name in sorted(names))
            continue
        missing.extend(f"{module}.{name}" for name in sorted(names) if not hasattr(found, name))
    return missing


class _MetadataUnpickler(pickle.Unpickler):
    """Rebuilds DCP's metadata and nothing else: any global not in ``allowed`` is refused."""

    def __init__(self, file: Any, allowed: Mapping[str, frozenset[str]]) -> None:
        super().__init__(file)
        self.allowed = allowed

    def find_class(self, module: str, name: str) -> Any:
        if name in self.allowed.get(module, ()):
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if module.startswith("torch.distributed.checkpoint") or module == "torch.serialization":
            raise _UnknownDCPName(f"{module}.{name}")
        raise _Refused(f"{module}.{name} is not part of DCP's metadata")


class _Reader(dcp.FileSystemReader):
    """DCP's file reader with `_MetadataUnpickler` for ``.metadata`` (DCP itself uses ``pickle.load``)."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> dcp_metadata.Metadata:
        metadata = read_metadata(Path(self.path))
        storage = getattr(metadata, "storage_meta", None) or dcp_metadata.StorageMeta()
        storage.load_id = self.load_id
        metadata.storage_meta = storage
        return metadata


def read_metadata(path: Path, allowed: Mapping[str, frozenset[str]] = METADATA_NAMES) -> dcp_metadata.Metadata:
    """The checkpoint's DCP metadata, read without running code, building only the globals of
    ``allowed``; `CheckpointError` naming the file, or the torch version and the name when this
    torch lacks a name of ``allowed`` or the file names a DCP global ``allowed`` does not hold."""
    missing = missing_names(allowed)
    if missing:
        raise CheckpointError(
            f"torch {torch.__version__} has no {', '.join(missing)}, which mlo's reader of multi-rank checkpoint "
            f"metadata rebuilds (DCP's metadata classes; this torch renamed or removed them): checkpoint "
            f"{str(path)!r} cannot be read with this torch and mlo; read it with the torch version that wrote it, "
            f"or an mlo that knows this torch"
        )
    file = path / _METADATA
    try:
        with open(file, "rb") as f:
            metadata = _MetadataUnpickler(f, allowed).load()
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {str(path)!r} has no {_METADATA} (an unfinished write, or not a checkpoint)") from None
    except _UnknownDCPName as err:
        raise CheckpointError(
            f"checkpoint file {str(file)!r} names {err}, which mlo's reader of DCP metadata does not know under torch "
            f"{torch.__version__} (written by another torch version?); refused, nothing in it was run"
        ) from None
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
        if not all(isinstance(getattr(info, a, None), k) for a, k in (("relative_path", str), ("offset", int), ("length", int))):
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
        if key in (mine, _CHECKSUMS + mine) or key.startswith("shared/"):
            if not isinstance(meta, dcp_metadata.TensorStorageMetadata):
                raise CheckpointError(f"checkpoint {str(path)!r}: entry {key!r} is not a tensor (mlo writes none); refused")
            out[key] = torch.empty(meta.size, dtype=meta.properties.dtype)
    return out


def _verify(path: Path, entries: dict[str, torch.Tensor]) -> None:
    """Every entry this rank read against the checksums its rank wrote (none: an older checkpoint,
    not checked); a mismatch is a `CheckpointError` naming the entry and the file holding it."""
    key = _CHECKSUMS + f"rank{distributed.rank()}"
    if key not in entries:
        return
    try:
        sums = json.loads(entries[key].numpy().tobytes())
        if not isinstance(sums, dict):
            raise ValueError("not a table")
    except ValueError as err:
        raise CheckpointError(f"checkpoint {str(path)!r}: entry {key!r} (the checksums) is corrupt ({first_line(err)})") from None
    for name, tensor in entries.items():
        if name == key:
            continue
        if name not in sums:
            raise CheckpointError(f"checkpoint {str(path)!r}: entry {name!r} has no checksum in {key!r}; the checkpoint is damaged")
        if checksum(tensor) != sums[name]:
            raise CheckpointError(
                f"checkpoint {str(path)!r}: entry {name!r} does not match its checksum (stored in {_files_of(path, name)}): "
                f"its bytes were damaged on disk (or the checksums in {key!r} were)"
            )


def _files_of(path: Path, key: str) -> str:
    """The data file(s) holding the entry ``key``, as the metadata says."""
    metadata = read_metadata(path)
    files = sorted({str(path / info.relative_path) for index, info in metadata.storage_data.items() if index.fqn == key})
    return ", ".join(repr(f) for f in files) or "no file"


def _assemble(path: Path, entries: dict[str, torch.Tensor]) -> dict[str, Any]:
    """This rank's entry read with ``weights_only=True`` after every entry was checked against its
    checksum, its references to shared tensors resolved."""
    _verify(path, entries)
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

