"""Bad inputs get a clear error naming the culprit, raised when the Engine is built, before any
step; failures during a run name the level and the round."""

from __future__ import annotations

import re
import warnings

import pytest
import torch
from torch import nn

import mlo
from mlo.problems.ridge import Vector

from .helpers import assert_same, ridge, snapshot

pytestmark = pytest.mark.usefixtures("one_thread")


#: losses evaluated by levels made with `_level`
LOSS_CALLS: list[str] = []


def _level(name, dim=2, fn=None, optimizer=None, of_module=None, **kw):
    """A level on a vector of ones; its loss ``fn(batch)``, or ``of_module(module)``, or |x|^2."""
    module = Vector(torch.ones(dim))
    opt = optimizer(module) if optimizer else torch.optim.SGD(module.parameters(), lr=0.1)
    if fn is None:
        fn = (lambda batch: of_module(module)) if of_module else (lambda batch: (module.value**2).sum())

    def loss(batch):
        LOSS_CALLS.append(name)
        return fn(batch)

    return mlo.Problem(name, module, opt, loss=loss, **kw)


def _refused(problems, graph, estimator="cg", error=mlo.ProgramError, match=""):
    """Building the engine raises ``error`` matching ``match``; no loss was evaluated and no
    parameter moved."""
    before = snapshot(*problems)
    LOSS_CALLS.clear()
    with pytest.raises(error, match=match) as info:
        mlo.Engine(problems, graph, estimator)
    assert LOSS_CALLS == []
    assert_same(before, snapshot(*problems))
    return info


# ---------------------------------------------------------------------------------------------- the graph


def test_unknown_upper_level():
    a, b = _level("a"), _level("b")
    _refused([a, b], {"c": ["b"]}, error=mlo.GraphError, match=r"unknown level 'c'.*known levels: \['a', 'b'\]")


def test_unknown_lower_level():
    a, b = _level("a"), _level("b")
    _refused([a, b], {"a": ["b", "x"]}, error=mlo.GraphError, match=r"graph\['a'\] names unknown level 'x'")


@pytest.mark.parametrize(
    "graph,cycle",
    [
        ({"a": ["b"], "b": ["a"]}, "a -> b -> a"),
        ({"a": ["a"]}, "a -> a"),
        ({"a": ["b"], "b": ["c"], "c": ["a"]}, "a -> b -> c -> a"),
        ({"c": ["a"], "a": ["b"], "b": ["c"]}, "a -> b -> c -> a"),
    ],
)
def test_cycle_is_printed(graph, cycle):
    levels = [_level(n) for n in "abc"]
    _refused(levels, graph, error=mlo.GraphError, match="cycle: " + cycle.replace(" ", r"\s"))


def test_cycle_below_an_acyclic_part():
    levels = [_level(n) for n in "abcd"]
    _refused(levels, {"a": ["b"], "b": ["c"], "c": ["d"], "d": ["b"]}, error=mlo.GraphError, match="cycle: b -> c -> d -> b")


def test_same_name_twice():
    a1, a2, b = _level("a"), _level("a"), _level("b")
    _refused([a1, b, a2], {"b": ["a"]}, error=mlo.GraphError, match="level 'a' is listed twice")


def test_same_object_twice():
    a, b = _level("a"), _level("b")
    _refused([a, b, a], {"b": ["a"]}, error=mlo.ProgramError, match="level 'a' is listed twice")


def test_lower_listed_twice_under_one_upper():
    a, b = _level("a"), _level("b")
    _refused([a, b], {"a": ["b", "b"]}, error=mlo.GraphError, match=r"graph\['a'\] lists a lower level twice")


def test_graph_entry_that_is_a_string():
    a, b = _level("a"), _level("b")
    _refused([a, b], {"a": "b"}, error=mlo.GraphError, match=r"graph\['a'\] must be a list")


# ---------------------------------------------------------------------------------------------- the levels


def test_upper_level_without_trainable_parameters():
    frozen = nn.Linear(2, 1)
    frozen.requires_grad_(False)
    upper = mlo.Problem("hyper", frozen, torch.optim.SGD(frozen.parameters(), lr=0.1), loss=lambda batch: frozen.weight.sum())
    lower = _level("weights")
    _refused([lower, upper], {"hyper": ["weights"]}, match="level 'hyper' is an upper level with no trainable parameters")


def test_problem_without_loss_is_rejected_at_class_definition():
    with pytest.raises(TypeError, match=r"NoLoss does not define `loss"):

        class NoLoss(mlo.Problem):
            pass

    class Base(mlo.Problem, abstract=True):
        pass

    with pytest.raises(TypeError, match="Base is abstract"):
        m = nn.Linear(1, 1)
        Base("b", m, torch.optim.SGD(m.parameters(), lr=0.1))


def test_optimizer_that_does_not_own_the_parameters():
    other = nn.Linear(2, 2)
    lower = _level("weights", optimizer=lambda module: torch.optim.SGD(other.parameters(), lr=0.1))
    upper = _level("hyper")
    _refused(
        [lower, upper], {"hyper": ["weights"]}, match=r"level 'weights': its optimizer does not own parameter\(s\) \['parts.0'\]"
    )


def test_optimizer_that_owns_only_some_parameters():
    module = nn.Linear(2, 2)
    lower = mlo.Problem("weights", module, torch.optim.SGD([module.weight], lr=0.1), loss=lambda batch: module.weight.sum())
    upper = _level("hyper")
    _refused([lower, upper], {"hyper": ["weights"]}, match=r"level 'weights'.*does not own parameter\(s\) \['bias'\]")


def test_parameter_shared_by_two_levels():
    shared = Vector(torch.ones(2))
    a = mlo.Problem("a", shared, torch.optim.SGD(shared.parameters(), lr=0.1), loss=lambda batch: shared.value.sum())
    b = mlo.Problem("b", shared, torch.optim.SGD(shared.parameters(), lr=0.1), loss=lambda batch: shared.value.sum())
    _refused([a, b], {"a": ["b"]}, match="level 'b' also belongs to level 'a'")


# ---------------------------------------------------------------------------------------------- estimators


def test_unknown_estimator_lists_the_known_ones():
    lower, upper = _level("w"), _level("h")
    info = _refused([lower, upper], {"h": ["w"]}, estimator="conjugate", error=mlo.EstimatorError, match="'conjugate'")
    for name in mlo.estimators.names():
        assert name in str(info.value)


@pytest.mark.parametrize(
    "spec,match",
    [
        ("cg:iterations=abc", "option 'iterations' must be int"),
        ("cg:iterations=2.5", "option 'iterations' must be int"),
        ("cg:iterations=0", "option 'iterations' must be >= 1"),
        ("neumann:alpha=-0.1", "option 'alpha' must be > 0"),
        ("finite_difference:radius=0", "option 'radius' must be > 0"),
        ("unroll:steps=0", "option 'steps' must be >= 1"),
        ("cg:iterations", "bad option 'iterations'"),
    ],
)
def test_estimator_option_of_wrong_type_or_range(spec, match):
    lower, upper = _level("w"), _level("h")
    _refused([lower, upper], {"h": ["w"]}, estimator=spec, error=mlo.EstimatorError, match=match)


def test_estimator_that_is_neither_name_nor_estimator():
    lower, upper = _level("w"), _level("h")
    _refused([lower, upper], {"h": ["w"]}, estimator=3, error=mlo.EstimatorError, match="must be a name or an Estimator")


def test_estimator_mapping_missing_an_edge():
    w1, w2, upper = _level("w1"), _level("w2"), _level("h")
    _refused(
        [w1, w2, upper], {"h": ["w1", "w2"]}, estimator={("h", "w1"): "cg"}, error=mlo.EstimatorError,
        match=r"no estimator for edge\(s\) \[\('h', 'w2'\)\]",
    )


def test_estimator_mapping_naming_an_unknown_edge():
    lower, upper = _level("w"), _level("h")
    _refused(
        [lower, upper], {"h": ["w"]}, estimator={("h", "w"): "cg", ("w", "h"): "cg"}, error=mlo.EstimatorError,
        match=r"edge\(s\) \[\('w', 'h'\)\] not in the graph",
    )


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda p: torch.optim.RMSprop(p, lr=0.1), "RMSprop has no differentiable update rule"),
        (lambda p: torch.optim.Adagrad(p, lr=0.1), "Adagrad has no differentiable update rule"),
        (lambda p: torch.optim.Adam(p, lr=0.1, amsgrad=True), "Adam with amsgrad=True"),
    ],
)
def test_unroll_on_an_unsupported_optimizer(make, match):
    lower = _level("weights", optimizer=lambda module: make(module.parameters()))
    upper = _level("hyper")
    _refused(
        [lower, upper], {"hyper": ["weights"]}, estimator="unroll:steps=2", error=mlo.EstimatorError,
        match=f"estimator 'unroll' cannot serve level 'weights': {match}",
    )
    # the same program is fine with an estimator that does not unroll
    mlo.Engine([lower, upper], {"hyper": ["weights"]}, "cg")


# ---------------------------------------------------------------------------------------------- during a run


def test_non_finite_loss_names_level_and_round():
    batches = [torch.tensor(1.0), torch.tensor(2.0), torch.tensor(float("nan"))]
    m = Vector(torch.ones(2))
    lower = mlo.Problem("weights", m, torch.optim.SGD(m.parameters(), lr=0.1), batches, loss=lambda batch: batch * (m.value**2).sum())
    upper = _level("hyper")
    engine = mlo.Engine([lower, upper], {"hyper": ["weights"]}, "cg")
    engine.run(2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the report itself raises no warning
        with pytest.raises(mlo.NonFiniteError, match=r"level 'weights': loss is not finite = nan at round 2"):
            engine.run(1)


def test_non_finite_hypergradient_names_level_and_round():
    # Round 1's batch makes the upper loss |0 * h|^(1/2): finite, with a NaN gradient.
    r = ridge()
    hm = r.outer.module
    r.outer = mlo.Problem(
        "h", hm, r.outer.optimizer, [torch.tensor(1.0), torch.tensor(0.0)],
        loss=lambda batch: r.outer_fn(r.inner.module.value, hm.value) + (batch * hm.value).abs().sqrt().sum(),
    )
    engine = mlo.Engine([r.inner, r.outer], {"h": ["w"]}, "cg")
    engine.run(1)
    before = snapshot(r.inner, r.outer)
    with pytest.raises(mlo.NonFiniteError, match=r"level 'h': hypergradient is not finite at round 1"):
        engine.run(1)
    # the lower level stepped this round, the upper level did not take the bad step
    after = snapshot(r.inner, r.outer)
    assert torch.equal(before["h.param.parts.0"], after["h.param.parts.0"])


def test_non_finite_checks_can_be_turned_off():
    batches = [torch.tensor(float("nan"))]
    m = Vector(torch.ones(2))
    lower = mlo.Problem("weights", m, torch.optim.SGD(m.parameters(), lr=0.1), batches, loss=lambda batch: batch * (m.value**2).sum())
    engine = mlo.Engine([lower, _level("hyper")], {"hyper": ["weights"]}, "cg", check_finite=False)
    engine.run(1)
    assert torch.isnan(lower.module.value).all()


def test_neumann_with_too_large_alpha_diverges(float64):
    r = ridge()
    r.set_w(r.optimum())
    top = float(torch.linalg.eigvalsh(r.hessian())[-1])
    engine = r.engine(mlo.estimators.Neumann(iterations=50, alpha=3.0 / top))
    with pytest.raises(mlo.DivergenceError, match=r"neumann on edge 'h' -> 'w': term \d+ .* diverges.*alpha"):
        engine.hypergradient("h")
    with pytest.raises(mlo.DivergenceError):
        engine.run(1)
    # just below the bound it converges
    ok = r.engine(mlo.estimators.Neumann(iterations=50, alpha=1.9 / top)).hypergradient("h")[0]
    assert torch.isfinite(ok).all()


# ---------------------------------------------------------------------------------------------- losses


@pytest.mark.parametrize(
    "value,match",
    [
        (lambda m: m.value * 2, r"got a tensor of shape \(2,\): reduce it to a scalar"),
        (lambda m: None, r"got None"),
        (lambda m: 0.5, r"got a Python float \(0.5\), which carries no gradient"),
        (lambda m: 3, r"got a Python int"),
        (lambda m: (m.value**2).sum().long(), r"dtype torch.int64"),
        (lambda m: [(m.value**2).sum()], r"got list"),
    ],
    ids=["non-scalar", "None", "float", "int", "integer-tensor", "list"],
)
@pytest.mark.parametrize("where", ["lower", "upper"])
def test_a_loss_that_is_not_a_scalar_tensor_names_the_level(value, match, where):
    lower = _level("weights", of_module=value if where == "lower" else None)
    upper = _level("hyper", of_module=value if where == "upper" else None)
    bad = lower if where == "lower" else upper
    engine = mlo.Engine([lower, upper], {"hyper": ["weights"]}, "cg")
    before = snapshot(lower, upper)
    with pytest.raises(mlo.LossError, match=f"level '{bad.name}': loss must return a scalar floating-point tensor, .*{match}"):
        engine.run(1)
    if where == "lower":  # it failed at the first step: nothing moved
        assert_same(before, snapshot(lower, upper))
    with pytest.raises(TypeError):  # LossError is a TypeError (and an mlo.ProgramError)
        engine.hypergradient("hyper")


def test_a_one_element_loss_of_shape_1_is_accepted():
    lower, upper = _level("weights", of_module=lambda m: (m.value**2).sum().reshape(1)), _level("hyper")
    mlo.Engine([lower, upper], {"hyper": ["weights"]}, "cg").run(1)


# ---------------------------------------------------------------------------------------------- data


def test_a_data_loader_with_no_batch_is_refused_when_the_engine_is_built():
    from torch.utils.data import DataLoader, TensorDataset

    loader = DataLoader(TensorDataset(torch.ones(3, 2)), batch_size=4, drop_last=True)  # 3 < 4: no batch
    lower, upper = _level("weights", data=loader), _level("hyper")
    _refused([lower, upper], {"hyper": ["weights"]}, match=r"level 'weights': its data \(DataLoader\) holds no batch")


def test_a_string_as_data_is_refused():
    lower, upper = _level("weights", data="train.csv"), _level("hyper")
    _refused([lower, upper], {"hyper": ["weights"]}, match="level 'weights': data must be an iterable of batches, got a str")


# ---------------------------------------------------------------------------------------------- level names


@pytest.mark.parametrize(
    "call",
    [
        lambda e: e.step("nope"),
        lambda e: e.hypergradient("nope"),
        lambda e: e.graph.descendants("nope"),
        lambda e: mlo.check(e, "nope"),
    ],
    ids=["step", "hypergradient", "descendants", "check"],
)
def test_every_method_taking_a_level_name_lists_the_levels(call):
    lower, upper = _level("weights"), _level("hyper")
    engine = mlo.Engine([lower, upper], {"hyper": ["weights"]}, "cg")
    before = snapshot(lower, upper)
    LOSS_CALLS.clear()
    with pytest.raises(mlo.UnknownLevelError, match=r"^unknown level 'nope'; levels: \['weights', 'hyper'\]$"):
        call(engine)
    with pytest.raises(KeyError):  # and it is a KeyError, as a lookup by name should be
        call(engine)
    assert_same(before, snapshot(lower, upper))
    assert LOSS_CALLS == []


# ---------------------------------------------------------------------------------------------- hooks under look-ahead


class _Losses(mlo.Hook):
    def __init__(self):
        self.seen = {}

    def on_step(self, engine, level, loss):
        self.seen[level] = float(loss)


@pytest.mark.parametrize("estimator", ["unroll:steps=1", "finite_difference", "cg"])
def test_hooks_see_the_upper_loss_where_its_hypergradient_is_evaluated(float64, estimator):
    # Documented in Hook.on_step and Engine.step: under a look-ahead estimator the upper loss is
    # the one at the lower level's look-ahead parameters, not at its current ones.
    r = ridge()
    hook = _Losses()
    engine = mlo.Engine([r.inner, r.outer], {"h": ["w"]}, estimator, hooks=[hook])
    engine.step("w")
    w, h = r.w(), r.h()
    lr = r.inner.optimizer.param_groups[0]["lr"]
    w_var = w.clone().requires_grad_()
    (g,) = torch.autograd.grad(r.inner_fn(w_var, h), w_var)
    ahead = w - lr * g
    engine.step("h")
    at_current, at_lookahead = float(r.outer_fn(w, h)), float(r.outer_fn(ahead, h))
    want = at_current if estimator == "cg" else at_lookahead
    assert hook.seen["h"] == pytest.approx(want, rel=1e-12)
    assert abs(at_current - at_lookahead) > 1e-6  # the two differ: the test can tell them apart


# ---------------------------------------------------------------------------------------------- the command line


@pytest.mark.parametrize(
    "argv,match",
    [
        (["run", "lfm-cw", "--dataset", "mnist"], "unknown dataset 'mnist'; known: digits"),
        (["run", "--set", "lam=big"], "option 'lam' must be float"),
        (["run", "--set", "lamda=1"], "unknown option 'lamda'"),
        (["run", "--estimator", "newton"], "unknown estimator 'newton'"),
        (["run", "--estimator", "neumann:alpha=fast"], "option 'alpha' must be > 0 or 'auto'"),
        (["run", "--space", "nas"], "space must be one of"),
        (["run", "nonesuch"], r"unknown program 'nonesuch'; programs: .*lfm-cw"),
        (["run", "lfm-cw", "--methods", "nonesuch"], r"unknown method\(s\) \['nonesuch'\]"),
        (["run", "--config", "/nonexistent.toml"], "does not exist"),
        (["run", "--rounds", "abc"], "argument --rounds: invalid int value: 'abc'"),
        (["run", "--rounds", "0"], "search_rounds must be >= 1"),
    ],
)
def test_every_config_error_exits_2_with_one_line(argv, match, capsys, tmp_path):
    from mlo.cli import main

    try:
        code = main([*argv, "--out", str(tmp_path / "o")])
    except SystemExit as exit:  # argparse's own errors
        code = exit.code
    captured = capsys.readouterr()
    assert code == 2
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mlo run: error: "), captured.err
    assert re.search(match, lines[0]), lines[0]
    assert "Traceback" not in captured.err and captured.out == ""
    assert not (tmp_path / "o").exists()  # nothing started


def test_every_deliberate_error_is_an_mlo_error():
    """Configs, data directories and genotypes raise subclasses of `mlo.MLOError`, so one
    ``except mlo.MLOError`` catches every error mlo raises on purpose."""
    from mlo.config import ConfigError
    from mlo.problems.darts.genotype import Genotype, GenotypeError
    from mlo.problems.data import DataError, load

    assert ConfigError is mlo.ConfigError and DataError is mlo.DataError and GenotypeError is mlo.GenotypeError
    with pytest.raises(mlo.MLOError, match="mistakes_weight"):
        from mlo.problems.lfm_cw.config import RunConfig

        RunConfig().updated({"mistakes_weight": 1})
    with pytest.raises(mlo.MLOError):
        Genotype.from_json('{"normal": "nonsense"}')
    with pytest.raises(mlo.MLOError):
        load("cifar10", root="/nonexistent/folder")
    # and each keeps the built-in base that callers may already catch
    assert issubclass(ConfigError, ValueError) and issubclass(GenotypeError, ValueError)
    assert issubclass(DataError, FileNotFoundError)


def test_range_checks_of_every_program_config_share_one_mechanism():
    """`mlo.config.at_least` is the range check of every program's config: the first option out
    of range is named with its bound and value."""
    from mlo.config import at_least
    from mlo.problems import hpo, ignoring, maml, reweighting

    configs = ((hpo.HPOConfig, "rounds"), (maml.MAMLConfig, "shots"), (reweighting.ReweightingConfig, "hidden"),
               (ignoring.IgnoringConfig, "target_val"))
    for cls, name in configs:
        cls().validate()  # the defaults are in range
        with pytest.raises(mlo.ConfigError, match=rf"^{name} must be >= 1, got 0$"):
            cls(**{name: 0}).validate()

    class Plain:
        a, b = 3, -1

    at_least(Plain(), 0, ("a",))
    with pytest.raises(mlo.ConfigError, match=r"^b must be >= 0, got -1$"):
        at_least(Plain(), 0, ("a", "b"))
