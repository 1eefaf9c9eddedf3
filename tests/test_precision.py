"""Per-level precision (mlo.precision): bf16 autocast as an Engine option, fp32 solves, fp16 with a
gradient scaler on every level (upper levels' hypergradients loss-scaled), a user's own autocast,
and clear errors."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest
import torch
from torch import nn

import mlo
from mlo.problems.ridge import Vector

from .helpers import assert_same, mlp_program, quadratic, relative_error, snapshot

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore::mlo.ConvergenceWarning")]


ESTIMATORS = ["finite_difference", "cg:iterations=8,damping=1.0", "neumann:iterations=8,alpha=0.05", "unroll:steps=2", "sama"]


@pytest.mark.parametrize("how", ["engine bf16", "user autocast", "engine fp16"])
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_low_precision_hypergradient_stays_close_to_fp32(estimator: str, how: str) -> None:
    """On the reweighting MLP (Meta-Weight-Net on digits): bf16 within the issue's 1e-2, with
    ``Engine(precision="bf16")`` and with a user's own ``torch.autocast`` around an fp32 Engine
    (finite_difference was 110 % off there while the backward passes ran under it); fp16 on
    both levels, the upper one's hypergradient loss-scaled, within 2e-3 (fp16 keeps 3 more bits)."""
    ref = _reweighting(estimator, "fp32")
    low = _reweighting(estimator, {"engine bf16": "bf16", "user autocast": "fp32", "engine fp16": "fp16"}[how])
    ref.run(10)
    low.load_state_dict(ref.state_dict())
    want = ref.hypergradient("upper")
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=how == "user autocast"):
        got = low.hypergradient("upper")
    assert all(g.dtype == torch.float32 for g in got)
    assert 0 < relative_error(got, want) <= (2e-3 if how == "engine fp16" else 1e-2)  # not 0: the forward was narrow


def _reweighting(estimator: str, precision: str) -> mlo.Engine:
    """The reweighting MLP (hidden 32) with ``estimator`` on its edge, every level in ``precision``."""
    from mlo.benchmarks.workloads import as_mlo, reweighting

    return mlo.Engine(as_mlo(reweighting(hidden=32).instantiate()), {"upper": ["lower"]}, estimator, precision=precision)


def test_the_loss_runs_under_autocast_only_for_its_level() -> None:
    seen: dict[str, bool] = {}
    a, b = Vector(torch.ones(4)), Vector(torch.ones(4))

    def loss_of(name: str, v: Vector):  # type: ignore[no-untyped-def]
        def loss(batch: None) -> torch.Tensor:
            seen[name] = torch.is_autocast_enabled("cpu")
            return (v.value @ torch.ones(4)) ** 2
        return loss

    levels = [mlo.Problem(n, v, torch.optim.SGD(v.parameters(), lr=0.1), loss=loss_of(n, v)) for n, v in (("a", a), ("b", b))]
    mlo.Engine(levels, precision={"a": "bf16"}).run(1)
    assert seen == {"a": True, "b": False}


def test_bad_precision_is_an_error_naming_the_level() -> None:
    prog = mlp_program(batchnorm=False, unused=False)
    with pytest.raises(mlo.ProgramError, match="level 'lower': precision must be one of fp32, bf16, fp16"):
        mlo.Engine([prog.lower, prog.upper], {"upper": ["lower"]}, precision={"lower": "half"})
    with pytest.raises(mlo.ProgramError, match="unknown level"):
        mlo.Engine([prog.lower, prog.upper], {"upper": ["lower"]}, precision={"nope": "bf16"})


def test_fp16_scaler_steps_skips_overflows_and_is_saved() -> None:
    """fp16 with a GradScaler (torch's CPU scaler here; the same code path as on a GPU): normal
    steps move the weights as fp32 would to fp16 accuracy; a step whose scaled gradient
    overflows is skipped and the scale backed off; the scaler's state is in state_dict."""
    torch.manual_seed(0)
    layer = nn.Linear(8, 1)
    x = torch.randn(16, 8)
    big = [False]

    def loss(batch: None) -> torch.Tensor:
        out = (layer(x) ** 2).mean()
        return out * (6e4 if big[0] else 1.0)

    ref_layer = nn.Linear(8, 1)
    ref_layer.load_state_dict(layer.state_dict())
    engine = mlo.Engine([mlo.Problem("w", layer, torch.optim.SGD(layer.parameters(), lr=0.01), loss=loss)], precision="fp16")
    ref_opt = torch.optim.SGD(ref_layer.parameters(), lr=0.01)
    for _ in range(3):
        engine.step("w")
        ref_opt.zero_grad()
        (ref_layer(x) ** 2).mean().backward()
        ref_opt.step()
    for p, q in zip(layer.parameters(), ref_layer.parameters()):
        torch.testing.assert_close(p, q, rtol=2e-3, atol=2e-3)
    scale = engine.state_dict()["scalers"]["w"]["scale"]
    before = [p.detach().clone() for p in layer.parameters()]
    big[0] = True
    engine.step("w")  # 6e4 * 65536 overflows fp16: skipped
    assert all(torch.equal(p, q) for p, q in zip(layer.parameters(), before))
    assert engine.state_dict()["scalers"]["w"]["scale"] == scale * 0.5


def test_loss_scaling_keeps_gradients_that_fp16_flushes_to_zero() -> None:
    """`mlo.precision.scale_backward`: a gradient of 1e-8 per output underflows to zero in an fp16
    backward pass; scaled by the scaler's 65536 it survives, and comes out unscaled."""
    torch.manual_seed(0)
    w, x = torch.randn(16, 4, requires_grad=True), torch.randn(8, 16)

    def loss(point: Mapping[str, Sequence[torch.Tensor]]) -> torch.Tensor:
        return mlo.precision.widen(x @ point["w"][0]).sum() * 1e-8

    want = torch.autograd.grad(loss({"w": (w,)}), w)[0]
    with torch.autocast("cpu", dtype=torch.float16):
        plain, scaled = loss({"w": (w,)}), mlo.precision.scale_backward(loss, {"w": (w,)}, torch.amp.GradScaler("cpu"))
    assert float(scaled) == float(plain)
    assert torch.count_nonzero(torch.autograd.grad(plain, w)[0]) == 0
    assert relative_error(torch.autograd.grad(scaled, w)[0], want) <= 2e-3


def test_fp16_upper_level_overflow_is_skipped_the_scale_halved_and_resumed(tmp_path: Path) -> None:
    """An upper level in fp16 whose scaled hypergradient overflows (its scale forced to 2**40):
    the step is skipped (its parameters and Adam state untouched), the scale halves as
    GradScaler's does, nothing raises; the scalers' state is saved and a resumed run ends bit for
    bit where the uninterrupted one ends."""
    engine = _reweighting("cg:iterations=4,damping=1.0", "fp16")
    engine.run(2)
    state = engine.state_dict()
    state["scalers"]["upper"]["scale"] = 2.0**40
    engine.load_state_dict(state)
    before = snapshot(engine.program.problems["upper"])
    engine.step("upper")
    assert_same(before, snapshot(engine.program.problems["upper"]))
    assert engine.state_dict()["scalers"]["upper"]["scale"] == 2.0**39
    mlo.checkpoint.save(engine, tmp_path / "ck.pt")
    engine.run(2)
    resumed = _reweighting("cg:iterations=4,damping=1.0", "fp16")
    mlo.checkpoint.load(resumed, tmp_path / "ck.pt")
    resumed.run(2)
    assert_same(snapshot(*engine.program.problems.values()), snapshot(*resumed.program.problems.values()))
    assert engine.state_dict()["scalers"] == resumed.state_dict()["scalers"]


def test_the_precision_benchmark_covers_every_estimator_with_a_nonzero_hypergradient() -> None:
    """`mlo.benchmarks.precision` measures every registered estimator (first_order's
    hypergradient is zero on the reweighting MLP) in each of its ways, at one state."""
    from mlo.benchmarks import precision

    assert {spec.split(":")[0] for spec in precision.ESTIMATORS} == set(mlo.estimators.names()) - {"first_order"}
    errors = precision.measure("cg:iterations=2", states=1, rounds_between=1)
    assert list(errors) == list(precision.WAYS)
    assert all(len(v) == 1 and 0 < v[0] < 1e-2 for v in errors.values())


@pytest.mark.filterwarnings("ignore::mlo.ConvergenceWarning")
@pytest.mark.parametrize("estimator", ["cg:iterations=8", "neumann:iterations=8,alpha=0.1", "unroll:steps=3",
                                       "finite_difference", "sama"])
def test_fp16_on_every_level_of_a_three_level_chain(estimator: str) -> None:
    """top -> mid -> low, quadratics, every level in fp16: the first steps overflow at the
    scalers' initial 65536 and are skipped, whatever the estimator (nothing raises), the scales
    back off; then the top level's hypergradient is fp32's to fp16 accuracy. The middle level's
    loss, differentiated twice inside the top's reduced curvature (cg, neumann), is evaluated in
    full precision there: through loss scaling a second derivative would come out 1/S too small."""
    dims, graph = {"top": 3, "mid": 4, "low": 5}, {"top": ["mid"], "mid": ["low"]}
    couples = {"top": ["top", "mid", "low"], "mid": ["top", "mid", "low"], "low": ["mid", "low"]}
    ref, low = (quadratic(dims, couples, graph, seed=1) for _ in range(2))
    engine = mlo.Engine(list(low.problems.values()), graph, estimator, precision="fp16")
    engine.run(4)
    scales = {name: s["scale"] for name, s in engine.state_dict()["scalers"].items()}
    assert all(s < 2.0**16 for s in scales.values()) and scales["top"] >= 2.0**10
    fp32 = mlo.Engine(list(ref.problems.values()), graph, estimator)
    fp32.load_state_dict(engine.state_dict())
    assert 0 < relative_error(engine.hypergradient("top"), fp32.hypergradient("top")) <= 2e-3


@pytest.mark.parametrize("test", ["fast", "public"])
def test_autocast_on_sees_a_callers_autocast_on_both_paths(test: str) -> None:
    """`autocast_on` (torch's one-call private test where present, else the public calls) is
    True exactly inside a caller's autocast, and `no_autocast` turns it off inside."""
    from mlo import precision

    if test == "fast" and precision._ANY_AUTOCAST is None:
        pytest.skip("this torch has no one-call autocast test")
    on = precision.autocast_on if test == "fast" else precision._autocast_on_public
    assert not on()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert on()
        with precision.no_autocast():
            assert not on()
            assert torch.ones(2, 2).matmul(torch.ones(2, 2)).dtype == torch.float32
        assert on()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=False):
        assert not on()
