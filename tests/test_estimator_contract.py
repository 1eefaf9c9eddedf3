"""The contract every registered estimator keeps, and the registry's API.

Parametrized over ``mlo.estimators.names()``: a newly registered estimator joins these tests by
being registered, with its default options. Options are checked by introspecting each
estimator's dataclass fields, not from a hand-kept list.
"""

from __future__ import annotations

import dataclasses
import math
import typing
import warnings

import pytest
import torch

import mlo
from mlo import estimators

from .helpers import assert_same, mlp_program, snapshot

pytestmark = pytest.mark.usefixtures("float64", "one_thread")

NAMES = estimators.names()


def _fields(name):
    """(option, type, default) per option; for a union such as ``float | str`` (a number or a
    keyword like ``"auto"``) the type is its first member, which the generic checks exercise;
    an option with named values keeps its ``Literal[...]`` annotation."""
    cls = type(estimators.get(name))
    hints = typing.get_type_hints(cls)
    return [(f.name, _kind(hints[f.name]), f.default) for f in dataclasses.fields(cls)]


def _kind(annotation):
    if typing.get_origin(annotation) is typing.Literal:
        return annotation
    return (typing.get_args(annotation) or (annotation,))[0]


FIELDS = [(name, field, kind, default) for name in NAMES for field, kind, default in _fields(name)]
FIELD_IDS = [f"{name}.{field}" for name, field, _, _ in FIELDS]


@pytest.fixture(params=NAMES)
def program(request):
    """The bilevel MLP program (BatchNorm in train mode, an unused parameter in each level) with
    the estimator ``request.param`` at its default options; every level has drawn a batch."""
    prog = mlp_program(batches=3)
    prog.engine_ = prog.engine(estimators.get(request.param))
    return prog


# ---------------------------------------------------------------------------------------------- the contract


def test_shapes_dtypes_and_finiteness(program):
    grads = program.engine_.hypergradient("upper")
    params = list(program.upper.module.parameters())
    assert len(grads) == len(params)
    for g, p in zip(grads, params):
        assert g.shape == p.shape and g.dtype == p.dtype == torch.float64 and g.device == p.device
        assert torch.isfinite(g).all()
        assert not g.requires_grad
    # some of it is not zero (the loss depends on the upper parameters)
    assert any(g.abs().max() > 0 for g in grads)


@pytest.mark.parametrize("name", NAMES)
def test_double_backward_says_whether_the_estimator_differentiates_a_backward_again(name):
    """``double_backward`` is False exactly where the hypergradient runs through a lower model
    whose backward cannot be differentiated again (`OnceTanh`, as a ``torch.compile``-d module),
    and equals the hypergradient of the same model with an ordinary ``tanh``."""
    est = estimators.get(name)
    once = mlp_program(batches=2, once_differentiable=True).engine(est)
    if est.double_backward:
        with pytest.raises(RuntimeError, match="double backward"):
            once.hypergradient("upper")
        return
    plain = mlp_program(batches=2).engine(est)
    for level in ("lower", "upper"):  # rounds first: sama reads the lower level's last step
        once.step(level)
        plain.step(level)
    for a, b in zip(once.hypergradient("upper"), plain.hypergradient("upper"), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_hypergradient_changes_nothing(program):
    lower, upper = program.lower, program.upper
    assert lower.module.training and lower.module.norm.training
    engine = program.engine_
    engine.step("lower")  # optimizer state (momentum) and BatchNorm statistics exist
    engine.step("upper")
    before = snapshot(lower, upper)
    engine.hypergradient("upper")
    assert_same(before, snapshot(lower, upper))


def test_hypergradient_is_deterministic(program):
    first = program.engine_.hypergradient("upper")
    second = program.engine_.hypergradient("upper")
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_unused_parameter_gets_zero(program):
    grads = dict(zip((n for n, _ in program.upper.module.named_parameters()), program.engine_.hypergradient("upper")))
    assert torch.equal(grads["unused"], torch.zeros(3))
    assert grads["scale"].abs().max() > 0


def test_run_moves_upper_parameters_and_lower_batchnorm_statistics(program):
    upper_before = {n: p.detach().clone() for n, p in program.upper.module.named_parameters()}
    norm = program.lower.module.norm
    mean_before, var_before = norm.running_mean.clone(), norm.running_var.clone()
    program.engine_.run(2)
    after = dict(program.upper.module.named_parameters())
    assert not torch.equal(after["scale"], upper_before["scale"])  # used directly and through the lower
    assert torch.equal(after["unused"], upper_before["unused"])
    assert torch.isfinite(torch.cat([p.reshape(-1) for p in program.upper.module.parameters()])).all()
    # the lower level's two real steps moved its statistics, estimator evaluations did not
    assert not torch.equal(norm.running_mean, mean_before)
    assert not torch.equal(norm.running_var, var_before)
    assert int(norm.num_batches_tracked) == 2


# ---------------------------------------------------------------------------------------------- registry


def test_a_non_finite_adjoint_is_reported_as_the_levels_not_an_estimators_error(program):
    """A NaN in the upper level's batch makes the adjoint NaN. Whoever tests it (the rule, or an
    estimator that reads the adjoint's norm anyway: ``guards_non_finite``), the estimator neither
    raises (no DivergenceError from a series) nor warns (no ConvergenceWarning from CG): the
    result is not finite, and the engine's NonFiniteError names the level and the round."""
    engine = program.engine_
    x, y = program.val[0]
    bad = (x, torch.cat([y[:-1], torch.tensor([math.nan], dtype=y.dtype)]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(mlo.NonFiniteError, match=r"level 'upper'.*round 0"):
            engine.hypergradient("upper", batches={"upper": bad})
    est = engine.estimators[("upper", "lower")]
    if est.uses_adjoint and not est.attached:  # the rule handed the adjoint to this edge's vjp
        assert engine.diagnostics.by_edge[("upper", "lower")]["finite_adjoint"] == 0.0


def test_names_are_sorted_and_include_the_core_estimators():
    assert NAMES == sorted(NAMES)
    assert {"cg", "finite_difference", "first_order", "neumann", "unroll"} <= set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_get_builds_the_registered_class_with_defaults(name):
    est = estimators.get(name)
    assert isinstance(est, estimators.Estimator)
    assert est.name == name
    assert est.options() == {field: default for field, _, default in _fields(name)}
    assert estimators.resolve(name) == est
    assert estimators.resolve(est) is est
    assert estimators.parse(name) == est


@pytest.mark.parametrize("name,field,kind,default", FIELDS, ids=FIELD_IDS)
def test_each_option_round_trips_through_get_and_parse(name, field, kind, default):
    value = _another_valid(kind, default)
    est = estimators.get(name, **{field: value})
    assert getattr(est, field) == value and type(getattr(est, field)) is type(value)
    assert estimators.parse(f"{name}:{field}={value}") == est
    assert estimators.parse(f" {name} : {field} = {value} ".replace(" : ", ":")) == est


def test_parse_reads_several_options():
    assert estimators.parse("cg:iterations=5") == estimators.get("cg", iterations=5)
    assert estimators.parse("cg:iterations=5,damping=0.1") == estimators.get("cg", iterations=5, damping=0.1)
    assert estimators.get("cg", iterations=5).iterations == 5


@pytest.mark.parametrize("how", ["get", "parse", "resolve"])
def test_unknown_name_lists_the_known_ones(how):
    call = {"get": estimators.get, "parse": estimators.parse, "resolve": estimators.resolve}[how]
    with pytest.raises(mlo.EstimatorError, match="'nonesuch'") as info:
        call("nonesuch")
    for name in NAMES:
        assert name in str(info.value)


@pytest.mark.parametrize("name", NAMES)
def test_unknown_option_is_named(name):
    with pytest.raises(mlo.EstimatorError, match="'bogus'"):
        estimators.get(name, bogus=1)
    with pytest.raises(mlo.EstimatorError, match="bogus"):
        estimators.parse(f"{name}:bogus=1")


@pytest.mark.parametrize("name,field,kind,default", FIELDS, ids=FIELD_IDS)
def test_wrong_option_type_names_the_option(name, field, kind, default):
    for wrong in _wrong_types(kind):
        with pytest.raises(mlo.EstimatorError, match=f"option '{field}'"):
            estimators.get(name, **{field: wrong})
    if typing.get_origin(kind) is typing.Literal:
        with pytest.raises(mlo.EstimatorError, match=f"option '{field}'"):
            estimators.parse(f"{name}:{field}=nonesuch")
    if kind in (int, float):
        with pytest.raises(mlo.EstimatorError, match=f"option '{field}'"):
            estimators.parse(f"{name}:{field}=abc")


@pytest.mark.parametrize("name,field,kind,default", FIELDS, ids=FIELD_IDS)
def test_out_of_range_option_names_the_option(name, field, kind, default):
    # The contract: numeric options are counts, sizes or tolerances, none of them negative;
    # a float option is never NaN.
    bad = [-1] if kind is int else [-1.0, math.nan] if kind is float else []
    for value in bad:
        with pytest.raises(mlo.EstimatorError, match=f"option '{field}'"):
            estimators.get(name, **{field: value})
        with pytest.raises(mlo.EstimatorError, match=f"option '{field}'"):
            estimators.parse(f"{name}:{field}={value}")


def test_estimators_are_immutable_values():
    est = estimators.get("cg")
    with pytest.raises(dataclasses.FrozenInstanceError):
        est.iterations = 3  # type: ignore[misc]
    assert estimators.get("cg", iterations=3) == estimators.get("cg", iterations=3)
    assert hash(estimators.get("cg", iterations=3)) == hash(estimators.get("cg", iterations=3))


def test_registering_a_name_twice_is_refused():
    @dataclasses.dataclass(frozen=True)
    class Impostor(estimators.Estimator):
        name: typing.ClassVar[str] = "cg"

        def vjp(self, hop, adjoint, lookahead):
            raise AssertionError

    with pytest.raises(mlo.EstimatorError, match="'cg' is already registered"):
        estimators.register(Impostor)
    assert type(estimators.get("cg")) is estimators.CG


def _another_valid(kind, default):
    choices = typing.get_args(kind) if typing.get_origin(kind) is typing.Literal else ()
    if choices:  # an option with named values (Literal["a", "b"]): another one of them
        return next(c for c in choices if c != default)
    if kind is bool:
        return not default
    if kind is int:
        return default + 2
    if kind is float:
        return default * 1.5 + 0.25
    raise AssertionError(f"no test value for option type {kind}")


def _wrong_types(kind):
    if typing.get_origin(kind) is typing.Literal:
        return ["nonesuch", "", 1, None]
    if kind is int:
        return ["3", 2.5, True, None]
    if kind is float:
        return ["0.1", True, None]
    if kind is bool:
        return ["yes", 1, None]
    raise AssertionError(f"no wrong values for option type {kind}")
