"""`mlo.check`: the report against closed forms, what it says about an unconverged reference,
its warnings, and that it leaves the program exactly as it found it (bit for bit)."""

from __future__ import annotations

import warnings

import pytest
import torch

import mlo
from mlo.estimators import CG
from mlo.problems.ridge import Vector

from .helpers import assert_same, mlp_program, quadratic, relative_error, ridge, snapshot

pytestmark = pytest.mark.usefixtures("one_thread")


def _state(engine, *problems):
    """Everything check must not move: parameters, gradients, buffers, optimizer states, the data
    positions and round counter (state_dict), the diagnostics and the random generator."""
    levels = engine.state_dict()["levels"]
    return {
        **snapshot(*problems),
        "round": engine.round,
        "data": {name: levels[name]["data"] for name in levels},
        "batches": {p.name: engine.batch(p.name) for p in problems},
        "diagnostics": dict(engine.diagnostics.by_edge),
        "rng": torch.get_rng_state(),
        "dtype": torch.get_default_dtype(),
    }


def test_check_changes_nothing_bit_for_bit():
    # float32 program (converted to float64 for the reference), BatchNorm in train mode, SGD with
    # momentum and Adam with state, several batches per level
    program = mlp_program(batches=3)
    engine = program.engine("cg:iterations=3")
    engine.run(2)
    storage = [p.data_ptr() for level in (program.lower, program.upper) for p in level.module.parameters()]
    before = _state(engine, program.lower, program.upper)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", mlo.CheckWarning)
        report = mlo.check(engine, "upper")
    assert report.dtype == torch.float64 and report.reference_hypergradient[0].dtype == torch.float64
    assert report.hypergradient[0].dtype == torch.float32
    assert_same(before, _state(engine, program.lower, program.upper))
    # the very same memory was put back, not a copy converted back
    assert storage == [p.data_ptr() for level in (program.lower, program.upper) for p in level.module.parameters()]

    # and the run continues exactly as one that was never checked
    twin = mlp_program(batches=3)
    twin_engine = twin.engine("cg:iterations=3")
    twin_engine.run(2)
    engine.run(2)
    twin_engine.run(2)
    assert_same(snapshot(twin.lower, twin.upper), snapshot(program.lower, program.upper))


def test_reference_is_the_closed_form_and_rel_error_is_measured_against_it(float64):
    r = ridge(direct=0.3)
    r.set_w(r.optimum())
    engine = r.engine(CG(iterations=1, tol=0.0))
    engine.step("w")
    r.set_w(r.optimum())  # back at the exact best response, on the batch the step drew
    exact = r.exact_hypergradient()
    report = mlo.check(engine, "h", warn_above=float("inf"))
    assert relative_error(report.reference_hypergradient[0], exact) < 1e-9
    assert report.reference_converged is True
    configured = engine.hypergradient("h")[0]
    assert report.rel_error == pytest.approx(relative_error(configured, exact), rel=1e-6)
    assert report.rel_error > 1e-3  # one CG step is visibly off
    cosine = float(configured @ exact / (configured.norm() * exact.norm()))
    assert report.cosine == pytest.approx(cosine, rel=1e-9)
    assert report.estimator_seconds > 0 and report.reference_seconds > 0
    (edge,) = report.edges
    assert (edge.upper, edge.lower, edge.rel_error) == ("h", "w", report.rel_error)
    assert edge.diagnostics["iterations"] == 1 and edge.reference_diagnostics["converged"] == 1.0


def test_an_unroll_reference(float64):
    r = ridge()
    r.set_w(r.optimum())
    lo, hi = (float(x) for x in torch.linalg.eigvalsh(r.hessian())[[0, -1]])
    r.inner.optimizer.param_groups[0]["lr"] = 1.0 / hi
    engine = r.engine("cg:iterations=10,tol=1e-14")
    engine.step("w")
    r.set_w(r.optimum())
    steps = int(40 * hi / lo)  # the unrolled error decays as (1 - lo/hi)^K
    report = mlo.check(engine, "h", reference=f"unroll:steps={steps}")
    assert report.reference_converged is None  # unroll has no convergence test
    assert relative_error(report.reference_hypergradient[0], r.exact_hypergradient()) < 1e-8
    assert report.rel_error < 1e-8


def _indefinite(float64):
    g = torch.Generator().manual_seed(3)
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=g))
    A = q @ torch.diag(torch.tensor([-2.0, 0.5, 1.0, 2.0, 3.0, 5.0])) @ q.T
    w, h = Vector(torch.linspace(-1, 1, 6)), Vector(torch.linspace(1, -1, 6))
    lower = mlo.Problem("w", w, torch.optim.SGD(w.parameters(), lr=0.01), loss=lambda batch: 0.5 * w.value @ A @ w.value + h.value @ w.value)
    upper = mlo.Problem("h", h, torch.optim.SGD(h.parameters(), lr=0.01), loss=lambda batch: 0.5 * ((w.value - 1) ** 2).sum())
    return mlo.Engine([lower, upper], {"h": ["w"]}, "cg:iterations=2,damping=3.0")


def test_an_unconverged_reference_is_reported_as_such(float64):
    engine = _indefinite(float64)
    # the default reference stops at the first direction of negative curvature
    with pytest.warns(mlo.CheckWarning, match=r"reference for level 'h' did not converge.*not errors against the truth"):
        report = mlo.check(engine, "h")
    assert report.reference_converged is False and report.edges[0].reference_converged is False
    info = report.edges[0].reference_diagnostics
    assert info["negative_curvature"] == 1.0 and info["residual"] > 1e-6 and info["iterations"] < 6
    assert "did not converge" in str(report) and "negative curvature" in str(report)
    # a reference that is merely cut short is reported the same way
    with pytest.warns(mlo.CheckWarning, match="did not converge"):
        short = mlo.check(engine, "h", reference="cg:iterations=2,tol=1e-12,damping=3.0")
    assert short.reference_converged is False


def test_warns_above_the_threshold_only(float64):
    r = ridge()
    engine = r.engine("cg:iterations=1")
    engine.run(1)
    with pytest.warns(mlo.CheckWarning, match=r"hypergradient of level 'h' is .* off the cg.* reference.*edge 'h' -> 'w'"):
        report = mlo.check(engine, "h", warn_above=1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = mlo.check(engine, "h", warn_above=report.rel_error * 2)
    assert again.rel_error == report.rel_error


def test_each_edge_share_of_the_error(float64):
    # a diamond: top reads both lowers; an exact edge brings no error, a first-order one all of its own
    q = quadratic(
        {"top": 2, "left": 3, "right": 2},
        {"top": ["top", "left", "right"], "left": ["left", "top"], "right": ["right", "top"]},
        {"top": ["left", "right"]},
    )
    engine = q.engine({("top", "left"): "cg:iterations=50,tol=1e-14", ("top", "right"): "first_order"})
    engine.run(1)
    with pytest.warns(mlo.CheckWarning, match="edge 'top' -> 'right' with first_order contributes the most"):
        report = mlo.check(engine, "top")
    by_edge = {(e.upper, e.lower): e for e in report.edges}
    assert by_edge[("top", "left")].rel_error < 1e-9
    # the first-order edge misses exactly its own term: with the other edge exact, its share is the whole error
    assert by_edge[("top", "right")].rel_error == pytest.approx(report.rel_error, rel=1e-9)
    assert report.rel_error > 1e-3
    text = str(report)
    for word in ("top -> left", "top -> right", "first_order", "rel. error", "cosine", "all edges"):
        assert word in text


def test_refuses_what_it_cannot_check(float64):
    r = ridge()
    engine = r.engine("cg")
    with pytest.raises(mlo.ProgramError, match=r"level 'h' has drawn no batch yet: run a round"):
        r.outer.data = [None]
        mlo.check(mlo.Engine([r.inner, r.outer], {"h": ["w"]}), "h")
    engine.run(1)
    with pytest.raises(mlo.ProgramError, match=r"level 'w' has no lower levels.*levels with lowers: \['h'\]"):
        mlo.check(engine, "w")
    with pytest.raises(mlo.UnknownLevelError, match=r"unknown level 'x'; levels: \['w', 'h'\]"):
        mlo.check(engine, "x")
    with pytest.raises(mlo.EstimatorError, match="unknown estimator 'exact'"):
        mlo.check(engine, "h", reference="exact")
    with pytest.raises(ValueError, match="warn_above must be a number >= 0"):
        mlo.check(engine, "h", warn_above=-1)


# ---------------------------------------------------------------------------------------------- the command


USER_FILE = """
import torch
import mlo


def build():
    torch.manual_seed(0)
    w, h = torch.nn.Linear(3, 1, bias=False), torch.nn.Linear(3, 1, bias=False)
    lower = mlo.Problem("w", w, torch.optim.SGD(w.parameters(), lr=0.1),
                        loss=lambda batch: ((w.weight - h.weight) ** 2).sum() + (w.weight ** 2).sum())
    upper = mlo.Problem("h", h, torch.optim.SGD(h.parameters(), lr=0.1), loss=lambda batch: ((w.weight - 1.0) ** 2).sum())
    return mlo.Engine([lower, upper], {"h": ["w"]}, "cg:iterations=1")


def not_an_engine():
    return 3
"""


def test_the_command_checks_a_users_program(tmp_path, capsys, monkeypatch):
    from mlo.cli import main

    monkeypatch.setenv("COLUMNS", "200")  # rich's console width: one line per table row
    path = tmp_path / "program.py"
    path.write_text(USER_FILE)
    with pytest.warns(mlo.CheckWarning):
        assert main(["check", f"{path}:build", "--rounds", "2", "--warn-above", "1e-9"]) == 0
    out = capsys.readouterr().out
    assert "mlo check: hypergradient of 'h'" in out and "h -> w" in out and "cg:iterations=1" in out
    assert "converged" in out
    # several references, one table each, on the same state
    assert main(["check", f"{path}:build", "--reference", "cg:tol=1e-12", "--reference", "unroll:steps=3", "--warn-above", "inf"]) == 0
    out = capsys.readouterr().out
    assert "against cg:tol=1e-12 (float64)" in out and "against unroll:steps=3 (float64)" in out

    for target, match in [
        (f"{path}:not_an_engine", "returned int, not an mlo.Engine"),
        (f"{path}:nope", "defines no function 'nope'"),
        (f"{tmp_path / 'missing.py'}:build", "is not a file"),
    ]:
        assert main(["check", target]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("mlo check: error: ") and match in err[0], err
    with pytest.raises(SystemExit) as exit:  # argparse: options the target does not take
        main(["check", f"{path}:build", "--set", "lam=1"])
    assert exit.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"mlo check: error: unrecognized arguments: --set lam=1 (see mlo check {path}:build --help)"
    ]
    assert main(["check", "nonesuch"]) == 2
    err = capsys.readouterr().err
    assert "mlo check: error: unknown program 'nonesuch'; programs: " in err and "lfm-cw" in err


def test_the_command_refuses_a_bad_lfm_cw_config_in_one_line(capsys):
    from mlo.cli import main

    assert main(["check", "lfm-cw", "--set", "dataset=mnist"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mlo check: error: unknown dataset 'mnist'; known: digits, ")


def test_a_loss_that_cannot_run_in_float64_gets_the_reference_in_its_own_dtype_with_a_note():
    """The ridge losses read their data from a closure (float32, no level's batch): the float64
    reference cannot run them, so it is computed in float32 and the report says which level's
    loss failed; the module `mlo.checking` holds the function `mlo.check`, which it does not shadow."""
    import importlib

    r = ridge()
    assert r.data.X.dtype == torch.float32
    engine = r.engine("cg:iterations=20")
    engine.run(1)
    report = mlo.check(engine, "h", warn_above=float("inf"))
    assert report.dtype == torch.float32 and report.reference_hypergradient[0].dtype == torch.float32
    assert len(report.notes) == 1 and "level 'h'" in report.notes[0] and "program's dtype" in report.notes[0]
    own = engine.hypergradient("h", estimator=mlo.checking.DEFAULT_REFERENCE)
    assert relative_error(report.reference_hypergradient, own) < 1e-5
    assert importlib.import_module("mlo.checking").check is mlo.check and callable(mlo.check)
