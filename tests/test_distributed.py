"""Data-parallel on torch.distributed (gloo, CPU, loopback): 2 ranks on halves of every batch
compute what 1 process computes on the whole batch; ranks stay bit-identical; DDP is refused."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import mlo
from programs import mlp_program

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore::mlo.ConvergenceWarning")]

ESTIMATORS = ["finite_difference", "cg:iterations=6,damping=0.5", "neumann:iterations=6,alpha=0.05", "unroll:steps=2"]
ROUNDS = 3


def _engine(estimator: str, part: slice) -> mlo.Engine:
    """The MLP bilevel program (no BatchNorm: whole-batch statistics are the documented
    exception), each level reading ``part`` of its batch of 12."""
    prog = mlp_program(batchnorm=False, unused=True, n=12)
    prog.lower.data = [(x[part], y[part]) for x, y in prog.train]
    prog.upper.data = [(x[part], y[part]) for x, y in prog.val]
    prog.lower.steps = 2
    return mlo.Engine([prog.lower, prog.upper], {"upper": ["lower"]}, estimator)


def _run(estimator: str, part: slice) -> dict[str, Any]:
    engine = _engine(estimator, part)
    hyper = engine.hypergradient("upper")
    engine.run(ROUNDS)
    return {"hyper": hyper, "params": [p.detach().clone() for level in ("lower", "upper") for p in engine.program.params[level]]}


def _worker(rank: int, store: str, out: str) -> None:
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        results = {est: _run(est, slice(rank, None, 2)) for est in ESTIMATORS}
        model = torch.nn.Linear(2, 1)
        try:
            mlo.Engine([mlo.Problem("w", torch.nn.parallel.DistributedDataParallel(model), torch.optim.SGD(model.parameters(), lr=0.1),
                                    loss=lambda b: model.weight.sum())])
            results["ddp"] = "accepted"
        except mlo.ProgramError as err:
            results["ddp"] = str(err)
        import warnings

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            bn = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
            mlo.Engine([mlo.Problem("bn", bn, torch.optim.SGD(bn.parameters(), lr=0.1), loss=lambda b: bn[0].weight.sum())])
        results["batchnorm"] = [str(w.message) for w in caught]
        torch.save(results, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_ranks_on_halves_equal_one_process_on_the_whole_batch(tmp_path: Path, float64: None) -> None:
    mp.spawn(_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for est in ESTIMATORS:
        whole = _run(est, slice(None))
        for key in ("hyper", "params"):
            for a, b, want in zip(ranks[0][est][key], ranks[1][est][key], whole[key]):
                assert torch.equal(a, b), f"{est}: ranks differ in {key}"
                torch.testing.assert_close(a, want, rtol=1e-9, atol=1e-12, msg=lambda m: f"{est} {key}: {m}")
    for r in ranks:
        assert "DistributedDataParallel" in r["ddp"] and "plain module" in r["ddp"]
        assert any("level 'bn': BatchNorm" in m and "own batch statistics" in m for m in r["batchnorm"])


def test_without_a_process_group_everything_is_local() -> None:
    assert not mlo.distributed.active() and mlo.distributed.world_size() == 1 and mlo.distributed.is_main()
    t = (torch.ones(2),)
    with mlo.distributed.data_parallel():
        assert mlo.distributed.average(t)[0] is t[0]


def test_seekable_loader_shards_are_the_halves_of_the_whole_batches() -> None:
    """With world_size 2, rank r reads the positions r, r+2, ... of every global batch: the two
    shards of batch t together are exactly batch t of one process (the same permutation)."""
    data = torch.utils.data.TensorDataset(torch.arange(23.0))
    whole = mlo.loader.SeekableLoader(data, batch_size=6, seed=3, world_size=1, rank=0)
    shards = [mlo.loader.SeekableLoader(data, batch_size=6, seed=3, world_size=2, rank=r) for r in range(2)]
    for _ in range(2):  # two epochs
        assert len(whole) == len(shards[0]) == 3
        for (w,), (a,), (b,) in zip(whole, *shards):
            assert len(a) == len(b) == 3
            assert torch.equal(w[0::2], a) and torch.equal(w[1::2], b)
    with pytest.raises(ValueError, match="not a multiple of the 2 ranks"):
        mlo.loader.SeekableLoader(data, batch_size=5, world_size=2, rank=0)
