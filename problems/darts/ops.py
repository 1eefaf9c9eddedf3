"""The DARTS candidate operations: the eight primitives of the search space and their parts.

Every operation maps ``(B, C, H, W)`` to ``(B, C_out, H', W')`` with ``H' = H`` at stride 1 and
``H' = ceil(H / 2)`` at stride 2, for any ``H >= 1`` (so an 8x8 input survives two or three
reductions). ``affine=False`` is the search setting (DARTS keeps BatchNorm without learnable
scale in the supernet); the discrete evaluation network uses ``affine=True``.

``copies=m`` builds m independent copies of an op that run side by side on a stacked input
``(B, m * C, H, W)`` (grouped convolutions; copy ``e`` owns channels ``e*C .. (e+1)*C - 1`` of
input, output and every weight's first dimension). The supernet uses it to run one op on all the
edges leaving a state with a few large kernels instead of many small ones; the maths is that
of m separate ops.

Fast and reference paths: every module here with a ``fast`` attribute (`DepthwiseConv2d`,
`PointwiseConv2d`, `AvgPool3x3`, `MaxPool3x3`, `BatchNorm2d`) computes the same function in two
ways. ``fast=True`` (the default) picks, on the CPU, the formulation that runs fastest there (see each class); ``fast=False`` is the plain
op-by-op computation with ``F.conv2d``, kept as the reference the tests compare against.
`use_reference` switches a whole network.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.grad import conv2d_input, conv2d_weight

from mlo.errors import ConfigError

__all__ = [
    "PRIMITIVES",
    "OPS",
    "make_op",
    "ReLUConvBN",
    "DepthwiseConv2d",
    "PointwiseConv2d",
    "depthwise_conv2d",
    "use_reference",
    "engine_will_execute",
    "DilConv",
    "SepConv",
    "AvgPool3x3",
    "MaxPool3x3",
    "BatchNorm2d",
    "Identity",
    "Zero",
    "FactorizedReduce",
]

# The DARTS order. Architecture weights index their last dimension by this list.
PRIMITIVES: tuple[str, ...] = (
    "none",
    "max_pool_3x3",
    "avg_pool_3x3",
    "skip_connect",
    "sep_conv_3x3",
    "sep_conv_5x5",
    "dil_conv_3x3",
    "dil_conv_5x5",
)


class _BatchNormTraining(torch.autograd.Function):
    """Training-mode BatchNorm without affine parameters, ``y = (x - mean) * invstd`` with the
    batch's per-channel mean and ``invstd = 1 / sqrt(var + eps)`` (biased variance), updating the
    running statistics as ``nn.BatchNorm2d`` does.

    PyTorch's CPU BatchNorm accumulates float32 in double, which makes it several times slower
    than the float32 reductions here (a sum, then the sum of squares of the centred input). The
    backward is the operator behind ``nn.BatchNorm2d``'s own backward,
    ``torch.ops.aten.native_batch_norm_backward`` (a documented Core ATen IR operator; PyTorch has
    no Python wrapper for it), given these statistics: its derivative is defined, so every higher
    derivative is PyTorch's too."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, running_mean: Tensor, running_var: Tensor, momentum: float, eps: float) -> Tensor:
        C = x.shape[1]
        n = x.numel() // C
        mean = x.sum((0, 2, 3)).div_(n)
        y = x - mean.view(1, C, 1, 1)
        var = (y * y).sum((0, 2, 3)).div_(n)
        invstd = (var + eps).rsqrt_()
        y.mul_(invstd.view(1, C, 1, 1))
        # Updated through ``.data``, as PyTorch's kernel updates them: without a version bump, which
        # would fail the backward of an earlier BatchNorm call in the same graph that saved them.
        running_mean.data.mul_(1 - momentum).add_(mean, alpha=momentum)
        running_var.data.mul_(1 - momentum).add_(var, alpha=momentum * n / (n - 1))  # unbiased, as PyTorch
        ctx.save_for_backward(x, mean, invstd)
        ctx.eps = eps
        return y

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, mean, invstd = ctx.saved_tensors
        grad_x = torch.ops.aten.native_batch_norm_backward(
            grad, x, None, None, None, mean, invstd, True, ctx.eps, [True, False, False]
        )[0]
        return grad_x, None, None, None, None


# Up to this many elements the fixed cost of a Python autograd.Function outweighs what
# `_BatchNormTraining` saves (measured on the BatchNorms of DARTS supernets, float32, one thread).
_SMALL_BATCH_NORM = 1 << 16


class BatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` (same parameters, buffers and function) with a faster CPU path where the
    supernet uses it: in training mode, without affine parameters, with running statistics and a
    fixed momentum, ``fast=True`` computes inputs of more than ``_SMALL_BATCH_NORM`` elements by
    `_BatchNormTraining` (forward 1.4-2.7x as fast as PyTorch's kernel there, float32, one
    thread). Any other case, or ``fast=False`` (the reference): ``nn.BatchNorm2d.forward``."""

    def __init__(self, num_features: int, *args: Any, fast: bool = True, **kwargs: Any) -> None:
        super().__init__(num_features, *args, **kwargs)
        self.fast = fast

    def forward(self, x: Tensor) -> Tensor:
        if not (
            self.fast and self.training and not self.affine and self.track_running_stats and self.momentum is not None
            and x.device.type == "cpu" and x.dim() == 4 and x.numel() > _SMALL_BATCH_NORM
        ):
            return super().forward(x)
        assert self.running_mean is not None and self.running_var is not None and self.num_batches_tracked is not None
        self.num_batches_tracked.add_(1)
        out = _BatchNormTraining.apply(x, self.running_mean, self.running_var, self.momentum, self.eps)
        assert isinstance(out, Tensor)
        return out


class ReLUConvBN(nn.Module):
    """ReLU, then a (strided) convolution, then BatchNorm."""

    def __init__(
        self, C_in: int, C_out: int, kernel_size: int, stride: int, padding: int, affine: bool = True
    ) -> None:
        super().__init__()
        conv: nn.Module = (
            PointwiseConv2d(C_in, C_out, stride=stride)
            if kernel_size == 1 and padding == 0
            else nn.Conv2d(C_in, C_out, kernel_size, stride=stride, padding=padding, bias=False)
        )
        self.op = nn.Sequential(nn.ReLU(inplace=False), conv, BatchNorm2d(C_out, affine=affine))

    def forward(self, x: Tensor) -> Tensor:
        return self.op(x)


@functools.lru_cache(maxsize=256)
def _shift_tensor(
    H: int, W: int, k: int, stride: int, padding: int, dilation: int, device: torch.device, dtype: torch.dtype
) -> Tensor:
    """0/1 tensor S (k*k, H'*W', H*W): S[tap, out pixel, in pixel] = 1 where that tap reads that pixel.

    A depthwise convolution is then ``y[c] = (sum_tap w[c, tap] * S[tap]) @ x[c]``; taps that
    fall in the zero padding have no 1 anywhere."""
    Ho = (H + 2 * padding - dilation * (k - 1) - 1) // stride + 1
    Wo = (W + 2 * padding - dilation * (k - 1) - 1) // stride + 1
    taps = torch.arange(k)
    rows = torch.arange(Ho)[None, :] * stride - padding + taps[:, None] * dilation  # (k, Ho)
    cols = torch.arange(Wo)[None, :] * stride - padding + taps[:, None] * dilation  # (k, Wo)
    sy = (rows[:, :, None] == torch.arange(H)).to(dtype)  # (k, Ho, H)
    sx = (cols[:, :, None] == torch.arange(W)).to(dtype)  # (k, Wo, W)
    s = torch.einsum("aiy,bjx->abijyx", sy, sx)  # (k, k, Ho, Wo, H, W)
    return s.reshape(k * k, Ho * Wo, H * W).to(device)


def engine_will_execute(node: Any) -> bool:
    """Whether the running backward pass will execute ``node`` (an autograd node), i.e. whether
    the gradient flowing into it is wanted. A custom ``autograd.Function`` only learns which of
    its inputs require grad, not which gradients this pass asks for (``autograd.grad(loss,
    arch.parameters())`` wants no weight gradient), so it asks the engine through
    ``torch._C._will_engine_execute_node``, the private call behind the public
    ``torch.autograd.graph.register_multi_grad_hook``. Public fallback, where that call is
    missing or refuses (no backward running): True, compute the gradient. Measured reason: the
    depthwise weight gradient is about half the CPU time of a supernet backward pass that only
    needs the architecture's gradient (DARTS's finite-difference evaluations)."""
    if node is None:
        return False
    will_execute = getattr(torch._C, "_will_engine_execute_node", None)
    if will_execute is None:
        return True
    try:
        return bool(will_execute(node))
    except RuntimeError:
        return True


class _DepthwiseBackward(torch.autograd.Function):
    """``F.conv2d(x, weight, groups=C)`` with its backward written as other convolutions.

    PyTorch's CPU depthwise backward is slow on the shapes of a DARTS supernet (5-20x its
    forward for 5x5 and dilated kernels, float32, one thread). Here the input gradient is a
    forward convolution with the flipped kernel (`_depthwise_input_grad`), and the weight
    gradient is taken the fastest way measured (`_depthwise_weight_grad`), and only when the
    backward pass wants it (``prune``:
    `engine_will_execute`; ``prune=False`` computes it whenever the weight requires grad). The
    backward is itself made of differentiable ops, so higher derivatives (Hessian-vector
    products) flow through it. Written in the ``forward(ctx, ...)`` form: with a separate
    ``setup_context``, ``Function.apply`` binds the arguments to the signature of ``forward`` on
    every call, a fixed cost that is large beside these small convolutions.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, stride: int, padding: int, dilation: int, prune: bool) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.conv = (stride, padding, dilation, prune)
        return F.conv2d(x, weight, None, stride, padding, dilation, x.shape[1])

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        stride, padding, dilation, prune = ctx.conv
        grad_x = grad_w = None
        # Differentiated again (create_graph): through the fast paths here too, not PyTorch's
        # slow derivatives of its own depthwise kernels.
        again = torch.is_grad_enabled()
        if ctx.needs_input_grad[0] and (not prune or engine_will_execute(ctx.next_functions[0][0])):
            grad_x = _depthwise_input_grad(grad, weight, x.shape, stride, padding, dilation, again)
        if ctx.needs_input_grad[1] and (not prune or engine_will_execute(ctx.next_functions[1][0])):
            if again:
                grad_w = _DepthwiseWeightGrad.apply(x, grad, weight.shape, stride, padding, dilation)
            else:
                grad_w = _depthwise_weight_grad(x, grad, weight.shape, stride, padding, dilation)
        return grad_x, grad_w, None, None, None, None


class _DepthwiseWeightGrad(torch.autograd.Function):
    """The weight gradient of a depthwise convolution, ``(x, grad) -> grad_w``, as a function
    that is itself differentiated (Hessian-vector products through a backward pass). It is
    bilinear: ``<v, grad_w(x, grad)> = <grad, conv(x, v)>``, so its derivative in ``grad`` is the
    convolution of ``x`` with ``v`` and its derivative in ``x`` is that convolution's input
    gradient, both by the fast paths here (PyTorch's derivative of its CPU weight-gradient kernel
    runs transposed depthwise convolutions, several times slower)."""

    @staticmethod
    def forward(
        ctx: Any, x: Tensor, grad: Tensor, shape: torch.Size, stride: int, padding: int, dilation: int
    ) -> Tensor:
        ctx.save_for_backward(x, grad)
        ctx.conv = (stride, padding, dilation)
        return _depthwise_weight_grad(x, grad, shape, stride, padding, dilation)

    @staticmethod
    def backward(ctx: Any, v: Tensor) -> tuple[Tensor | None, ...]:
        x, grad = ctx.saved_tensors
        stride, padding, dilation = ctx.conv
        again = torch.is_grad_enabled()
        d_x = d_grad = None
        if ctx.needs_input_grad[0]:
            d_x = _depthwise_input_grad(grad, v, x.shape, stride, padding, dilation, again)
        if ctx.needs_input_grad[1]:
            d_grad = depthwise_conv2d(x, v, stride, padding, dilation)
        return d_x, d_grad, None, None, None, None


def _depthwise_input_grad(
    grad: Tensor, weight: Tensor, shape: torch.Size, stride: int, padding: int, dilation: int, again: bool = False
) -> Tensor:
    """The input gradient of a depthwise convolution. At stride 1, a forward convolution of the
    output gradient with the flipped kernel (same dilation): PyTorch's CPU transposed depthwise
    kernel is several times slower; with ``again`` (it will be differentiated) that convolution
    is `depthwise_conv2d`, whose own backward is fast. At larger strides PyTorch's own (spreading
    the gradient onto the input grid first measured no faster)."""
    C, k = shape[1], weight.shape[-1]
    reach = dilation * (k - 1)
    if stride == 1 and padding <= reach:
        flipped = weight.flip(-2, -1)
        if again:
            return depthwise_conv2d(grad, flipped, 1, reach - padding, dilation)
        return F.conv2d(grad, flipped, None, 1, reach - padding, dilation, C)
    return conv2d_input(shape, weight, grad, stride, padding, dilation, C)


def _depthwise_weight_grad(
    x: Tensor, grad: Tensor, shape: torch.Size, stride: int, padding: int, dilation: int
) -> Tensor:
    """The weight gradient of a depthwise convolution (weight of ``shape``), the fastest way
    measured on the CPU. A stride-1 convolution dilated by d reads d x d interleaved grids of pixels
    independently, so on maps whose sides (and padding) are multiples of d it is the undilated
    convolution of the d * d grids stacked along the batch, whose weight gradient PyTorch computes
    several times faster. Kernels of 5 x 5 and more take it in the channels-last layout (oneDNN's
    fast kernel there), 3 x 3 ones in the default layout, where they are faster."""
    B, C, H, W = x.shape
    k = shape[-1]
    d = dilation
    if d > 1 and stride == 1 and H % d == 0 and W % d == 0 and padding % d == 0:
        x, grad = _interleaved_grids(x, d), _interleaved_grids(grad, d)
        padding, d = padding // d, 1
    if d == 1 and k >= 5:
        x, grad = x.contiguous(memory_format=torch.channels_last), grad.contiguous(memory_format=torch.channels_last)
    return conv2d_weight(x, shape, grad, stride, padding, d, C)


def _interleaved_grids(x: Tensor, d: int) -> Tensor:
    """(B, C, H, W) -> (d * d * B, C, H / d, W / d): grid (a, b) holds the pixels (d i + a, d j + b)."""
    B, C, H, W = x.shape
    grids = x.view(B, C, H // d, d, W // d, d).permute(3, 5, 0, 1, 2, 4)
    return grids.reshape(d * d * B, C, H // d, W // d)


def depthwise_conv2d(
    x: Tensor, weight: Tensor, stride: int = 1, padding: int = 0, dilation: int = 1, prune: bool = True
) -> Tensor:
    """The depthwise convolution ``F.conv2d(x, weight, None, stride, padding, dilation, groups=C)``
    (x: (B, C, H, W), weight: (C, 1, k, k)), computed the fastest way measured on the CPU:

    - maps of at most 64 pixels (unless the output has many more pixels than the kernel has
      taps): a per-channel matrix product with a fixed 0/1 shift tensor, 2-20x faster forward
      and backward there than PyTorch's CPU depthwise kernels;
    - stride equal to the dilation with padding a multiple of it (DARTS's dilated convolutions
      in reduction cells): the same undilated convolution on every ``stride``-th pixel, which is
      all that such a convolution reads;
    - otherwise ``F.conv2d`` with a faster backward that skips unwanted gradients
      (`_DepthwiseBackward`; ``prune=False``: without that skipping).

    Every path is the same linear map and differentiable to any order. Elsewhere than on the
    CPU it is ``F.conv2d``.
    """
    if x.device.type != "cpu":
        return F.conv2d(x, weight, None, stride, padding, dilation, x.shape[1])
    B, C, H, W = x.shape
    k = weight.shape[-1]
    k_eff = dilation * (k - 1) + 1
    Ho = (H + 2 * padding - k_eff) // stride + 1
    Wo = (W + 2 * padding - k_eff) // stride + 1
    # Matrix form costs ~ (in pixels) x (out pixels) per channel, the CPU kernel ~ its taps;
    # measured break-even: out pixels about 4x the taps of the effective kernel.
    if H * W <= 64 and Ho * Wo <= 4 * k_eff * k_eff:
        S = _shift_tensor(H, W, k, stride, padding, dilation, x.device, x.dtype)
        T = (weight.view(C, -1) @ S.view(S.shape[0], -1)).view(C, Ho * Wo, H * W)  # per-channel maps
        y = torch.bmm(x.reshape(B, C, H * W).transpose(0, 1), T.transpose(1, 2))  # (C, B, Ho * Wo)
        return y.transpose(0, 1).reshape(B, C, Ho, Wo)
    if dilation > 1 and stride == dilation and padding % dilation == 0:
        # y[i] = sum_a w[a] x[s i + s a - p] reads only pixels s * (i + a - p / s)
        return depthwise_conv2d(x[:, :, ::stride, ::stride], weight, 1, padding // stride, 1, prune)
    out = _DepthwiseBackward.apply(x, weight, stride, padding, dilation, prune)
    assert isinstance(out, Tensor)
    return out


class DepthwiseConv2d(nn.Module):
    """Depthwise convolution: one ``k x k`` filter per channel, weight (C, 1, k, k) as nn.Conv2d.

    ``fast=True``: computed by `depthwise_conv2d`; ``fast=False``: ``F.conv2d`` (the reference).
    """

    def __init__(
        self, C: int, kernel_size: int, stride: int = 1, padding: int = 0, dilation: int = 1, fast: bool = True
    ) -> None:
        super().__init__()
        self.C, self.k = C, kernel_size
        self.stride, self.padding, self.dilation = stride, padding, dilation
        self.fast = fast
        self.weight = nn.Parameter(torch.empty(C, 1, kernel_size, kernel_size))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # nn.Conv2d's default

    def forward(self, x: Tensor) -> Tensor:
        if self.fast:
            return depthwise_conv2d(x, self.weight, self.stride, self.padding, self.dilation)
        return F.conv2d(x, self.weight, None, self.stride, self.padding, self.dilation, self.C)

    @property
    def reads_grid(self) -> bool:
        """Whether the fast path reads only every ``stride``-th pixel (stride equal to the dilation,
        padding a multiple of it): then `on_grid` computes it from that grid."""
        s = self.stride
        return self.fast and s > 1 and self.dilation == s and self.padding % s == 0

    def on_grid(self, grid: Tensor) -> Tensor:
        """The convolution from ``x[:, :, ::stride, ::stride]`` (see `reads_grid`)."""
        return depthwise_conv2d(grid, self.weight, 1, self.padding // self.stride, 1)

    def extra_repr(self) -> str:
        return f"{self.C}, kernel_size={self.k}, stride={self.stride}, padding={self.padding}, dilation={self.dilation}"


class PointwiseConv2d(nn.Conv2d):
    """A 1x1 convolution without bias (optionally grouped and strided): an ``nn.Conv2d`` with the
    same parameters.

    ``fast=True`` computes it on the CPU as a batched matrix product over the groups (after
    taking every ``stride``-th pixel), whose forward and backward run 2-4x faster there than
    PyTorch's CPU kernels for these small grouped 1x1 convolutions; ``fast=False``, or another
    device: ``nn.Conv2d.forward`` (the reference).
    """

    def __init__(self, C_in: int, C_out: int, stride: int = 1, groups: int = 1, fast: bool = True) -> None:
        super().__init__(C_in, C_out, 1, stride=stride, groups=groups, bias=False)
        self.fast = fast

    def forward(self, x: Tensor) -> Tensor:
        if not self.fast or x.device.type != "cpu":
            return super().forward(x)
        s = self.stride[0]
        return self.on_grid(x[:, :, ::s, ::s] if s > 1 else x)

    def on_grid(self, x: Tensor) -> Tensor:
        """The fast computation on an input already taken at every ``stride``-th pixel."""
        g = self.groups
        B, C_in, H, W = x.shape
        C_out = self.out_channels
        w = self.weight.view(g, C_out // g, C_in // g)
        y = torch.matmul(w, x.reshape(B, g, C_in // g, H * W))  # (B, g, C_out / g, H * W)
        return y.view(B, C_out, H, W)


def use_reference(module: nn.Module, reference: bool = True) -> nn.Module:
    """Switch every submodule with a ``fast`` attribute to the reference computation
    (``reference=True``) or back to the fast one; returns ``module``."""
    for m in module.modules():
        if hasattr(m, "fast"):
            setattr(m, "fast", not reference)
    return module


class DilConv(nn.Module):
    """ReLU, depthwise (dilated) convolution, pointwise convolution, BatchNorm."""

    def __init__(
        self,
        C_in: int,
        C_out: int,
        kernel_size: int,
        stride: int,
        padding: int,
        dilation: int,
        affine: bool = True,
        copies: int = 1,
    ) -> None:
        super().__init__()
        m = copies
        self.op = nn.Sequential(
            nn.ReLU(inplace=False),
            DepthwiseConv2d(m * C_in, kernel_size, stride, padding, dilation),
            PointwiseConv2d(m * C_in, m * C_out, groups=m),
            BatchNorm2d(m * C_out, affine=affine),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.op(x)

    def activated(self, x: Tensor, grid: Tensor | None = None) -> Tensor:
        """The op on an input that has already been through its ReLU (``relu(x)`` given).

        ``grid``: ``x[:, :, ::2, ::2]`` where the caller has it (the ops of a reduction edge share
        it); a depthwise convolution that reads only that grid then starts from it."""
        dw = self.op[1]
        assert isinstance(dw, DepthwiseConv2d)
        y = dw.on_grid(grid) if grid is not None and dw.stride == 2 and dw.reads_grid else dw(x)
        return self.op[3](self.op[2](y))


class SepConv(nn.Module):
    """Separable convolution applied twice (the first one carries the stride), as in DARTS."""

    def __init__(
        self,
        C_in: int,
        C_out: int,
        kernel_size: int,
        stride: int,
        padding: int,
        affine: bool = True,
        copies: int = 1,
    ) -> None:
        super().__init__()
        self.op = nn.Sequential(
            DilConv(C_in, C_in, kernel_size, stride, padding, 1, affine, copies),
            DilConv(C_in, C_out, kernel_size, 1, padding, 1, affine, copies),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.op(x)

    def activated(self, x: Tensor) -> Tensor:
        """The op on an input that has already been through its first ReLU."""
        first = self.op[0]
        assert isinstance(first, DilConv)
        return self.op[1](first.activated(x))


class AvgPool3x3(nn.Module):
    """3x3 average pooling with padding 1, the padding left out of the count (DARTS's
    ``avg_pool_3x3``).

    ``fast=True`` at stride 1 on the CPU: the 3x3 window sum as a sum of three column shifts then
    three row shifts, divided by the per-pixel count; forward and backward run about twice as
    fast there as PyTorch's CPU pooling kernels. Otherwise (and ``fast=False``, the reference)
    ``F.avg_pool2d``.
    """

    def __init__(self, stride: int, fast: bool = True) -> None:
        super().__init__()
        self.stride, self.fast = stride, fast

    def forward(self, x: Tensor) -> Tensor:
        if not self.fast or self.stride != 1 or x.device.type != "cpu":
            return F.avg_pool2d(x, 3, self.stride, 1, count_include_pad=False)
        H, W = x.shape[-2:]
        xp = F.pad(x, (1, 1, 1, 1))
        rows = xp[..., :-2] + xp[..., 1:-1] + xp[..., 2:]  # (B, C, H + 2, W)
        window = rows[..., :-2, :] + rows[..., 1:-1, :] + rows[..., 2:, :]  # (B, C, H, W)
        return window / _window_count(H, W, x.device, x.dtype)

    def extra_repr(self) -> str:
        return f"stride={self.stride}"


class MaxPool3x3(nn.Module):
    """3x3 max pooling with padding 1 (DARTS's ``max_pool_3x3``), an ``nn.MaxPool2d(3, stride, 1)``.

    ``fast=True`` on the CPU: PyTorch's own max pooling run on a channels-last copy of the input,
    the result copied back. Both layouts take the first maximum of each window in the same order
    (NaN counting as a maximum), so the values and the positions that receive the gradient are the
    same; the channels-last kernel runs 2-8x faster forward and backward on the small maps and
    batches of a CPU search (per-plane loops over a few dozen pixels are what the default layout
    pays for). ``fast=False`` or another device: ``F.max_pool2d`` as it is (the reference).
    """

    def __init__(self, stride: int, fast: bool = True) -> None:
        super().__init__()
        self.stride, self.fast = stride, fast

    def forward(self, x: Tensor) -> Tensor:
        if not self.fast or x.device.type != "cpu" or x.dim() != 4:
            return F.max_pool2d(x, 3, self.stride, 1)
        y = F.max_pool2d(x.contiguous(memory_format=torch.channels_last), 3, self.stride, 1)
        return y.contiguous()

    def extra_repr(self) -> str:
        return f"stride={self.stride}"


@functools.lru_cache(maxsize=64)
def _window_count(H: int, W: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """(H, W): how many pixels of each 3x3 window (padding 1) lie inside an H x W map."""
    rows = torch.full((H,), 3.0)
    cols = torch.full((W,), 3.0)
    rows[0] -= 1
    rows[-1] -= 1
    cols[0] -= 1
    cols[-1] -= 1
    return (rows[:, None] * cols[None, :]).to(device, dtype)


class Identity(nn.Module):
    """The identity (skip connection at stride 1)."""

    def forward(self, x: Tensor) -> Tensor:
        return x


class Zero(nn.Module):
    """The `none` operation: zeros of the output shape (strided like the other ops)."""

    def __init__(self, stride: int) -> None:
        super().__init__()
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        if self.stride == 1:
            return x.mul(0.0)
        return x[:, :, :: self.stride, :: self.stride].mul(0.0)


class FactorizedReduce(nn.Module):
    """Halve the resolution with two 1x1 stride-2 convolutions on offset grids, concatenated.

    The second path sees the input shifted by one pixel; it is padded back on the bottom/right
    so both paths give ``ceil(H / 2)`` for odd sizes too (DARTS assumed even sizes).
    """

    def __init__(self, C_in: int, C_out: int, affine: bool = True, copies: int = 1) -> None:
        super().__init__()
        if C_out % 2:
            raise ConfigError(f"FactorizedReduce needs an even number of output channels, got {C_out}")
        m = self.copies = copies
        self.relu = nn.ReLU(inplace=False)
        self.conv_1 = PointwiseConv2d(m * C_in, m * C_out // 2, stride=2, groups=m)
        self.conv_2 = PointwiseConv2d(m * C_in, m * C_out // 2, stride=2, groups=m)
        self.bn = BatchNorm2d(m * C_out, affine=affine)

    def forward(self, x: Tensor) -> Tensor:
        return self.activated(self.relu(x))

    def activated(self, x: Tensor, grid: Tensor | None = None) -> Tensor:
        """The op on an input that has already been through its ReLU. ``grid``: ``x[:, :, ::2, ::2]``
        where the caller has it (see `DilConv.activated`)."""
        fast = self.conv_1.fast and x.device.type == "cpu"
        a = self.conv_1.on_grid(grid) if fast and grid is not None else self.conv_1(x)  # (B, m C_out / 2, H', W')
        if fast:
            # What the stride-2 convolution of the shifted map reads: the odd pixels, and the
            # padding's zero at the end of an odd side.
            H, W = x.shape[-2:]
            odd = x[:, :, 1::2, 1::2]
            b = self.conv_2.on_grid(F.pad(odd, (0, W % 2, 0, H % 2)) if H % 2 or W % 2 else odd)
        else:
            shifted = F.pad(x[:, :, 1:, 1:], (0, 1, 0, 1))  # same size as x, offset by one pixel
            b = self.conv_2(shifted)
        if self.copies == 1:
            return self.bn(torch.cat([a, b], dim=1))
        # Per copy: its half from conv_1, then its half from conv_2.
        B, _, H, W = a.shape
        out = torch.stack([a.view(B, self.copies, -1, H, W), b.view(B, self.copies, -1, H, W)], dim=2)
        return self.bn(out.view(B, -1, H, W))


OpFactory = Callable[[int, int, bool, int], nn.Module]

# name -> factory(C, stride, affine, copies). Input and output channels are both copies * C.
# Parameter-free ops act channel by channel, so copies of them need nothing special.
OPS: dict[str, OpFactory] = {
    "none": lambda C, stride, affine, m: Zero(stride),
    "avg_pool_3x3": lambda C, stride, affine, m: AvgPool3x3(stride),
    "max_pool_3x3": lambda C, stride, affine, m: MaxPool3x3(stride),
    "skip_connect": lambda C, stride, affine, m: (
        Identity() if stride == 1 else FactorizedReduce(C, C, affine, m)
    ),
    "sep_conv_3x3": lambda C, stride, affine, m: SepConv(C, C, 3, stride, 1, affine, m),
    "sep_conv_5x5": lambda C, stride, affine, m: SepConv(C, C, 5, stride, 2, affine, m),
    "dil_conv_3x3": lambda C, stride, affine, m: DilConv(C, C, 3, stride, 2, 2, affine, m),
    "dil_conv_5x5": lambda C, stride, affine, m: DilConv(C, C, 5, stride, 4, 2, affine, m),
}


def make_op(name: str, C: int, stride: int, affine: bool, copies: int = 1) -> nn.Module:
    """Build the primitive ``name`` on ``C`` channels (``copies`` stacked independent copies).

    Raises ValueError for an unknown name."""
    try:
        factory = OPS[name]
    except KeyError:
        raise ConfigError(f"unknown DARTS operation {name!r}; known: {', '.join(PRIMITIVES)}") from None
    if copies < 1:
        raise ConfigError(f"copies must be at least 1, got {copies}")
    return factory(C, stride, affine, copies)
