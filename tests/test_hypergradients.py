"""Every estimator against a trusted answer, in float64.

References: the closed-form ridge hypergradient (implicit function theorem), the closed form of
K unrolled SGD steps, DARTS's finite-difference formula written out from its definition, the
per-hop rule (``hessian="partial"``) evaluated with explicit matrices on quadratic chains and DAGs, and ``higher`` (plus a
hand-written Adam) for unrolled optimizers with state.
"""

from __future__ import annotations

import warnings

import higher
import pytest
import torch

from mlo.estimators import CG, FiniteDifference, FirstOrder, Neumann, Unroll

from .helpers import (
    assert_same,
    conditioned_iterations,
    finite_difference_reference,
    mlp_lower_loss,
    mlp_program,
    mlp_upper_loss,
    one_step_unrolled_reference,
    quadratic,
    relative_error,
    ridge,
    snapshot,
)

pytestmark = pytest.mark.usefixtures("float64", "one_thread")


def _at_optimum(**kw):
    r = ridge(**kw)
    r.set_w(r.optimum())
    return r


def _eigenvalues(r):
    eig = torch.linalg.eigvalsh(r.hessian())
    return float(eig[0]), float(eig[-1])


# ---------------------------------------------------------------------------------------------- ridge: implicit


@pytest.mark.parametrize("direct", [0.0, 0.7])
def test_cg_matches_closed_form_at_the_optimum(direct):
    r = _at_optimum(direct=direct)
    got = r.engine(CG(iterations=r.d, tol=0.0)).hypergradient("h")[0]
    assert relative_error(got, r.exact_hypergradient()) < 1e-8


def test_cg_damping_solves_the_damped_system():
    r = _at_optimum()
    damping = 0.5
    w, h = r.optimum(), r.h()
    damped = r.hessian() + damping * torch.eye(r.d)
    want = -h.exp() * w * torch.linalg.solve(damped, r.validation_gradient(w))
    got = r.engine(CG(iterations=r.d, tol=0.0, damping=damping)).hypergradient("h")[0]
    assert relative_error(got, want) < 1e-8
    assert relative_error(want, r.exact_hypergradient()) > 1e-2


def test_cg_with_too_few_iterations_is_not_exact():
    # The check above can fail: with fewer CG iterations than distinct eigenvalues it must.
    r = _at_optimum()
    got = r.engine(CG(iterations=1, tol=0.0)).hypergradient("h")[0]
    assert relative_error(got, r.exact_hypergradient()) > 1e-4


@pytest.mark.parametrize("direct", [0.0, 0.7])
def test_neumann_matches_closed_form_at_the_optimum(direct):
    r = _at_optimum(direct=direct)
    lo, hi = _eigenvalues(r)
    alpha = 1.0 / hi  # below 2 / lambda_max; error factor (1 - lo/hi)^n
    n = conditioned_iterations(1.0 - lo / hi, 1e-9)
    got = r.engine(Neumann(iterations=n, alpha=alpha)).hypergradient("h")[0]
    assert relative_error(got, r.exact_hypergradient()) < 1e-6
    # and the truncation matters: one term gets the implicit part visibly wrong
    few = r.engine(Neumann(iterations=1, alpha=alpha)).hypergradient("h")[0]
    implicit = r.exact_hypergradient() - direct * r.h()
    assert relative_error(few - direct * r.h(), implicit) > 1e-2


# ---------------------------------------------------------------------------------------------- ridge: unroll


def _unrolled_closed_form(r, lr, K):
    """K SGD steps from w* (a fixed point): dw_K/dh = -lr sum_{k<K} (I - lr A)^k diag(lambda w*)."""
    A, w, h = r.hessian(), r.optimum(), r.h()
    M = torch.eye(r.d) - lr * A
    S = torch.zeros(r.d, r.d)
    P = torch.eye(r.d)
    for _ in range(K):
        S = S + P
        P = P @ M
    return r.direct * h - lr * (h.exp() * w) * (S.T @ r.validation_gradient(w))


@pytest.mark.parametrize("direct", [0.0, 0.7])
def test_unroll_converges_to_the_implicit_hypergradient(direct):
    r = _at_optimum(direct=direct)
    lo, hi = _eigenvalues(r)
    lr = 0.25 / hi  # a slow contraction, 1 - lr * lo per step: every K below is far from rounding
    r.inner.optimizer.param_groups[0]["lr"] = lr
    exact = r.exact_hypergradient()
    errors = []
    for K in (1, 5, 20, 100):
        got = r.engine(Unroll(steps=K)).hypergradient("h")[0]
        # exactly K differentiated SGD steps ...
        assert relative_error(got, _unrolled_closed_form(r, lr, K)) < 1e-10
        errors.append(relative_error(got, exact))
    # ... which approach the implicit answer as K grows
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 1e-3


# ---------------------------------------------------------------------------------------------- ridge: finite differences


@pytest.mark.parametrize("radius", [0.01, 0.3])
def test_finite_difference_follows_its_formula(radius):
    # Off the optimum (so the look-ahead step matters) and with a quartic penalty (so the
    # central difference is not exact and eps = radius / ||xi a|| matters).
    r = ridge(quartic=0.5, lr=0.2)
    want = finite_difference_reference(r.inner_fn, r.outer_fn, r.w(), r.h(), torch.full((r.d,), 0.2), radius)
    got = r.engine(FiniteDifference(radius=radius)).hypergradient("h")[0]
    assert relative_error(got, want) < 1e-10


def test_finite_difference_is_one_unrolled_step_up_to_second_order():
    r = ridge(quartic=0.5, lr=0.2)
    lrs = torch.full((r.d,), 0.2)
    exact = one_step_unrolled_reference(r.inner_fn, r.outer_fn, r.w(), r.h(), lrs)
    assert relative_error(r.engine(Unroll(steps=1)).hypergradient("h")[0], exact) < 1e-10
    big = relative_error(r.engine(FiniteDifference(radius=0.1)).hypergradient("h")[0], exact)
    small = relative_error(r.engine(FiniteDifference(radius=0.01)).hypergradient("h")[0], exact)
    assert small < 1e-3
    assert small < big / 50  # O(radius^2): a tenth of the radius, a hundredth of the error


def test_finite_difference_on_a_quadratic_is_exactly_one_unrolled_step():
    # The inner gradient in h is quadratic in w, so central differences are exact.
    r = ridge(direct=0.3)
    exact = one_step_unrolled_reference(r.inner_fn, r.outer_fn, r.w(), r.h(), torch.full((r.d,), 0.1))
    got = r.engine(FiniteDifference()).hypergradient("h")[0]
    assert relative_error(got, exact) < 1e-10


def test_finite_difference_uses_each_param_group_learning_rate():
    lrs = (0.3, 0.05)
    r = ridge(quartic=0.5, sizes=(2, 3), lr=lrs)
    per_coordinate = torch.tensor([lrs[0]] * 2 + [lrs[1]] * 3)
    want = finite_difference_reference(r.inner_fn, r.outer_fn, r.w(), r.h(), per_coordinate, 0.01)
    got = r.engine(FiniteDifference(radius=0.01)).hypergradient("h")[0]
    assert relative_error(got, want) < 1e-10
    # a single learning rate (either one) would be a different answer
    for lr in lrs:
        wrong = finite_difference_reference(r.inner_fn, r.outer_fn, r.w(), r.h(), torch.full((r.d,), lr), 0.01)
        assert relative_error(got, wrong) > 1e-3
    # unroll with the same param groups: the exact one-step derivative
    exact = one_step_unrolled_reference(r.inner_fn, r.outer_fn, r.w(), r.h(), per_coordinate)
    assert relative_error(r.engine(Unroll(steps=1)).hypergradient("h")[0], exact) < 1e-10


# ---------------------------------------------------------------------------------------------- ridge: first order


def test_first_order_is_the_direct_gradient_which_is_zero_for_ridge():
    r = _at_optimum()
    got = r.engine(FirstOrder()).hypergradient("h")[0]
    assert torch.equal(got, torch.zeros(r.d))
    # while the true hypergradient is not: first_order is wrong here, as documented
    assert r.exact_hypergradient().abs().max() > 1e-3


def test_first_order_is_exactly_the_direct_gradient():
    r = _at_optimum(direct=0.7)
    w, h = r.w(), r.h().requires_grad_()
    (direct,) = torch.autograd.grad(r.outer_fn(w, h), h)
    assert direct.abs().min() > 0
    got = r.engine(FirstOrder()).hypergradient("h")[0]
    assert torch.equal(got, direct)


# ---------------------------------------------------------------------------------------------- per-hop rule
# hessian="partial": each hop solves with its lower loss's own Hessian, the levels below it held
# fixed. The exact rule ("total", the default) is checked in tests/test_depth.py.


def _solve(r, v, x):
    return torch.linalg.solve(r.block(v, v, v), x)


def test_three_level_chain_follows_the_per_hop_rule():
    # A -> B -> C; L_A depends on A, B and C, L_B on A, B and C, L_C on B and C.
    q = quadratic(
        {"A": 2, "B": 3, "C": 4},
        {"A": ("A", "B", "C"), "B": ("A", "B", "C"), "C": ("B", "C")},
        {"A": ["B"], "B": ["C"]},
    )
    engine = q.engine(CG(iterations=10, tol=0.0, hessian="partial"))
    a_C = q.grad("A", "C")
    a_B = q.grad("A", "B") - q.block("C", "B", "C") @ _solve(q, "C", a_C)
    want_A = q.grad("A", "A") - q.block("B", "A", "B") @ _solve(q, "B", a_B)
    assert relative_error(engine.hypergradient("A")[0], want_A) < 1e-8
    # the middle level's own hypergradient, through C alone
    want_B = q.grad("B", "B") - q.block("C", "B", "C") @ _solve(q, "C", q.grad("B", "C"))
    assert relative_error(engine.hypergradient("B")[0], want_B) < 1e-8
    # the path through C matters: dropping it gives another answer
    without_C = q.grad("A", "A") - q.block("B", "A", "B") @ _solve(q, "B", q.grad("A", "B"))
    assert relative_error(without_C, want_A) > 1e-3


def test_diamond_dag_follows_the_per_hop_rule():
    # U -> L1, U -> L2, L1 -> M, L2 -> M: one upper with two lowers, one lower with two uppers.
    q = quadratic(
        {"U": 2, "L1": 3, "L2": 2, "M": 3},
        {
            "U": ("U", "L1", "L2", "M"),
            "L1": ("U", "L1", "M"),
            "L2": ("U", "L2", "M"),
            "M": ("L1", "L2", "M"),
        },
        {"U": ["L1", "L2"], "L1": ["M"], "L2": ["M"]},
        seed=1,
    )
    engine = q.engine(CG(iterations=10, tol=0.0, hessian="partial"))
    a_M = q.grad("U", "M")
    a_L1 = q.grad("U", "L1") - q.block("M", "L1", "M") @ _solve(q, "M", a_M)
    a_L2 = q.grad("U", "L2") - q.block("M", "L2", "M") @ _solve(q, "M", a_M)
    want_U = (
        q.grad("U", "U")
        - q.block("L1", "U", "L1") @ _solve(q, "L1", a_L1)
        - q.block("L2", "U", "L2") @ _solve(q, "L2", a_L2)
    )
    assert relative_error(engine.hypergradient("U")[0], want_U) < 1e-8
    for mid in ("L1", "L2"):
        want = q.grad(mid, mid) - q.block("M", mid, "M") @ _solve(q, "M", q.grad(mid, "M"))
        assert relative_error(engine.hypergradient(mid)[0], want) < 1e-8


def test_per_edge_estimators_on_a_chain():
    # Neumann on the deep edge, CG on the top one: the same closed form.
    q = quadratic(
        {"A": 2, "B": 3, "C": 4},
        {"A": ("A", "B", "C"), "B": ("A", "B", "C"), "C": ("B", "C")},
        {"A": ["B"], "B": ["C"]},
        seed=2,
    )
    H_C = q.block("C", "C", "C")
    eig = torch.linalg.eigvalsh(H_C)
    lo, hi = float(eig[0]), float(eig[-1])
    neumann = Neumann(iterations=conditioned_iterations(1 - lo / hi, 1e-12), alpha=1 / hi)
    engine = q.engine({("A", "B"): CG(iterations=10, tol=0.0, hessian="partial"), ("B", "C"): neumann})
    a_B = q.grad("A", "B") - q.block("C", "B", "C") @ _solve(q, "C", q.grad("A", "C"))
    want = q.grad("A", "A") - q.block("B", "A", "B") @ _solve(q, "B", a_B)
    assert relative_error(engine.hypergradient("A")[0], want) < 1e-8


def _grad(f, x, create_graph=True):
    """df/dx at x, in a fresh alias of x: the partial derivative, differentiable in what x and f
    depend on."""
    x = x.view_as(x) if x.requires_grad else x.detach().requires_grad_()
    return torch.autograd.grad(f(x), x, create_graph=create_graph)[0]


@pytest.mark.parametrize("middle", ["cg", "unroll", "finite_difference"])
def test_unroll_through_a_middle_level_follows_the_per_hop_rule(middle):
    """A -> B -> C with unroll on the top edge: each look-ahead step of B follows B's own
    hypergradient through C (by ``middle``), and the top hypergradient follows the per-hop rule
    with a_C the *partial* derivative of L_A in C at the look-ahead point. The reference is
    written from the definitions with explicit matrices and plain autograd."""
    q = quadratic(
        {"A": 2, "B": 3, "C": 4},
        {"A": ("A", "B", "C"), "B": ("A", "B", "C"), "C": ("B", "C")},
        {"A": ["B"], "B": ["C"]},
    )
    K, J, lr, radius = 3, 2, 0.05, 0.01  # lr: the quadratic programs' SGD learning rate
    below = {
        # tol = 0 and 100 iterations on 4 unknowns: CG meets roundoff inside a differentiated look-ahead
        "cg": CG(iterations=100, tol=0.0),
        "unroll": Unroll(steps=J),
        "finite_difference": FiniteDifference(radius=radius),
    }[middle]
    engine = q.engine({("A", "B"): Unroll(steps=K), ("B", "C"): below})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = engine.hypergradient("A")[0]

    c0 = q.value("C")
    P_C, M = q.block("C", "C", "C"), q.block("C", "B", "C")

    def c_ahead(b):  # J differentiable SGD steps of C, with B at b
        c = c0
        for _ in range(J):
            c = c - lr * _grad(lambda x: q.loss("C", {"B": b, "C": x}), c)
        return c

    def fd_vjp(b, adjoint):  # DARTS's central difference along v = lr * adjoint, at b
        v = lr * adjoint
        eps = radius / float(v.detach().norm())
        plus = _grad(lambda x: q.loss("C", {"B": x, "C": c0 + eps * v}), b)
        minus = _grad(lambda x: q.loss("C", {"B": x, "C": c0 - eps * v}), b)
        return -(plus - minus) / (2 * eps)

    def direction(a, b):  # B's hypergradient at b, differentiable in a and b
        if middle == "unroll":
            return _grad(lambda x: q.loss("B", {"A": a, "B": x, "C": c_ahead(x)}), b)
        c = c0
        if middle == "finite_difference":  # L_B evaluated at C's (detached) look-ahead
            c = (c0 - lr * _grad(lambda x: q.loss("C", {"B": b.detach(), "C": x}), c0, False)).detach()
        g_b = _grad(lambda x: q.loss("B", {"A": a, "B": x, "C": c}), b)
        g_c = _grad(lambda x: q.loss("B", {"A": a, "B": b, "C": x}), c)
        if middle == "cg":
            return g_b - M @ torch.linalg.solve(P_C, g_c)
        return g_b + fd_vjp(b, g_c)

    def vjp_BC(adjoint):  # at the current point
        b = q.value("B").clone().requires_grad_()
        if middle == "cg":
            return -M @ torch.linalg.solve(P_C, adjoint)
        if middle == "unroll":
            return torch.autograd.grad(c_ahead(b), b, adjoint)[0]
        return fd_vjp(b, adjoint).detach()

    a = q.value("A").clone().requires_grad_()
    b_K = q.value("B")  # the look-ahead starts at the current B, which does not depend on A
    for _ in range(K):
        b_K = b_K - lr * direction(a, b_K)
    a_C = _grad(lambda x: q.loss("A", {"A": a, "B": b_K, "C": x}), c0, False)
    (through_B,) = torch.autograd.grad(b_K, a, vjp_BC(a_C), retain_graph=True)
    (direct,) = torch.autograd.grad(q.loss("A", {"A": a, "B": b_K}), a)
    assert relative_error(got, direct + through_B) < 1e-10


def test_diamond_with_an_attached_and_an_implicit_edge_on_one_upper():
    """U -> L1 by unroll, U -> L2 by CG, both -> M by CG: the look-ahead of L1 and the implicit
    term of L2 add up, each with the partial adjoints at the look-ahead point."""
    q = quadratic(
        {"U": 2, "L1": 3, "L2": 2, "M": 3},
        {"U": ("U", "L1", "L2", "M"), "L1": ("U", "L1", "M"), "L2": ("U", "L2", "M"), "M": ("L1", "L2", "M")},
        {"U": ["L1", "L2"], "L1": ["M"], "L2": ["M"]},
        seed=3,
    )
    K, lr = 2, 0.05
    cg = CG(iterations=10, tol=0.0, hessian="partial")
    engine = q.engine({("U", "L1"): Unroll(steps=K), ("U", "L2"): cg, ("L1", "M"): cg, ("L2", "M"): cg})
    got = engine.hypergradient("U")[0]

    m0 = q.value("M")
    P_M = q.block("M", "M", "M")

    def vjp_M(level, adjoint):
        return -q.block("M", level, "M") @ torch.linalg.solve(P_M, adjoint)

    def direction_L1(u, l1):
        g_l1 = _grad(lambda x: q.loss("L1", {"U": u, "L1": x}), l1)
        g_m = _grad(lambda x: q.loss("L1", {"U": u, "L1": l1, "M": x}), m0)
        return g_l1 + vjp_M("L1", g_m)

    u = q.value("U").clone().requires_grad_()
    l1_K = q.value("L1")
    for _ in range(K):
        l1_K = l1_K - lr * direction_L1(u, l1_K)
    at = {"U": u, "L1": l1_K}
    a_M = _grad(lambda x: q.loss("U", {**at, "M": x}), m0, False)
    a_L2 = _grad(lambda x: q.loss("U", {**at, "L2": x}), q.value("L2"), False) + vjp_M("L2", a_M)
    (through_L1,) = torch.autograd.grad(l1_K, u, vjp_M("L1", a_M), retain_graph=True)
    (direct,) = torch.autograd.grad(q.loss("U", at), u)
    through_L2 = -q.block("L2", "U", "L2") @ torch.linalg.solve(q.block("L2", "L2", "L2"), a_L2)
    assert relative_error(got, direct + through_L1 + through_L2) < 1e-10


# ---------------------------------------------------------------------------------------------- unroll vs higher


SGD_VARIANTS = {
    "momentum+weight_decay": dict(momentum=0.9, weight_decay=1e-2),
    "nesterov": dict(momentum=0.8, nesterov=True, weight_decay=1e-3),
    "dampening": dict(momentum=0.5, dampening=0.3),
}


def _prepared(optimizer, steps):
    """An MLP program whose lower level took one real step (so its optimizer has state)."""
    prog = mlp_program(optimizer=optimizer, batchnorm=False, unused=False)
    engine = prog.engine(Unroll(steps=steps))
    engine.step("lower")
    return prog, engine


def _higher_reference(prog, K):
    """The upper gradient after K differentiable steps of the lower optimizer, as higher computes it."""
    model, hyper = prog.lower.module, prog.upper.module
    with higher.innerloop_ctx(model, prog.lower.optimizer) as (fmodel, diffopt):
        for _ in range(K):
            diffopt.step(mlp_lower_loss(fmodel, hyper, prog.train[0]))
        return torch.autograd.grad(mlp_upper_loss(fmodel, hyper, prog.val[0]), list(hyper.parameters()))


@pytest.mark.parametrize("variant", list(SGD_VARIANTS))
def test_unroll_matches_higher_on_sgd_with_state(variant):
    K = 3
    prog, engine = _prepared(lambda groups: torch.optim.SGD(groups, lr=0.1, **SGD_VARIANTS[variant]), K)
    assert all("momentum_buffer" in s for s in prog.lower.optimizer.state.values())
    got = engine.hypergradient("upper")

    want = _higher_reference(prog, K)
    assert relative_error(got, want) < 1e-10


def _mlp(params, hyper, batch):
    """The program's MLP (no BatchNorm) and its losses as plain functions of a parameter dict."""
    x, y = batch
    hidden = torch.tanh((x * hyper.scale) @ params["fc1.weight"].T + params["fc1.bias"])
    pred = (hidden @ params["fc2.weight"].T + params["fc2.bias"]).squeeze(-1)
    return ((pred - y) ** 2).mean()


def _mlp_lower(params, hyper, batch):
    decay = params["fc1.weight"].pow(2).sum() + params["fc2.weight"].pow(2).sum()
    return _mlp(params, hyper, batch) + 0.5 * hyper.log_decay.exp() * decay


def _manual_adam(model, hyper, optimizer, batch, K):
    """K differentiable steps of torch.optim.Adam / AdamW as documented, written from scratch;
    returns the parameters after them."""
    params = dict(model.named_parameters())
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    state = {n: {k: v.detach().clone() for k, v in optimizer.state[p].items()} for n, p in params.items()}
    decoupled = isinstance(optimizer, torch.optim.AdamW)
    current = dict(params)
    for _ in range(K):
        grads = torch.autograd.grad(_mlp_lower(current, hyper, batch), list(current.values()), create_graph=True)
        new = {}
        for (n, p), g in zip(current.items(), grads):
            group = group_of[id(params[n])]
            lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            s = state[n]
            if decoupled:
                p = p * (1 - lr * wd)
            else:
                g = g + wd * p
            t = int(s["step"]) + 1
            s["exp_avg"] = b1 * s["exp_avg"] + (1 - b1) * g
            s["exp_avg_sq"] = b2 * s["exp_avg_sq"] + (1 - b2) * g * g
            s["step"] = torch.tensor(float(t))
            denom = s["exp_avg_sq"].sqrt() / (1 - b2**t) ** 0.5 + eps
            new[n] = p - lr / (1 - b1**t) * s["exp_avg"] / denom
        current = new
    return current


@pytest.mark.parametrize("kind", [torch.optim.Adam, torch.optim.AdamW])
def test_unroll_matches_hand_written_adam_with_state(kind):
    K = 3
    # a large eps, so where eps enters the update matters
    prog, engine = _prepared(lambda groups: kind(groups, lr=0.01, eps=1e-3, weight_decay=0.05), K)
    model, hyper = prog.lower.module, prog.upper.module
    got = engine.hypergradient("upper")
    final = _manual_adam(model, hyper, prog.lower.optimizer, prog.train[0], K)
    want = torch.autograd.grad(_mlp(final, hyper, prog.val[0]), list(hyper.parameters()))
    assert relative_error(got, want) < 1e-10


def test_hand_written_adam_is_torch_adam():
    # The reference above, without differentiation, is the real optimizer's next step.
    for kind in (torch.optim.Adam, torch.optim.AdamW):
        prog, _ = _prepared(lambda groups: kind(groups, lr=0.01, eps=1e-3, weight_decay=0.05), 1)
        model, hyper = prog.lower.module, prog.upper.module
        final = _manual_adam(model, hyper, prog.lower.optimizer, prog.train[0], 1)
        prog.lower.optimizer.zero_grad()
        mlp_lower_loss(model, hyper, prog.train[0]).backward()
        prog.lower.optimizer.step()
        for n, p in model.named_parameters():
            torch.testing.assert_close(final[n].detach(), p.detach(), rtol=1e-12, atol=1e-14)


def test_unroll_matches_higher_adam_without_eps():
    # higher 0.2.1 places Adam's eps before the bias correction (older torch); with eps = 0 the
    # two formulas coincide, so higher is an independent reference for Adam too.
    K = 3
    prog, engine = _prepared(lambda groups: torch.optim.Adam(groups, lr=0.01, eps=0.0, weight_decay=0.05), K)
    got = engine.hypergradient("upper")
    want = _higher_reference(prog, K)
    assert relative_error(got, want) < 1e-10


OPTIMIZERS = {
    "sgd": lambda g: torch.optim.SGD(g, lr=0.1),  # two groups, two learning rates
    "sgd-one-lr": lambda g: torch.optim.SGD([p for group in g for p in group["params"]], lr=0.1),  # the fused step
    "sgd-momentum-dampening": lambda g: torch.optim.SGD(g, lr=0.1, momentum=0.9, dampening=0.2, weight_decay=0.01),
    "sgd-nesterov-maximize": lambda g: torch.optim.SGD(g, lr=0.1, momentum=0.9, nesterov=True, maximize=True),
    "adam": lambda g: torch.optim.Adam(g, lr=0.01, betas=(0.8, 0.95), eps=1e-3, weight_decay=0.1),
    "adam-maximize": lambda g: torch.optim.Adam(g, lr=0.01, maximize=True),
    "adam-decoupled": lambda g: torch.optim.Adam(g, lr=0.01, weight_decay=0.1, decoupled_weight_decay=True),
    "adamw": lambda g: torch.optim.AdamW(g, lr=0.01, weight_decay=0.1),
}


@pytest.mark.parametrize("kind", list(OPTIMIZERS))
def test_update_rules_take_the_real_optimizers_steps(kind):
    """The differentiable copy of each supported optimizer, from the real one's state after a
    step, takes the same next two steps as ``optimizer.step()``, and leaves that state alone."""
    from mlo.estimators.update_rules import rule_for

    prog = mlp_program(optimizer=OPTIMIZERS[kind], batchnorm=False, unused=False)
    model, hyper, opt = prog.lower.module, prog.upper.module, prog.lower.optimizer
    batch = prog.train[0]

    def real_step():
        opt.zero_grad()
        mlp_lower_loss(model, hyper, batch).backward()
        opt.step()

    real_step()
    state = snapshot(prog.lower)
    names = [n for n, _ in model.named_parameters()]
    rule = rule_for(opt, tuple(model.parameters()))
    current = tuple(p.detach().clone() for p in model.parameters())
    for _ in range(2):
        point = {n: t.requires_grad_() for n, t in zip(names, current)}
        grads = torch.autograd.grad(_mlp_lower(point, hyper, batch), list(point.values()))
        current = tuple(t.detach() for t in rule.step(tuple(point.values()), grads))
    assert_same(state, snapshot(prog.lower))
    real_step()
    real_step()
    for got, want in zip(current, model.parameters()):
        torch.testing.assert_close(got, want.detach(), rtol=1e-12, atol=1e-14)
