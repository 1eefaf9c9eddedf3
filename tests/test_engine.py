"""The engine's schedule, data, schedulers, state and closures."""

from __future__ import annotations

import io
import itertools

import pytest
import torch
from torch import nn

import mlo
from mlo.estimators import FiniteDifference
from mlo.problems.ridge import Vector

from .helpers import (
    Vector,
    assert_same,
    finite_difference_reference,
    flat,
    mlp_program,
    quadratic,
    relative_error,
    ridge,
    snapshot,
)

pytestmark = pytest.mark.usefixtures("one_thread")


class Recorder(mlo.Hook):
    def __init__(self):
        self.steps = []
        self.rounds = []

    def on_step(self, engine, level, loss):
        assert isinstance(loss, torch.Tensor) and not loss.requires_grad
        self.steps.append((engine.round, level))

    def on_round(self, engine):
        self.rounds.append(engine.round)


def _chain(steps):
    q = quadratic(
        {"A": 2, "B": 2, "C": 2},
        {"A": ("A", "B"), "B": ("A", "B", "C"), "C": ("B", "C")},
        {"A": ["B"], "B": ["C"]},
    )
    for name, k in steps.items():
        q.problems[name].steps = k
    return q


# ---------------------------------------------------------------------------------------------- schedule


def test_run_is_bottom_up_and_respects_steps():
    q = _chain({"A": 1, "B": 3, "C": 2})
    hook = Recorder()
    engine = mlo.Engine([q.problems[n] for n in "ABC"], q.graph, "cg", hooks=[hook])  # listed top-down
    engine.run(2)
    one_round = ["C", "C", "B", "B", "B", "A"]
    assert hook.steps == [(0, n) for n in one_round] + [(1, n) for n in one_round]
    assert hook.rounds == [1, 2]
    assert engine.round == 2


def test_dag_order_puts_every_lower_before_its_uppers():
    q = quadratic(
        {"U": 1, "L1": 1, "L2": 1, "M": 1},
        {"U": ("U", "L1", "L2"), "L1": ("U", "L1", "M"), "L2": ("U", "L2", "M"), "M": ("L1", "L2", "M")},
        {"U": ["L1", "L2"], "L1": ["M"], "L2": ["M"]},
    )
    hook = Recorder()
    engine = mlo.Engine([q.problems[n] for n in ("U", "L2", "L1", "M")], q.graph, "cg", hooks=[hook])
    engine.run(1)
    order = [level for _, level in hook.steps]
    assert sorted(order) == ["L1", "L2", "M", "U"]
    for upper, lowers in q.graph.items():
        for low in lowers:
            assert order.index(low) < order.index(upper)


def test_step_returns_the_loss_it_stepped_on():
    module = Vector(torch.tensor([3.0, -4.0]))
    level = mlo.Problem("x", module, torch.optim.SGD(module.parameters(), lr=0.1), loss=lambda batch: 0.5 * (module.value**2).sum())
    engine = mlo.Engine([level])
    loss = engine.step("x")
    assert float(loss) == 12.5
    assert torch.allclose(module.value.detach(), torch.tensor([2.7, -3.6]))


def test_run_rejects_a_bad_round_count():
    q = _chain({})
    engine = q.engine()
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="rounds must be an int >= 0"):
            engine.run(bad)
    with pytest.raises(KeyError, match="unknown level 'Z'"):
        engine.hypergradient("Z")


# ---------------------------------------------------------------------------------------------- data


class Countdown:
    """A re-iterable data source that counts how often it was restarted."""

    def __init__(self, items):
        self.items = items
        self.started = 0

    def __iter__(self):
        self.started += 1
        return iter(self.items)


def _recording_level(name, data, seen, steps=1):
    module = Vector(torch.ones(2))

    def loss(batch):
        seen.append(batch)
        return (module.value**2).sum()

    return mlo.Problem(name, module, torch.optim.SGD(module.parameters(), lr=0.1), loss=loss, data=data, steps=steps)


def test_data_restarts_when_exhausted():
    seen = []
    data = Countdown(["a", "b", "c"])
    engine = mlo.Engine([_recording_level("x", data, seen, steps=2)])
    engine.run(4)
    assert seen == ["a", "b", "c", "a", "b", "c", "a", "b"]
    assert data.started == 3


def test_no_data_gives_batch_none():
    seen = []
    engine = mlo.Engine([_recording_level("x", None, seen)])
    engine.run(3)
    assert seen == [None, None, None]


def test_empty_data_is_reported():
    # seen when the Engine is built, when the data has a length
    with pytest.raises(mlo.ProgramError, match=r"level 'x': its data \(list\) holds no batch"):
        mlo.Engine([_recording_level("x", [], [])])

    # an iterable without a length can only be found empty by drawing from it
    class Nothing:
        def __iter__(self):
            return iter(())

    engine = mlo.Engine([_recording_level("x", Nothing(), [])])
    with pytest.raises(ValueError, match="level 'x': its data yielded no batch"):
        engine.run(1)


def test_an_exhausted_iterator_is_reported_as_such():
    seen = []
    engine = mlo.Engine([_recording_level("x", iter(["a", "b"]), seen)])
    engine.run(2)
    with pytest.raises(ValueError, match="level 'x': its data is an exhausted iterator, which cannot be restarted"):
        engine.run(1)
    assert seen == ["a", "b"]
    # an endless iterator is fine
    endless = mlo.Engine([_recording_level("y", itertools.cycle([1, 2]), seen)])
    endless.run(5)
    assert seen[2:] == [1, 2, 1, 2, 1]


def test_each_level_draws_its_own_data_and_lowers_see_their_current_batch():
    lower_seen, upper_seen = [], []
    lower = _recording_level("w", Countdown([1, 2, 3]), lower_seen, steps=2)
    upper_module = Vector(torch.ones(1))

    def upper_loss(batch):
        upper_seen.append(batch)
        return (upper_module.value * lower.module.value.sum()).sum()

    upper = mlo.Problem("h", upper_module, torch.optim.SGD(upper_module.parameters(), lr=0.1), loss=upper_loss, data=["u1", "u2"])
    mlo.Engine([lower, upper], {"h": ["w"]}, "first_order").run(2)
    # first_order evaluates no lower loss: each loss saw exactly the batches of its own steps
    assert lower_seen == [1, 2, 3, 1]
    assert upper_seen == ["u1", "u2"]


@pytest.mark.parametrize("estimator", ["cg", "finite_difference", "unroll:steps=2"])
def test_estimators_evaluate_the_lower_loss_on_its_current_batch(estimator):
    lower_seen = []
    upper_module, lower_module = Vector(torch.ones(2)), Vector(torch.ones(2))
    lower = mlo.Problem(
        "w", lower_module, torch.optim.SGD(lower_module.parameters(), lr=0.1), [1.0, 2.0, 3.0], steps=2,
        loss=lambda batch: lower_seen.append(batch) or batch * ((lower_module.value - upper_module.value) ** 2).sum(),
    )
    upper = mlo.Problem("h", upper_module, torch.optim.SGD(upper_module.parameters(), lr=0.1), loss=lambda b: (lower_module.value**2).sum())
    engine = mlo.Engine([lower, upper], {"h": ["w"]}, estimator)
    engine.step("w")
    engine.step("w")
    del lower_seen[:]
    engine.step("h")  # the lower's current batch is its second
    assert lower_seen and set(lower_seen) == {2.0}


def test_an_upper_step_follows_its_hypergradient(float64):
    r = ridge()
    engine = r.engine("cg")
    g = engine.hypergradient("h")[0]
    h0 = r.h()
    engine.step("h")
    torch.testing.assert_close(r.h(), h0 - 0.1 * g, rtol=1e-14, atol=1e-16)
    assert g.abs().max() > 0


# ---------------------------------------------------------------------------------------------- schedulers


def test_schedulers_are_stepped_after_every_optimizer_step():
    q = _chain({"C": 2})
    start = {n: q.value(n).clone() for n in "ABC"}
    for p in q.problems.values():
        p.scheduler = torch.optim.lr_scheduler.StepLR(p.optimizer, step_size=1, gamma=0.5)
    engine = q.engine()
    engine.run(3)
    lr0 = 0.05
    assert q.problems["C"].optimizer.param_groups[0]["lr"] == pytest.approx(lr0 * 0.5**6)
    assert q.problems["B"].optimizer.param_groups[0]["lr"] == pytest.approx(lr0 * 0.5**3)
    assert q.problems["A"].optimizer.param_groups[0]["lr"] == pytest.approx(lr0 * 0.5**3)
    assert all(not torch.equal(start[n], q.value(n)) for n in "ABC")


def test_the_first_step_uses_the_initial_learning_rate():
    # x <- x - lr_k x on 1/2 ||x||^2: after three steps x0 (1 - 0.1)(1 - 0.05)(1 - 0.025).
    module = Vector(torch.tensor([1.0, -2.0], dtype=torch.float64))
    opt = torch.optim.SGD(module.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    level = mlo.Problem("x", module, opt, loss=lambda batch: 0.5 * (module.value**2).sum(), scheduler=sched)
    mlo.Engine([level]).run(3)
    want = torch.tensor([1.0, -2.0], dtype=torch.float64) * 0.9 * 0.95 * 0.975
    torch.testing.assert_close(module.value.detach(), want, rtol=1e-15, atol=0)


# ---------------------------------------------------------------------------------------------- state


def _resumable(seed):
    prog = mlp_program(batches=4, seed=seed)  # after 3 rounds, mid-way through both levels' data
    prog.lower.steps = 2
    prog.lower.scheduler = torch.optim.lr_scheduler.ExponentialLR(prog.lower.optimizer, gamma=0.9)
    prog.upper.scheduler = torch.optim.lr_scheduler.StepLR(prog.upper.optimizer, step_size=2, gamma=0.5)
    return prog


def _everything(prog):
    return {**snapshot(prog.lower, prog.upper), "lr": [g["lr"] for g in prog.lower.optimizer.param_groups]}


@pytest.mark.parametrize("estimator", ["cg", "unroll:steps=2"])
def test_state_dict_round_trip_resumes_exactly(float64, estimator):
    prog = _resumable(seed=0)
    engine = prog.engine(estimator)
    engine.run(3)
    buffer = io.BytesIO()
    torch.save(engine.state_dict(), buffer)
    engine.run(2)
    assert engine.round == 5

    fresh = _resumable(seed=0)
    with torch.no_grad():  # a different starting point, so the load has to restore it
        for p in [*fresh.lower.module.parameters(), *fresh.upper.module.parameters()]:
            p.add_(1.0)
    resumed = fresh.engine(estimator)
    buffer.seek(0)
    resumed.load_state_dict(torch.load(buffer, weights_only=False))
    assert resumed.round == 3
    resumed.run(2)
    assert resumed.round == 5
    assert_same(_everything(prog), _everything(fresh))


def test_a_state_from_another_program_is_refused():
    q = _chain({})
    state = q.engine().state_dict()
    del state["levels"]["C"]
    with pytest.raises(mlo.ProgramError, match=r"\['C'\]"):
        q.engine().load_state_dict(state)


# ---------------------------------------------------------------------------------------------- closures


def _closure_program():
    """Lower: a network fit to features produced by the upper's module (the lower loss calls the
    upper module); upper: the network's validation error on its own features (the upper loss
    calls the lower module). Both directions of closure."""
    torch.manual_seed(3)
    net = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 1))
    features = nn.Linear(3, 3)
    x, y, xv, yv = torch.randn(10, 3), torch.randn(10), torch.randn(10, 3), torch.randn(10)
    lrs = (0.1, 0.03)
    opt = torch.optim.SGD([{"params": net[0].parameters(), "lr": lrs[0]}, {"params": net[2].parameters(), "lr": lrs[1]}])

    def lower_fn(batch):
        return ((net(features(x)).squeeze(-1) - y) ** 2).mean()

    def upper_fn(batch):
        return ((net(features(xv)).squeeze(-1) - yv) ** 2).mean()

    lower = mlo.Problem("net", net, opt, loss=lower_fn)
    upper = mlo.Problem("features", features, torch.optim.SGD(features.parameters(), lr=0.1), loss=upper_fn)
    return lower, upper, (x, y, xv, yv), lrs


def test_closures_over_other_levels_work_with_finite_differences(float64):
    lower, upper, (x, y, xv, yv), lrs = _closure_program()
    net, features = lower.module, upper.module
    engine = mlo.Engine([lower, upper], {"features": ["net"]}, FiniteDifference(radius=0.01))
    before = snapshot(lower, upper)
    got = engine.hypergradient("features")
    assert_same(before, snapshot(lower, upper))

    # The reference: the same losses as functions of flat parameter vectors (torch.func on each
    # module separately), through finite_difference_reference.
    net_names = [n for n, _ in net.named_parameters()]
    net_shapes = [p.shape for p in net.parameters()]
    feat_names = [n for n, _ in features.named_parameters()]
    feat_shapes = [p.shape for p in features.parameters()]

    def unflatten(vector, names, shapes):
        parts = vector.split([s.numel() for s in shapes])
        return {n: t.view(s) for n, t, s in zip(names, parts, shapes)}

    def forward(w, h, inputs):
        feats = torch.func.functional_call(features, unflatten(h, feat_names, feat_shapes), (inputs,))
        return torch.func.functional_call(net, unflatten(w, net_names, net_shapes), (feats,)).squeeze(-1)

    def inner_fn(w, h):
        return ((forward(w, h, x) - y) ** 2).mean()

    def outer_fn(w, h):
        return ((forward(w, h, xv) - yv) ** 2).mean()

    per_coordinate = torch.cat(
        [torch.full((p.numel(),), lrs[0]) for p in net[0].parameters()]
        + [torch.full((p.numel(),), lrs[1]) for p in net[2].parameters()]
    )
    w = flat([p.detach() for p in net.parameters()])
    h = flat([p.detach() for p in features.parameters()])
    want = finite_difference_reference(inner_fn, outer_fn, w, h, per_coordinate, 0.01)
    assert relative_error(flat(got), want) < 1e-10

    # and a real round with it moves the upper level, and only through its step
    engine.run(1)
    assert not torch.equal(before["features.param.weight"], features.weight.detach())


def test_gradients_are_released_after_each_step(float64):
    prog = mlp_program()
    seen = []

    class Watch(mlo.hooks.Hook):
        def on_step(self, engine, name, loss):
            seen.append((name, [p.grad for p in engine.program.params[name]]))

    engine = mlo.Engine([prog.lower, prog.upper], {"upper": ["lower"]}, "cg", hooks=[Watch()])
    before = [p.detach().clone() for p in prog.lower.module.parameters()]
    engine.run(2)
    assert [name for name, _ in seen] == ["lower", "upper"] * 2
    assert all(g is None for _, grads in seen for g in grads)
    assert any(not torch.equal(a, b) for a, b in zip(before, prog.lower.module.parameters()))  # it did step
