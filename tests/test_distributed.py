"""Data-parallel on torch.distributed (gloo, CPU, loopback): 2 ranks on halves of every batch
compute what 1 process computes on the whole batch; ranks stay bit-identical; DDP is refused;
``sync="once"`` averages only the final hypergradient (the mean of the ranks' own) and issues
fewer collectives."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import torch
import torch.distributed as dist

import mlo

from .helpers import mlp_program, on_two_ranks, relative_error

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore::mlo.ConvergenceWarning")]

ESTIMATORS = ["finite_difference", "cg:iterations=6,damping=0.5", "neumann:iterations=6,alpha=0.05", "unroll:steps=2"]
ROUNDS = 3
#: the estimators checked with sync="once"
ONCE = ["finite_difference", "cg:iterations=6,damping=0.5"]


def _engine(estimator: str, part: slice, sync: str = "exact") -> mlo.Engine:
    """The MLP bilevel program (no BatchNorm: whole-batch statistics are the documented
    exception), each level reading ``part`` of its batch of 12."""
    prog = mlp_program(batchnorm=False, unused=True, n=12)
    prog.lower.data = [(x[part], y[part]) for x, y in prog.train]
    prog.upper.data = [(x[part], y[part]) for x, y in prog.val]
    prog.lower.steps = 2
    return mlo.Engine([prog.lower, prog.upper], {"upper": ["lower"]}, estimator, sync=sync)


def _run(estimator: str, part: slice, sync: str = "exact") -> dict[str, Any]:
    engine = _engine(estimator, part, sync)
    hyper = engine.hypergradient("upper")
    with mock.patch.object(dist, "all_reduce", wraps=dist.all_reduce) as all_reduce:
        engine.run(1)
    engine.run(ROUNDS - 1)
    return {"hyper": hyper, "params": [p.detach().clone() for level in ("lower", "upper") for p in engine.program.params[level]],
            "all_reduces": all_reduce.call_count}


def _worker(rank: int, out: str) -> None:
    torch.set_default_dtype(torch.float64)
    results = {est: _run(est, slice(rank, None, 2)) for est in ESTIMATORS}
    results["once"] = {est: _run(est, slice(rank, None, 2), "once") for est in ONCE}
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


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """What each of 2 ranks computed (`_worker`), one process group for the module's tests."""
    folder = tmp_path_factory.mktemp("ranks")
    on_two_ranks(_worker, str(folder / "store"), str(folder))
    return [torch.load(folder / f"rank{r}.pt", weights_only=True) for r in range(2)]


def test_two_ranks_on_halves_equal_one_process_on_the_whole_batch(ranks: list[dict[str, Any]], float64: None) -> None:
    for est in ESTIMATORS:
        whole = _run(est, slice(None))
        for key in ("hyper", "params"):
            for a, b, want in zip(ranks[0][est][key], ranks[1][est][key], whole[key]):
                assert torch.equal(a, b), f"{est}: ranks differ in {key}"
                torch.testing.assert_close(a, want, rtol=1e-9, atol=1e-12, msg=lambda m: f"{est} {key}: {m}")
    for r in ranks:
        assert "DistributedDataParallel" in r["ddp"] and "plain module" in r["ddp"]
        assert any("level 'bn': BatchNorm" in m and "own batch statistics" in m for m in r["batchnorm"])


@pytest.mark.parametrize("estimator", ONCE)
def test_sync_once_averages_the_ranks_own_hypergradients(ranks: list[dict[str, Any]], estimator: str, float64: None) -> None:
    """sync="once": the hypergradient is the mean of the hypergradients each rank computes on
    its half alone (its definition), which is not the whole batch's; ranks stay bit-identical,
    and one round issues one all-reduce per step (the lower level's 2 gradients, the upper's
    hypergradient) instead of one per derivative."""
    once = [r["once"][estimator] for r in ranks]
    halves = [_engine(estimator, slice(r, None, 2)).hypergradient("upper") for r in range(2)]
    mean = [(a + b) / 2 for a, b in zip(*halves)]
    for a, b, want in zip(once[0]["hyper"], once[1]["hyper"], mean):
        assert torch.equal(a, b)
        torch.testing.assert_close(a, want, rtol=1e-12, atol=1e-14)
    for a, b in zip(once[0]["params"], once[1]["params"]):
        assert torch.equal(a, b)
    whole = _run(estimator, slice(None))["hyper"]
    error = relative_error(once[0]["hyper"], whole)
    assert error > 1e-4, f"{estimator}: sync='once' is {error:.2e} from the whole batch's hypergradient"
    assert once[0]["all_reduces"] == 3 < ranks[0][estimator]["all_reduces"]
    print(f"{estimator}: relative error of sync='once' {error:.3g}; all-reduces per round "
          f"{once[0]['all_reduces']} (once) vs {ranks[0][estimator]['all_reduces']} (exact)")


def test_sync_must_be_exact_or_once() -> None:
    prog = mlp_program(batchnorm=False)
    with pytest.raises(mlo.ProgramError, match="sync must be one of .*'sometimes'"):
        mlo.Engine([prog.lower, prog.upper], {"upper": ["lower"]}, sync="sometimes")


def test_without_a_process_group_everything_is_local() -> None:
    assert not mlo.distributed.active() and mlo.distributed.world_size() == 1 and mlo.distributed.is_main()
    t = (torch.ones(2),)
    with mlo.distributed.data_parallel():
        assert mlo.distributed.average(t)[0] is t[0]
    mlo.distributed.shutdown()  # nothing to tear down: no error, nothing waited for
    mlo.distributed.shutdown(wait=False)


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
