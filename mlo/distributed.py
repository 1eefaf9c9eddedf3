"""Data-parallel collectives: the one place mlo talks to ``torch.distributed``.

When a process group is initialized (``torchrun`` plus ``torch.distributed.init_process_group``
in the script), every rank runs the same program on its shard of each level's data, and the
Engine averages across ranks every derivative it forms: `mlo.autodiff.grad`, through which every
gradient, Hessian-vector product, mixed product and hypergradient passes, calls `average`
inside `data_parallel`. Because a derivative is linear in the loss, and every value it is
evaluated at (parameters, look-aheads, seeds) is the same on every rank, the average is exactly
the derivative of the mean loss over the ranks' batches: ``W`` ranks on ``1/W`` of every batch
compute what one process computes on the whole batch, and hold bit-identical parameters.

A derivative kept in a graph (``create_graph``: look-aheads of ``unroll``, curvature products)
is averaged with an all-reduce that is itself differentiable, whose backward pass averages
the adjoints arriving at it: later derivatives through it stay exact.

The documented exception: statistics over the whole batch inside a loss (BatchNorm in train
mode) are per rank. Modules wrapped in DistributedDataParallel or FSDP are refused
(`refuse_wrapped`): their hooks never run under ``torch.autograd.grad``, so ranks would drift.

Without a process group (or with one rank) every function here is the identity.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .errors import ProgramError

__all__ = [
    "active", "rank", "world_size", "is_main", "data_parallel", "averaging", "average", "all_sum", "any_rank", "broadcast_module",
    "refuse_wrapped", "warn_batch_statistics", "barrier", "shutdown", "init_from_env",
]

_AVERAGING: ContextVar[bool] = ContextVar("mlo_data_parallel", default=False)


def active() -> bool:
    """Whether a process group with more than one rank is initialized."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    """The number of ranks (1 without a process group)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main() -> bool:
    """Whether this process is rank 0: the one that writes results, logs and plots."""
    return rank() == 0


def barrier() -> None:
    """Wait for every rank (nothing without a process group)."""
    if active():
        dist.barrier()


def shutdown(wait: bool = True) -> None:
    """Destroy the default process group (nothing without one). ``wait``: every rank first waits
    for the others, so that none tears the group down while another still uses it (gloo aborts
    that one: "terminate called without an active exception"); pass False when leaving on an
    error, where the other ranks may never arrive."""
    if dist.is_available() and dist.is_initialized():
        if wait:
            barrier()
        dist.destroy_process_group()


def all_sum(*tensors: Tensor) -> None:
    """Sum each tensor in place over the ranks (under a process group; else nothing). For
    statistics a program gathers itself, outside derivatives (e.g. per-class counts)."""
    if active():
        for t in tensors:
            dist.all_reduce(t)


def any_rank(flag: bool) -> bool:
    """Whether ``flag`` is true on any rank (so that every rank takes the same branch)."""
    if not active():
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def init_from_env(device: str = "cpu") -> str:
    """Under ``torchrun`` (``WORLD_SIZE`` > 1 in the environment): initialize the default process
    group from torchrun's variables, gloo on CPU or nccl on CUDA, and return this rank's device
    (``cuda:LOCAL_RANK`` for a CUDA device). Without torchrun: nothing, and ``device``."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return device
    cuda = device.startswith("cuda")
    if cuda:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo")
    return device


@contextmanager
def data_parallel(enabled: bool = True) -> Iterator[None]:
    """Inside: `average` averages across ranks (when a process group is active)."""
    token = _AVERAGING.set(enabled and active())
    try:
        yield
    finally:
        _AVERAGING.reset(token)


def averaging() -> bool:
    """Whether `average` averages here: inside `data_parallel` with a process group active."""
    return _AVERAGING.get()


def average(tensors: Sequence[Tensor], differentiable: bool = False) -> tuple[Tensor, ...]:
    """The mean over ranks of each tensor (one all-reduce per dtype and device), inside
    `data_parallel`; elsewhere the tensors as they are. ``differentiable``: the result stays in
    the graph, and the backward pass averages the adjoints across ranks the same way."""
    tensors = tuple(tensors)
    if not tensors or not _AVERAGING.get():
        return tensors
    world = dist.get_world_size()
    out: list[Tensor | None] = [None] * len(tensors)
    groups: dict[tuple[torch.dtype, torch.device], list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault((t.dtype, t.device), []).append(i)
    for indices in groups.values():
        parts = [tensors[i] for i in indices]
        if differentiable:
            import torch.distributed.nn.functional as dist_fn

            flat = dist_fn.all_reduce(torch.cat([t.reshape(-1) for t in parts])) / world
        else:
            flat = torch.cat([t.detach().reshape(-1) for t in parts])
            dist.all_reduce(flat)
            flat /= world
        start = 0
        for i, t in zip(indices, parts):
            out[i] = flat[start : start + t.numel()].view_as(t)
            start += t.numel()
    return tuple(t for t in out if t is not None)


def broadcast_module(module: nn.Module) -> None:
    """Copy rank 0's parameters and buffers into every rank's ``module`` (as DDP does when it
    wraps a module), so that all ranks start from the same state."""
    if not active():
        return
    with torch.no_grad():
        for t in [*module.parameters(), *module.buffers()]:
            dist.broadcast(t.data, src=0)


def warn_batch_statistics(level: str, module: nn.Module) -> None:
    """Under a process group: warn when ``module`` normalizes by batch statistics (BatchNorm in
    train mode), which are each rank's own, the one place where W ranks differ from one process."""
    if not active():
        return
    norms = [name or type(module).__name__ for name, sub in module.named_modules()
             if isinstance(sub, nn.modules.batchnorm._BatchNorm) and sub.training]
    if norms:
        warnings.warn(
            f"level {level!r}: BatchNorm layer(s) {norms[:3]}{' ...' if len(norms) > 3 else ''} use each rank's own batch "
            "statistics: with several ranks this level does not compute exactly what one process computes on the whole batch",
            stacklevel=3,
        )


def refuse_wrapped(level: str, module: nn.Module) -> None:
    """Raise `ProgramError` if ``module`` is, or contains, a DistributedDataParallel or FSDP
    wrapper: mlo takes derivatives with ``torch.autograd.grad``, which never runs their
    gradient hooks, so they would not synchronize anything."""
    from torch.nn.parallel import DistributedDataParallel

    for name, sub in module.named_modules():
        kinds = {c.__name__ for c in type(sub).__mro__}
        if isinstance(sub, DistributedDataParallel) or kinds & {"FullyShardedDataParallel", "FSDPModule"}:
            where = f"its module {'.' + name if name else ''}".rstrip()
            raise ProgramError(
                f"level {level!r}: {where} is wrapped in {type(sub).__name__}. mlo averages gradients, "
                "Hessian-vector products and hypergradients across ranks itself, and DDP/FSDP hooks never "
                "run under torch.autograd.grad (ranks would drift apart). Pass the plain module (ddp.module) "
                "to the Problem and call it directly in the loss; initialize the process group only."
            )
