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
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "PRIMITIVES",
    "OPS",
    "make_op",
    "ReLUConvBN",
    "DepthwiseConv2d",
    "DilConv",
    "SepConv",
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


class ReLUConvBN(nn.Module):
    """ReLU, then a (strided) convolution, then BatchNorm."""

    def __init__(
        self, C_in: int, C_out: int, kernel_size: int, stride: int, padding: int, affine: bool = True
    ) -> None:
        super().__init__()
        self.op = nn.Sequential(
            nn.ReLU(inplace=False),
            nn.Conv2d(C_in, C_out, kernel_size, stride=stride, padding=padding, bias=False),
            nn.BatchNorm2d(C_out, affine=affine),
        )

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


class DepthwiseConv2d(nn.Module):
    """Depthwise convolution: one ``k x k`` filter per channel, weight (C, 1, k, k) as nn.Conv2d.

    On CPU, for maps of at most 64 pixels (unless the output has many more pixels than the
    kernel has taps: 3x3 at stride 1 on 8x8 stays a convolution), it is computed as a
    per-channel matrix product with a fixed 0/1 shift tensor: the same linear map, 2-20x faster
    forward and backward there than PyTorch's CPU depthwise kernels, and differentiable to any
    order like every other op. Elsewhere it is ``F.conv2d``.
    """

    def __init__(self, C: int, kernel_size: int, stride: int = 1, padding: int = 0, dilation: int = 1) -> None:
        super().__init__()
        self.C, self.k = C, kernel_size
        self.stride, self.padding, self.dilation = stride, padding, dilation
        self.weight = nn.Parameter(torch.empty(C, 1, kernel_size, kernel_size))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # nn.Conv2d's default

    def forward(self, x: Tensor) -> Tensor:
        B, C, H, W = x.shape
        k_eff = self.dilation * (self.k - 1) + 1
        Ho = (H + 2 * self.padding - k_eff) // self.stride + 1
        Wo = (W + 2 * self.padding - k_eff) // self.stride + 1
        # Matrix form costs ~ (in pixels) x (out pixels) per channel, the CPU kernel ~ its taps;
        # measured break-even: out pixels about 4x the taps of the effective kernel.
        if x.device.type != "cpu" or H * W > 64 or Ho * Wo > 4 * k_eff * k_eff:
            return F.conv2d(x, self.weight, None, self.stride, self.padding, self.dilation, groups=C)
        S = _shift_tensor(H, W, self.k, self.stride, self.padding, self.dilation, x.device, x.dtype)
        T = (self.weight.view(C, -1) @ S.view(S.shape[0], -1)).view(C, Ho * Wo, H * W)  # per-channel maps
        y = torch.bmm(x.reshape(B, C, H * W).transpose(0, 1), T.transpose(1, 2))  # (C, B, Ho * Wo)
        return y.transpose(0, 1).reshape(B, C, Ho, Wo)

    def extra_repr(self) -> str:
        return f"{self.C}, kernel_size={self.k}, stride={self.stride}, padding={self.padding}, dilation={self.dilation}"


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
            nn.Conv2d(m * C_in, m * C_out, 1, groups=m, bias=False),
            nn.BatchNorm2d(m * C_out, affine=affine),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.op(x)


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
            raise ValueError(f"FactorizedReduce needs an even number of output channels, got {C_out}")
        m = self.copies = copies
        self.relu = nn.ReLU(inplace=False)
        self.conv_1 = nn.Conv2d(m * C_in, m * C_out // 2, 1, stride=2, groups=m, bias=False)
        self.conv_2 = nn.Conv2d(m * C_in, m * C_out // 2, 1, stride=2, groups=m, bias=False)
        self.bn = nn.BatchNorm2d(m * C_out, affine=affine)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(x)
        shifted = F.pad(x[:, :, 1:, 1:], (0, 1, 0, 1))  # same size as x, offset by one pixel
        a, b = self.conv_1(x), self.conv_2(shifted)  # (B, m * C_out / 2, H', W') each
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
    "avg_pool_3x3": lambda C, stride, affine, m: nn.AvgPool2d(
        3, stride=stride, padding=1, count_include_pad=False
    ),
    "max_pool_3x3": lambda C, stride, affine, m: nn.MaxPool2d(3, stride=stride, padding=1),
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
        raise ValueError(f"unknown DARTS operation {name!r}; known: {', '.join(PRIMITIVES)}") from None
    if copies < 1:
        raise ValueError(f"copies must be at least 1, got {copies}")
    return factory(C, stride, affine, copies)
