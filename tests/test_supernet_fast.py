"""The fast DARTS supernet against its op-by-op reference: same outputs, gradients and searches."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import mlo
from mlo.problems.darts import (
    Architecture,
    PointwiseConv2d,
    SuperNet,
    depthwise_conv2d,
    pdarts_next_stage,
    use_reference,
)
from mlo.problems.darts.ops import (
    AvgPool3x3,
    BatchNorm2d,
    DilConv,
    FactorizedReduce,
    MaxPool3x3,
    engine_will_execute,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _close(fast: Tensor, ref: Tensor, name: str, tol: float = 1e-5, floor: float = 0.0) -> None:
    """Equal to ``tol`` relative to the reference's largest entry, or to ``floor`` if that is larger
    (float32 sums taken in other orders)."""
    scale = max(float(ref.detach().abs().max()), floor) or 1.0
    torch.testing.assert_close(fast, ref, rtol=tol, atol=tol * scale, msg=lambda m: f"{name}: {m}")


def _pair(**kw: object) -> tuple[SuperNet, SuperNet]:
    torch.manual_seed(0)
    fast = SuperNet(**kw)  # type: ignore[arg-type]
    ref = SuperNet(**kw, fast=False)  # type: ignore[arg-type]
    ref.load_state_dict(fast.state_dict())
    return fast, ref


@pytest.mark.parametrize(
    "shape, C, pc_k, edge_norm, pruned, batch",
    [
        ((1, 14, 14), 4, 1, False, False, 8),  # the Fashion-MNIST bench setting, one batch size smaller
        ((1, 14, 14), 4, 1, False, False, 64),  # the bench setting itself: BatchNorm's fast path too
        ((1, 8, 8), 4, 1, False, False, 8),  # small maps: the matrix form of the depthwise convolutions
        ((3, 11, 11), 4, 2, True, False, 8),  # PC-DARTS, odd sizes
        ((1, 12, 12), 4, 1, False, True, 8),  # P-DARTS op mask
    ],
)
def test_fast_supernet_equals_reference(
    shape: tuple[int, int, int], C: int, pc_k: int, edge_norm: bool, pruned: bool, batch: int
) -> None:
    mask = None
    if pruned:
        mask = pdarts_next_stage(Architecture(generator=torch.Generator().manual_seed(1), init_scale=1.0), (3, 4))[1]
    fast, ref = _pair(C=C, num_classes=5, layers=3, in_channels=shape[0], pc_k=pc_k, edge_norm=edge_norm, op_mask=mask)
    assert [type(m) for m in fast.modules()] == [type(m) for m in ref.modules()]
    arch = fast.new_architecture(torch.Generator().manual_seed(2), init_scale=0.5)
    x = torch.randn(batch, *shape, generator=torch.Generator().manual_seed(3))
    y = torch.arange(batch) % 5
    outputs, grads = [], []
    for net in (fast, ref):
        logits = net(x, arch)
        params = [*net.parameters(), *arch.parameters()]
        outputs.append(logits)
        grads.append(torch.autograd.grad(F.cross_entropy(logits, y), params))
    _close(outputs[0], outputs[1], "logits")
    names = [n for n, _ in fast.named_parameters()] + [n for n, _ in arch.named_parameters()]
    for name, g_fast, g_ref in zip(names, grads[0], grads[1]):
        _close(g_fast, g_ref, name)
    for (name, a), b in zip(fast.named_buffers(), ref.buffers()):
        if a.is_floating_point():
            _close(a, b, name, floor=1.0)  # BatchNorm's running statistics of O(1) activations


def test_architecture_gradient_alone_equals_reference() -> None:
    # Only the architecture's gradient is asked for (DARTS's finite-difference passes): the fast
    # backward leaves out the weight gradients and must still give the same architecture gradient.
    fast, ref = _pair(C=4, num_classes=3, layers=3, in_channels=1)
    arch = fast.new_architecture(torch.Generator().manual_seed(0), init_scale=0.5)
    x, y = torch.randn(6, 1, 14, 14), torch.tensor([0, 1, 2, 0, 1, 2])
    g_fast = torch.autograd.grad(F.cross_entropy(fast(x, arch), y), list(arch.parameters()))
    g_ref = torch.autograd.grad(F.cross_entropy(ref(x, arch), y), list(arch.parameters()))
    for a, b in zip(g_fast, g_ref):
        _close(a, b, "architecture")


def test_use_reference_switches_every_fast_module() -> None:
    net = SuperNet(C=4, num_classes=3, layers=3, in_channels=1)
    flags = [m.fast for m in net.modules() if hasattr(m, "fast")]
    assert flags and all(flags)
    use_reference(net)
    assert not any(m.fast for m in net.modules() if hasattr(m, "fast"))
    use_reference(net, False)
    assert all(m.fast for m in net.modules() if hasattr(m, "fast"))


# -- the fast ops, each against PyTorch's, in float64 --------------------------------------------------


@pytest.mark.parametrize(
    "size, k, stride, padding, dilation",
    [
        (14, 3, 1, 1, 1), (14, 5, 1, 2, 1), (14, 3, 2, 1, 1), (14, 5, 2, 2, 1),  # separable convolutions
        (14, 3, 1, 2, 2), (14, 5, 1, 4, 2), (14, 3, 2, 2, 2), (13, 5, 2, 4, 2),  # dilated ones
        (7, 5, 1, 2, 1), (4, 5, 1, 4, 2), (9, 3, 1, 1, 1),
        (12, 3, 1, 2, 2), (16, 5, 1, 4, 2), (15, 5, 1, 4, 2), (16, 5, 2, 2, 1), (15, 3, 2, 1, 1),  # larger maps
        (16, 3, 1, 3, 3), (12, 3, 1, 1, 2),  # interleaved grids of 3; padding not a multiple of the dilation
    ],
)
@pytest.mark.parametrize("prune", [True, False])
def test_depthwise_conv2d_equals_conv2d(size: int, k: int, stride: int, padding: int, dilation: int, prune: bool) -> None:
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(3, 5, size, size, dtype=torch.float64, generator=gen, requires_grad=True)
    w = torch.randn(5, 1, k, k, dtype=torch.float64, generator=gen, requires_grad=True)
    out = depthwise_conv2d(x, w, stride, padding, dilation, prune)
    ref = F.conv2d(x, w, None, stride, padding, dilation, 5)
    torch.testing.assert_close(out, ref)
    g = torch.randn_like(ref)
    torch.testing.assert_close(
        torch.autograd.grad(out, (x, w), g, retain_graph=True), torch.autograd.grad(ref, (x, w), g, retain_graph=True)
    )
    # one gradient at a time: the pruned backward computes only the one asked for
    torch.testing.assert_close(torch.autograd.grad(out, x, g, retain_graph=True)[0], torch.autograd.grad(ref, x, g)[0])


@pytest.mark.parametrize(
    "size, k, stride, padding, dilation",
    [(9, 3, 1, 1, 1), (9, 5, 2, 2, 1), (9, 3, 1, 2, 2), (10, 3, 2, 1, 1), (10, 5, 1, 4, 2)],
)
@pytest.mark.parametrize("prune", [True, False])
def test_depthwise_conv2d_second_order(size: int, k: int, stride: int, padding: int, dilation: int, prune: bool) -> None:
    # Hessian-vector products of the estimators flow through the backward (9x9, 10x10: not the
    # matrix form; 10x10 dilated: the weight gradient on interleaved grids)
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(1, 2, size, size, dtype=torch.float64, generator=gen, requires_grad=True)
    w = torch.randn(2, 1, k, k, dtype=torch.float64, generator=gen, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda a, b: depthwise_conv2d(a, b, stride, padding, dilation, prune), (x, w))


@pytest.mark.parametrize("size, k, stride, padding, dilation", [(9, 5, 1, 2, 1), (10, 3, 1, 2, 2), (9, 3, 2, 1, 1)])
def test_depthwise_conv2d_third_order(size: int, k: int, stride: int, padding: int, dilation: int) -> None:
    # A backward differentiated twice (a look-ahead inside a look-ahead): the derivatives of the
    # differentiable backward's own pieces, checked against finite differences.
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(1, 2, size, size, dtype=torch.float64, generator=gen, requires_grad=True)
    w = torch.randn(2, 1, k, k, dtype=torch.float64, generator=gen, requires_grad=True)
    u = torch.randn(F.conv2d(x, w, None, stride, padding, dilation, 2).shape, dtype=torch.float64, generator=gen)

    def backward(a: Tensor, b: Tensor) -> tuple[Tensor, ...]:
        out = depthwise_conv2d(a * a, b, stride, padding, dilation)  # a * a: not linear in a
        return torch.autograd.grad(out, (a, b), u, create_graph=True)

    assert torch.autograd.gradgradcheck(backward, (x, w))


def test_engine_will_execute_falls_back_to_true_outside_a_backward_pass() -> None:
    x = torch.ones(2, requires_grad=True)
    node = (x * 2).grad_fn
    assert engine_will_execute(node)  # no backward running: the public fallback computes everything
    assert not engine_will_execute(None)


def test_engine_will_execute_sees_which_gradients_a_pass_wants() -> None:
    a = torch.ones(3, requires_grad=True)
    b = torch.ones(3, requires_grad=True)
    seen: dict[str, bool] = {}

    class Probe(torch.autograd.Function):
        @staticmethod
        def forward(ctx: object, u: Tensor, v: Tensor) -> Tensor:
            return u * v

        @staticmethod
        def backward(ctx: object, grad: Tensor) -> tuple[Tensor, Tensor]:
            nodes = ctx.next_functions  # type: ignore[attr-defined]
            seen["u"], seen["v"] = engine_will_execute(nodes[0][0]), engine_will_execute(nodes[1][0])
            return grad, grad

    torch.autograd.grad(Probe.apply(a, b).sum(), [a])
    assert seen == {"u": True, "v": False}
    Probe.apply(a, b).sum().backward()
    assert seen == {"u": True, "v": True}


@pytest.mark.parametrize("stride, groups, size", [(1, 1, 6), (1, 3, 5), (2, 3, 7), (2, 2, 6)])
def test_pointwise_conv_equals_conv2d(stride: int, groups: int, size: int) -> None:
    torch.manual_seed(5)
    fast = PointwiseConv2d(6, 12, stride, groups).double()
    ref = nn.Conv2d(6, 12, 1, stride=stride, groups=groups, bias=False).double()
    ref.load_state_dict(fast.state_dict())
    x = torch.randn(2, 6, size, size, dtype=torch.float64, requires_grad=True)
    out, expected = fast(x), ref(x)
    torch.testing.assert_close(out, expected)
    g = torch.randn_like(out)
    torch.testing.assert_close(
        torch.autograd.grad(out, (x, fast.weight), g), torch.autograd.grad(expected, (x, ref.weight), g)
    )


@pytest.mark.parametrize("size", [1, 2, 5, 7, 14])
@pytest.mark.parametrize("shared_grid", [False, True])
def test_reduction_ops_equal_reference(size: int, shared_grid: bool) -> None:
    # FactorizedReduce reads the odd pixels directly; with ``shared_grid`` it and the dilated
    # convolution start from the even pixels the caller took once. Odd and even sides, rectangular.
    torch.manual_seed(size)
    for make in (lambda: FactorizedReduce(3, 4, affine=False, copies=2), lambda: DilConv(3, 3, 5, 2, 4, 2, False, 2)):
        fast = make().double()
        ref = use_reference(copy.deepcopy(fast))
        x = torch.randn(2, 6, size, size + 1, dtype=torch.float64, requires_grad=True)
        a = F.relu(x)
        out = fast.activated(a, a[:, :, ::2, ::2] if shared_grid else None)
        expected = ref(x)
        torch.testing.assert_close(out, expected)
        g = torch.randn_like(out)
        params = list(fast.parameters())
        torch.testing.assert_close(
            torch.autograd.grad(out, [x, *params], g, create_graph=True),
            torch.autograd.grad(expected, [x, *ref.parameters()], g, create_graph=True),
        )


@pytest.mark.parametrize("size", [1, 2, 5, 14])
def test_average_pooling_equals_avg_pool2d(size: int) -> None:
    x = torch.randn(2, 3, size, size + 1, dtype=torch.float64, requires_grad=True)
    out = AvgPool3x3(1)(x)
    ref = F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)
    torch.testing.assert_close(out, ref)
    g = torch.randn_like(ref)
    torch.testing.assert_close(torch.autograd.grad(out, x, g), torch.autograd.grad(ref, x, g))


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("size", [1, 4, 7, 14])
def test_max_pooling_equals_max_pool2d(stride: int, size: int) -> None:
    # Integer values make many ties inside windows: the gradient must reach the same input as
    # PyTorch's (the first maximum of each window), not merely an equal value.
    gen = torch.Generator().manual_seed(size)
    x = torch.randint(-2, 3, (3, 4, size, size + 1), generator=gen).double().requires_grad_()
    out = MaxPool3x3(stride)(x)
    ref = F.max_pool2d(x, 3, stride, 1)
    assert torch.equal(out, ref)
    g = torch.randn_like(ref)
    assert torch.equal(torch.autograd.grad(out, x, g)[0], torch.autograd.grad(ref, x, g)[0])
    x.data[0, 0, 0, 0] = float("nan")  # NaN is a maximum in both layouts
    assert torch.equal(MaxPool3x3(stride)(x).isnan(), F.max_pool2d(x, 3, stride, 1).isnan())
    y = torch.randn(2, 3, size, size, dtype=torch.float64, generator=gen, requires_grad=True)
    assert torch.autograd.gradgradcheck(MaxPool3x3(stride), (y,))


def test_batch_norm_equals_pytorch_to_second_order() -> None:
    # Large enough for the fast path (more than 2**16 elements), float64, an input far from
    # centred; y**3 gives the loss a second derivative in x through the batch statistics.
    gen = torch.Generator().manual_seed(11)
    x = (3 * torch.randn(16, 8, 24, 24, dtype=torch.float64, generator=gen) + 2).requires_grad_()
    fast, ref = BatchNorm2d(8, affine=False).double(), nn.BatchNorm2d(8, affine=False).double()
    outs = [m(x) for m in (fast, ref)]
    torch.testing.assert_close(outs[0], outs[1])
    grads = [torch.autograd.grad((y**3).sum(), x, create_graph=True)[0] for y in outs]
    torch.testing.assert_close(grads[0], grads[1])
    v = torch.randn(x.shape, dtype=torch.float64, generator=gen)
    torch.testing.assert_close(torch.autograd.grad(grads[0], x, v)[0], torch.autograd.grad(grads[1], x, v)[0])
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(fast, name), getattr(ref, name), msg=name)


def test_batch_norm_paths_mix_in_one_graph() -> None:
    # One module on a small batch (PyTorch's kernel, which saves the running statistics) and then
    # a large one (the fast path, which updates them) in one graph: the backward must still run.
    m = BatchNorm2d(8, affine=False)
    small, large = torch.randn(2, 8, 4, 4, requires_grad=True), torch.randn(16, 8, 24, 24, requires_grad=True)
    loss = (m(small) ** 3).sum() + (m(large) ** 3).sum()
    grads = torch.autograd.grad(loss, [small, large], create_graph=True)
    torch.autograd.grad(grads[0].sum() + grads[1].sum(), [small, large])


def test_batch_norm_falls_back_where_the_fast_path_does_not_apply() -> None:
    x = torch.randn(16, 8, 24, 24)
    for m in (BatchNorm2d(8), BatchNorm2d(8, affine=False).eval(), BatchNorm2d(8, affine=False, momentum=None)):
        ref = nn.BatchNorm2d(8, affine=m.affine, momentum=m.momentum).train(m.training)
        ref.load_state_dict(m.state_dict())
        torch.testing.assert_close(m(x), ref(x))
        torch.testing.assert_close(m.running_var, ref.running_var)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        BatchNorm2d(3, affine=False)(torch.randn(1, 3, 1, 1))


# -- the same search ----------------------------------------------------------------------------------


def _search(fast: bool, estimator: str, dtype: torch.dtype, rounds: int = 2) -> tuple[object, Tensor]:
    gen = torch.Generator().manual_seed(7)
    x, y = torch.randn(64, 1, 12, 12, generator=gen, dtype=dtype), torch.randint(3, (64,), generator=gen)
    x[y == 1] += 0.5  # something to learn
    torch.manual_seed(0)
    net = SuperNet(C=4, num_classes=3, layers=3, in_channels=1, fast=fast).to(dtype)
    arch = net.new_architecture(torch.Generator().manual_seed(0)).to(dtype)
    train = [(x[i : i + 16], y[i : i + 16]) for i in (0, 16)]
    val = [(x[i : i + 16], y[i : i + 16]) for i in (32, 48)]

    def loss(batch: tuple[Tensor, Tensor]) -> Tensor:
        return F.cross_entropy(net(batch[0], arch), batch[1])

    problems = [
        mlo.Problem("weights", net, torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9), train, loss=loss),
        mlo.Problem("architecture", arch, torch.optim.Adam(arch.parameters(), lr=0.05), val, loss=loss),
    ]
    mlo.Engine(problems, {"architecture": ["weights"]}, estimator).run(rounds)
    return arch.genotype(), torch.cat([arch.alphas_normal.detach(), arch.alphas_reduce.detach()])


@pytest.mark.parametrize(
    "estimator, dtype, tol",
    # DARTS second order in float32 amplifies rounding (its central difference divides by a small
    # radius, then Adam normalises the step), so that the reference itself moves by 1e-2 after two
    # rounds when only the order of a sum changes; float64 shows that the searches are the same.
    [("finite_difference", torch.float64, 1e-9), ("first_order", torch.float32, 1e-4)],
)
def test_same_seed_same_search(estimator: str, dtype: torch.dtype, tol: float) -> None:
    genotype, alphas = _search(True, estimator, dtype)
    genotype_ref, alphas_ref = _search(False, estimator, dtype)
    assert genotype == genotype_ref
    assert float(alphas.abs().max()) > 0.05  # the search moved the logits well past their initial 1e-3
    _close(alphas, alphas_ref, "alphas", tol=tol)


def test_fast_and_reference_share_state_dicts() -> None:
    fast = SuperNet(C=4, num_classes=3, layers=3, in_channels=1)
    ref = use_reference(copy.deepcopy(fast))
    assert fast.state_dict().keys() == ref.state_dict().keys()
