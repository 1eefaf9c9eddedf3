"""Checkpoints and exact resume (mlo.checkpoint, Engine.state_dict): bit-identical continuation with
Dropout and shuffled data, atomic writes that survive SIGKILL, SIGTERM, damaged and unsafe files."""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch

import mlo
from mlo import checkpoint, distributed_checkpoint

from .helpers import CountRounds, assert_same, dropout_program, on_two_ranks, snapshot, wait_for_line

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parent.parent


def _assert_identical(a: mlo.Engine, b: mlo.Engine) -> None:
    """Every parameter, buffer and optimizer state bit-identical, the schedulers too."""
    assert_same(snapshot(*a.program.problems.values()), snapshot(*b.program.problems.values()))
    for name, problem in a.program.problems.items():
        if problem.scheduler is not None:
            assert problem.scheduler.state_dict() == b.program.problems[name].scheduler.state_dict()


@pytest.mark.parametrize("loader", ["dataloader", "seekable"])
def test_resume_is_bit_identical_with_dropout_and_shuffled_data(loader: str, tmp_path: Path) -> None:
    """6 rounds in one go == 4 rounds, save, a fresh process state, load, 2 rounds (crossing
    epochs of a shuffled loader), down to every bit of parameters, optimizer state and the
    random generators; hook and transform state come back too."""
    count = CountRounds()
    whole = dropout_program(loader, hooks=[count])
    whole.run(6)
    after = torch.rand(3)  # the global generator moved exactly as in the resumed run

    first = dropout_program(loader, hooks=[CountRounds()])
    first.run(4)
    checkpoint.save(first, tmp_path / "ck.pt")
    torch.manual_seed(1234)  # anything the new process did before loading must not matter
    torch.rand(7)
    resumed_count = CountRounds()
    resumed = dropout_program(loader, hooks=[resumed_count])
    checkpoint.load(resumed, tmp_path / "ck.pt")
    assert resumed.round == 4 and resumed_count.rounds == 4
    resumed.run(2)
    _assert_identical(whole, resumed)
    assert torch.equal(torch.rand(3), after)
    assert (resumed_count.rounds, resumed_count.total) == (count.rounds, count.total)
    torch.manual_seed(5)  # dropout draws again: the same masks for both
    got = resumed.hypergradient("upper")
    torch.manual_seed(5)
    torch.testing.assert_close(got, whole.hypergradient("upper"), rtol=0, atol=0)  # same batches in use


@pytest.mark.filterwarnings("ignore::mlo.ConvergenceWarning")
@pytest.mark.parametrize("estimator", mlo.estimators.names())
def test_resume_is_bit_identical_with_every_registered_estimator(estimator: str, tmp_path: Path) -> None:
    """The contract over the registry: 4 rounds in one go == 2 rounds, save, load into a fresh
    engine, 2 rounds; and the hypergradient right after loading (before the lower level steps
    again) is the uninterrupted run's, so state an estimator reads from the previous round
    (``sama``'s ``LevelState.last_gradient`` under Adam) is in the checkpoint."""
    whole = dropout_program("seekable", estimator, lower_adam=True)
    whole.run(2)
    checkpoint.save(whole, tmp_path / "ck.pt")
    with torch.random.fork_rng():  # the same dropout masks for both, the runs' generators untouched
        torch.manual_seed(5)
        at_save = whole.hypergradient("upper")
    whole.run(2)
    resumed = dropout_program("seekable", estimator, lower_adam=True)
    checkpoint.load(resumed, tmp_path / "ck.pt")
    with torch.random.fork_rng():
        torch.manual_seed(5)
        torch.testing.assert_close(resumed.hypergradient("upper"), at_save, rtol=0, atol=0)
    resumed.run(2)
    _assert_identical(whole, resumed)


def test_seekable_loader_seeks_without_replaying(tmp_path: Path) -> None:
    """Resuming a run on a SeekableLoader reads only the batch in use, not the ones before it."""
    engine = dropout_program("seekable")
    engine.run(7)  # 14 lower batches: epoch 2, index 4
    data = engine.program.problems["lower"].data
    assert data.state_dict() == {"epoch": 2, "index": 4}
    fetched = []

    class Counting(torch.utils.data.TensorDataset):
        def __getitem__(self, i):  # type: ignore[no-untyped-def]
            fetched.append(i)
            return super().__getitem__(i)

    fresh = dropout_program("seekable")
    fresh_data = fresh.program.problems["lower"].data
    fresh_data.dataset = Counting(*fresh_data.dataset.tensors)
    fresh.load_state_dict(engine.state_dict())
    assert len(fetched) == 4  # one batch of 4 samples: the batch in use
    assert fresh_data.state_dict() == data.state_dict()


def test_checkpoint_hook_every_n_rounds_keeps_the_newest(tmp_path: Path) -> None:
    engine = dropout_program(hooks=[checkpoint.Checkpoint(tmp_path, every=2, keep=2)])
    engine.run(7)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["checkpoint-00000004.pt", "checkpoint-00000006.pt"]
    assert checkpoint.latest(tmp_path) == tmp_path / "checkpoint-00000006.pt"
    assert checkpoint.read(checkpoint.latest(tmp_path))["engine"]["round"] == 6


def test_truncated_checkpoint_is_a_clear_error_and_the_previous_is_kept(tmp_path: Path) -> None:
    engine = dropout_program(hooks=[checkpoint.Checkpoint(tmp_path, every=1, keep=2)])
    engine.run(2)
    newest, previous = tmp_path / "checkpoint-00000002.pt", tmp_path / "checkpoint-00000001.pt"
    newest.write_bytes(newest.read_bytes()[:500])
    with pytest.raises(mlo.CheckpointError, match="checkpoint-00000002.pt.*truncated or corrupt"):
        checkpoint.load(dropout_program(), newest)
    fresh = dropout_program()
    checkpoint.load(fresh, previous)
    assert fresh.round == 1
    with pytest.raises(mlo.CheckpointError, match="does not exist"):
        checkpoint.read(tmp_path / "nothing.pt")


def test_load_latest_skips_a_damaged_newest_checkpoint_naming_it(tmp_path: Path) -> None:
    engine = dropout_program(hooks=[checkpoint.Checkpoint(tmp_path, every=1, keep=3)])
    engine.run(3)
    newest = tmp_path / "checkpoint-00000003.pt"
    newest.write_bytes(newest.read_bytes()[:500])
    fresh = dropout_program()
    with pytest.warns(checkpoint.CheckpointWarning, match=r"checkpoint-00000003\.pt.*truncated or corrupt.*skipped, "
                      r"resuming from the older .*checkpoint-00000002\.pt"):
        assert checkpoint.load_latest(fresh, tmp_path) == tmp_path / "checkpoint-00000002.pt"
    assert fresh.round == 2
    for older in ("checkpoint-00000001.pt", "checkpoint-00000002.pt"):
        (tmp_path / older).write_bytes(b"")
    with pytest.raises(mlo.CheckpointError, match=r"no checkpoint checkpoint-\* in .* could be read: .*00000003.*00000002.*00000001"):
        checkpoint.load_latest(dropout_program(), tmp_path)
    assert checkpoint.load_latest(dropout_program(), tmp_path / "empty") is None


class Payload:
    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (print, ("pickled code ran",))


def test_a_pickled_code_payload_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"format": checkpoint.FORMAT, "engine": Payload()}, path)
    with pytest.raises(mlo.CheckpointError, match="evil.pt.*refused"):
        checkpoint.read(path)
    assert "pickled code ran" not in capsys.readouterr().out


_CHILD = textwrap.dedent(
    """
    import os, sys, time
    import torch
    torch.set_num_threads(1)
    from mlo import checkpoint, distributed_checkpoint
    from tests.helpers import dropout_program
    mode, out = sys.argv[1], sys.argv[2]
    if mode == "kill":
        engine = dropout_program()
        engine.run(2)
        checkpoint.save(engine, out)
        engine.run(1)
        def stuck(fd):
            print("writing", flush=True)
            time.sleep(60)
        os.fsync = stuck  # the next write stops in the middle, before its rename
        checkpoint.save(engine, out)
    else:
        engine = dropout_program(hooks=[checkpoint.Checkpoint(out, every=1000)])
        class Ready(checkpoint.Hook):
            def on_round(self, engine):
                if engine.round == 3:
                    print("ready", flush=True)
                time.sleep(0.05)
        engine.hooks.insert(0, Ready())
        engine.run(10**6)
    """
)


def _child(mode: str, out: Path) -> subprocess.Popen[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # run from the repository root, so that the child imports tests.helpers as the tests do
    return subprocess.Popen([sys.executable, "-c", _CHILD, mode, str(out)],
                            stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT)


def test_sigkill_in_the_middle_of_a_write_keeps_the_previous_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "ck.pt"
    proc = _child("kill", path)
    wait_for_line(proc, "writing")
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert checkpoint.read(path)["engine"]["round"] == 2  # the new one never replaced it
    resumed = dropout_program()
    checkpoint.load(resumed, path)
    resumed.run(3)
    whole = dropout_program()
    whole.run(5)
    _assert_identical(whole, resumed)


def test_sigterm_saves_at_the_end_of_the_round_and_exits(tmp_path: Path) -> None:
    proc = _child("term", tmp_path)
    wait_for_line(proc, "ready")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    path = checkpoint.latest(tmp_path)
    assert path is not None
    resumed = dropout_program()
    checkpoint.load(resumed, path)
    done = resumed.round
    assert done >= 3
    resumed.run(2)
    whole = dropout_program()
    whole.run(done + 2)
    _assert_identical(whole, resumed)


# ---------------------------------------------------------------------------------------------- several ranks (DCP)


class _OpensAFile:
    """A pickled payload that, if unpickled, would create the file ``path``."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (open, (self.path, "w"))


def _errors(load: Any) -> str:
    try:
        load()
    except mlo.CheckpointError as err:
        return str(err)
    return "no error"


def _ranks_worker(rank: int, folder: str) -> None:
    """Each rank: exact resume with Dropout (each rank its own masks) and shuffled sharded data;
    damaged, unsafe and failed checkpoints; the hook's directories."""
    from unittest import mock

    out, results = Path(folder), {}
    for loader in ("distributed", "seekable"):

        def build(hooks: Any = ()) -> mlo.Engine:
            engine = dropout_program(loader, hooks=hooks)
            torch.manual_seed(100 + rank)  # each rank draws its own Dropout masks
            return engine

        path = out / f"ck-{loader}"
        count, resumed_count = CountRounds(), CountRounds()
        whole = build([count])
        whole.run(3)
        checkpoint.save(whole, path)
        whole.run(2)
        whole_rng = torch.get_rng_state()
        torch.manual_seed(1234)  # anything before loading must not matter
        resumed = build([resumed_count])
        checkpoint.load(resumed, path)
        resumed.run(2)
        results[loader] = {
            "whole": snapshot(*whole.program.problems.values()), "resumed": snapshot(*resumed.program.problems.values()),
            "rng": [whole_rng, torch.get_rng_state()], "hooks": [count.state_dict(), resumed_count.state_dict()],
        }
    source = out / "ck-seekable"
    damaged = {"data": out / "truncated-data", "metadata": out / "truncated-metadata", "unsafe": out / "unsafe"}
    marker = out / "pickled-code-ran"
    if rank == 0:
        for copy in damaged.values():
            shutil.copytree(source, copy)
        data_file = damaged["data"] / "__1_0.distcp"
        data_file.write_bytes(data_file.read_bytes()[:100])
        meta = damaged["metadata"] / ".metadata"
        meta.write_bytes(meta.read_bytes()[:200])
        (damaged["unsafe"] / ".metadata").write_bytes(pickle.dumps(_OpensAFile(str(marker))))
    flipped = {"shared": out / "flipped-shared", "rank": out / "flipped-rank1"}
    if rank == 0:
        for kind, copy in flipped.items():
            shutil.copytree(source, copy)
            _flip_a_byte(copy, _largest_entry(copy, "shared/") if kind == "shared" else "rank1")
    mlo.distributed.barrier()
    results["damaged"] = {kind: _errors(lambda: checkpoint.load(dropout_program("seekable"), p)) for kind, p in damaged.items()}
    results["flipped"] = {kind: _errors(lambda: checkpoint.read(p)) for kind, p in flipped.items()}
    results["pickled code ran"] = marker.exists()

    engine = dropout_program("seekable")
    engine.run(3)
    kept = out / "ck-kept"
    checkpoint.save(engine, kept)
    engine.run(1)
    with mock.patch("os.fsync", side_effect=OSError("disk full")) if rank == 1 else contextlib.nullcontext():
        results["failed write"] = _errors(lambda: checkpoint.save(engine, kept))
    results["after the failed write"] = [checkpoint.read(kept)["engine"]["round"], sorted(os.listdir(out))]
    checkpoint.save(engine, kept)  # replaces the directory
    results["after a good write"] = checkpoint.read(kept)["engine"]["round"]

    hooked = dropout_program("seekable", hooks=[checkpoint.Checkpoint(out / "hook", every=2, keep=2)])
    hooked.run(5)
    results["hook"] = [sorted(os.listdir(out / "hook")), checkpoint.latest(out / "hook").name]
    torch.save(results, out / f"rank{rank}.pt")


def _largest_entry(path: Path, prefix: str) -> str:
    """The key of the largest entry of a DCP checkpoint whose key starts with ``prefix``."""
    metadata = distributed_checkpoint.read_metadata(path)
    return max((i for i in metadata.storage_data.items() if i[0].fqn.startswith(prefix)), key=lambda i: i[1].length)[0].fqn


def _flip_a_byte(path: Path, key: str) -> Path:
    """Invert one byte in the middle of the entry ``key``'s tensor data in its .distcp file (DCP
    stores each tensor as a ``torch.save`` record, headers around the data); returns the file."""
    metadata = distributed_checkpoint.read_metadata(path)
    info = next(info for index, info in metadata.storage_data.items() if index.fqn == key)
    file = path / info.relative_path
    data = bytearray(file.read_bytes())
    record = bytes(data[info.offset: info.offset + info.length])
    values = torch.load(io.BytesIO(record), weights_only=True).contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    start = record.find(values)
    assert start >= 0 and len(values) > 0
    data[info.offset + start + len(values) // 2] ^= 0xFF
    file.write_bytes(bytes(data))
    return file


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, Any]]]:
    """The folder and what each of 2 ranks recorded (`_ranks_worker`)."""
    folder = tmp_path_factory.mktemp("dcp")
    on_two_ranks(_ranks_worker, str(folder / "store"), str(folder))
    return folder, [torch.load(folder / f"rank{r}.pt", weights_only=True) for r in range(2)]


@pytest.mark.parametrize("loader", ["distributed", "seekable"])
def test_two_ranks_resume_bit_identically_each_rank(ranks: tuple[Path, list[dict[str, Any]]], loader: str) -> None:
    """k rounds, checkpoint (DCP), m more == restored from the checkpoint, m rounds: on every
    rank, every parameter, buffer, optimizer state, hook state and the random generator."""
    _, results = ranks
    for r in results:
        assert_same(r[loader]["whole"], r[loader]["resumed"])
        assert torch.equal(*r[loader]["rng"])
        assert r[loader]["hooks"][0] == r[loader]["hooks"][1]
    params = [{k: v for k, v in r[loader]["whole"].items() if ".param." in k} for r in results]
    assert_same(*params)  # replicated state: the same on both ranks
    assert not torch.equal(results[0][loader]["rng"][0], results[1][loader]["rng"][0])  # own state: each rank's


def test_two_rank_checkpoint_damage_is_named_and_unsafe_metadata_refused(ranks: tuple[Path, list[dict[str, Any]]]) -> None:
    folder, results = ranks
    for r in results:
        errors = r["damaged"]
        assert "truncated-data/__1_0.distcp" in errors["data"] and "truncated" in errors["data"]
        assert "truncated-metadata/.metadata" in errors["metadata"] and "truncated or corrupt" in errors["metadata"]
        assert "unsafe/.metadata" in errors["unsafe"] and "refused" in errors["unsafe"]
        assert not r["pickled code ran"]
    with pytest.raises(mlo.CheckpointError, match="written by 2 rank.*not 1"):  # one process, a 2-rank checkpoint
        checkpoint.load(dropout_program("seekable"), folder / "ck-seekable")


def test_two_rank_checkpoint_a_flipped_byte_is_named_by_its_checksum(ranks: tuple[Path, list[dict[str, Any]]]) -> None:
    """A byte flipped inside a tensor's data (a shared parameter; one rank's own entry) is found by
    its checksum, and the error names the entry and its file, on every rank."""
    folder, results = ranks
    shared = _largest_entry(folder / "ck-seekable", "shared/")
    for r in results:
        assert f"entry {shared!r} does not match its checksum" in r["flipped"]["shared"]
        assert "flipped-shared/__" in r["flipped"]["shared"] and ".distcp" in r["flipped"]["shared"]
    assert "entry 'rank1' does not match its checksum" in results[1]["flipped"]["rank"]
    assert "flipped-rank1/__1_0.distcp" in results[1]["flipped"]["rank"]


def test_dcp_metadata_names_renamed_in_torch_are_named_with_the_torch_version(
    ranks: tuple[Path, list[dict[str, Any]]], tmp_path: Path
) -> None:
    """A torch that lost one of the internals the metadata reader admits (simulated: an allow-list
    naming one torch lacks), and metadata naming a DCP class the reader does not know (simulated:
    the name changed in the file): each error names the torch version and the name."""
    from mlo import distributed_checkpoint as dc

    folder, _ = ranks
    renamed = {**dc.METADATA_NAMES, "torch.distributed.checkpoint.filesystem": frozenset({"_StorageInfoV2"})}
    assert dc.missing_names() == []
    assert dc.missing_names(renamed) == ["torch.distributed.checkpoint.filesystem._StorageInfoV2"]
    with pytest.raises(mlo.CheckpointError, match=rf"torch {re.escape(torch.__version__)} has no "
                       r"torch\.distributed\.checkpoint\.filesystem\._StorageInfoV2"):
        dc.read_metadata(folder / "ck-seekable", renamed)
    copy = tmp_path / "ck"
    shutil.copytree(folder / "ck-seekable", copy)
    meta = copy / ".metadata"
    assert b"_StorageInfo" in meta.read_bytes()
    meta.write_bytes(meta.read_bytes().replace(b"_StorageInfo", b"_StorageInfZ"))  # same length: the pickle stays well-formed
    with pytest.raises(mlo.CheckpointError, match=rf"names torch\.distributed\.checkpoint\.filesystem\._StorageInfZ.*"
                       rf"torch {re.escape(torch.__version__)}.*nothing in it was run"):
        checkpoint.read(copy)


def test_two_rank_failed_write_keeps_the_previous_checkpoint(ranks: tuple[Path, list[dict[str, Any]]]) -> None:
    _, results = ranks
    for r in results:
        assert "ck-kept" in r["failed write"] and "not written" in r["failed write"] and "disk full" in results[1]["failed write"]
        round_, names = r["after the failed write"]
        assert round_ == 3 and not any(n.startswith(".ck-kept") for n in names)
        assert r["after a good write"] == 4
        assert r["hook"] == [["checkpoint-00000002", "checkpoint-00000004"], "checkpoint-00000004"]


def test_dcp_byte_entries_are_refused_unread(tmp_path: Path) -> None:
    """DCP reads its byte entries with torch.load(weights_only=False); mlo writes none and refuses
    a checkpoint holding one before DCP reads anything."""
    import torch.distributed.checkpoint as dcp

    marker = tmp_path / "pickled-code-ran"
    dcp.save({"rank0": _OpensAFile(str(marker)), "shared/x": torch.ones(2)}, checkpoint_id=tmp_path / "ck", no_dist=True)
    with pytest.raises(mlo.CheckpointError, match="entry 'rank0' is not a tensor .*refused"):
        checkpoint.read(tmp_path / "ck")
    assert not marker.exists()


def _sharded_level(seen: list[list[int]]) -> mlo.Problem:
    """One level on rank 0's shard of 8 indices (a shuffled DistributedSampler, 2 replicas, no
    process group needed), 2 batches a pass; its loss records the batches it is given."""
    from torch.utils.data import DataLoader, DistributedSampler

    data = list(range(8))
    sampler: DistributedSampler[int] = DistributedSampler(data, num_replicas=2, rank=0, shuffle=True, seed=1)
    w = torch.nn.Parameter(torch.ones(1))
    module = torch.nn.ParameterList([w])

    def loss(batch: torch.Tensor) -> torch.Tensor:
        seen.append(batch.tolist())
        return (w**2).sum()

    loader = DataLoader(data, batch_size=2, sampler=sampler)
    return mlo.Problem("x", module, torch.optim.SGD(module.parameters(), lr=0.1), loss=loss, data=loader)


def test_a_distributed_sampler_moves_to_a_new_epoch_each_pass_and_resumes_there(tmp_path: Path) -> None:
    from torch.utils.data import DistributedSampler

    def permutation(epoch: int) -> list[int]:
        sampler: DistributedSampler[int] = DistributedSampler(list(range(8)), num_replicas=2, rank=0, shuffle=True, seed=1)
        sampler.set_epoch(epoch)
        return list(sampler)

    expected = [permutation(e) for e in range(3)]
    assert expected[0] != expected[1] != expected[2]  # the reference itself tells the epochs apart
    seen: list[list[int]] = []
    whole = mlo.Engine([_sharded_level(seen)])
    whole.run(6)
    assert [a + b for a, b in zip(seen[0::2], seen[1::2])] == expected

    part_seen: list[list[int]] = []
    first = mlo.Engine([_sharded_level(part_seen)])
    first.run(3)  # in the middle of the second pass (epoch 1)
    checkpoint.save(first, tmp_path / "ck.pt")
    resumed_seen: list[list[int]] = []
    resumed = mlo.Engine([_sharded_level(resumed_seen)])
    checkpoint.load(resumed, tmp_path / "ck.pt")
    resumed.run(3)
    assert part_seen + resumed_seen == seen
