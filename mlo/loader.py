"""`SeekableLoader`: batches of a map-style data set whose position can be saved and restored
without replaying batches, and that shards across ranks when a process group is initialized.

Each epoch is a permutation of the data set drawn from ``seed + epoch`` (the rule of
``torch.utils.data.DistributedSampler``, which it uses). Its position is the epoch and the index
of the next batch; ``state_dict`` / ``load_state_dict`` save and restore it, and a restored
loader starts at that batch without loading the ones before it. ``mlo.Engine`` saves the
position of every level whose data has ``state_dict`` / ``load_state_dict`` (this loader,
torchdata's ``StatefulDataLoader``), and replays the batches of any other data.

With ``W`` ranks, ``batch_size`` is the global batch: rank ``r`` reads ``batch_size / W``
samples of each global batch (the positions congruent to ``r`` mod ``W`` of the epoch's
permutation), so the ranks' batches together are exactly the batch one process would read.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from . import distributed
from .errors import ConfigError

__all__ = ["SeekableLoader"]


class _From(Sampler[int]):
    """The indices of one epoch of ``sampler`` from position ``start`` on."""

    def __init__(self, sampler: DistributedSampler, start: int) -> None:
        self.sampler, self.start = sampler, start

    def __iter__(self) -> Iterator[int]:
        return iter(list(self.sampler)[self.start :])

    def __len__(self) -> int:
        return max(len(self.sampler) - self.start, 0)


class SeekableLoader:
    """Shuffled (or ordered) batches of ``dataset``, seekable and sharded across ranks.

    Args:
        dataset: a map-style data set (``len`` and indexing).
        batch_size: the global batch size; with ``W`` ranks it must be a multiple of ``W``.
        shuffle: a new permutation every epoch, drawn from ``seed + epoch``.
        seed: the permutations' seed (the same on every rank).
        drop_last: drop the last incomplete batch of an epoch (the default; then ``W`` ranks
            read exactly what one process reads).
        rank, world_size: the shard to read; default: the initialized process group's, or the
            whole data set without one.
        **loader_options: passed to ``torch.utils.data.DataLoader`` (``num_workers``,
            ``collate_fn``, ``pin_memory``, ...).
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = True,
        rank: int | None = None,
        world_size: int | None = None,
        **loader_options: Any,
    ) -> None:
        world = distributed.world_size() if world_size is None else world_size
        me = distributed.rank() if rank is None else rank
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"SeekableLoader: batch_size must be an int >= 1, got {batch_size!r}")
        if batch_size % world:
            raise ConfigError(
                f"SeekableLoader: the global batch_size {batch_size} is not a multiple of the {world} ranks; "
                "every rank must read an equal share of each batch"
            )
        for key in ("sampler", "batch_sampler", "shuffle", "batch_size", "drop_last"):
            if key in loader_options:
                raise ConfigError(f"SeekableLoader: {key!r} is set by the loader itself, not a DataLoader option")
        self.dataset, self.batch_size, self.drop_last = dataset, batch_size, drop_last
        self.local_batch_size = batch_size // world
        self.options = loader_options
        self.seed = seed
        self.sampler: DistributedSampler[Any] = DistributedSampler(dataset, num_replicas=world, rank=me, shuffle=shuffle, seed=seed, drop_last=drop_last)
        if len(self) == 0:
            raise ConfigError(
                f"SeekableLoader: {len(self.sampler)} samples per rank make no batch of {self.local_batch_size}"
            )
        self.epoch = 0
        self.index = 0  # the next batch of the epoch

    def __len__(self) -> int:
        """Batches per epoch."""
        n = len(self.sampler)
        per = self.local_batch_size
        return n // per if self.drop_last else -(-n // per)

    def __iter__(self) -> Iterator[Any]:
        """The rest of the current epoch, from the saved position; the next pass starts the next epoch."""
        if self.index >= len(self):
            self.epoch, self.index = self.epoch + 1, 0
        self.sampler.set_epoch(self.epoch)
        # the loader's own generator seeds its workers, so the global generator is never read
        options = {"generator": torch.Generator().manual_seed(self.seed + self.epoch), **self.options}
        loader = DataLoader(
            self.dataset, batch_size=self.local_batch_size, drop_last=self.drop_last,
            sampler=_From(self.sampler, self.index * self.local_batch_size), **options,
        )
        for batch in loader:
            self.index += 1
            yield batch
        self.epoch, self.index = self.epoch + 1, 0

    def state_dict(self) -> dict[str, int]:
        """The position of the next batch: ``{"epoch": e, "index": i}``."""
        if self.index >= len(self):
            return {"epoch": self.epoch + 1, "index": 0}
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from a saved position; a pass started after this begins at that batch."""
        epoch, index = int(state["epoch"]), int(state["index"])
        if epoch < 0 or not 0 <= index <= len(self):
            raise ConfigError(f"SeekableLoader: position {state!r} is outside the data ({len(self)} batches per epoch)")
        self.epoch, self.index = epoch, index
