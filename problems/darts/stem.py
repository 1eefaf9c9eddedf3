"""The skeleton shared by the supernet and the discrete network: stems and reduction placement.

Two stems, as DARTS: the CIFAR stem (one 3x3 convolution, resolution kept: right for 8x8 up to
32x32 inputs) and the ImageNet stem (three stride-2 convolutions, 224 -> 28). Reduction cells sit
at ``layers // 3`` and ``2 * layers // 3``.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

from torch import Tensor, nn

from mlo.errors import ConfigError

__all__ = ["StemKind", "Stem", "build_stem", "stem_for", "reduction_indices"]

StemKind = Literal["cifar", "imagenet"]


def reduction_indices(layers: int) -> frozenset[int]:
    """Cells that halve the resolution: ``layers // 3`` and ``2 * layers // 3`` (as DARTS)."""
    if layers < 1:
        raise ConfigError(f"need at least one cell, got layers={layers}")
    return frozenset({layers // 3, 2 * layers // 3})


def stem_for(input_shape: tuple[int, int, int]) -> StemKind:
    """The stem DARTS would use for inputs of shape (C, H, W): ImageNet's above 64 pixels."""
    _, h, w = input_shape
    return "imagenet" if min(h, w) > 64 else "cifar"


class Stem(NamedTuple):
    """A stem module mapping x to the two first cell inputs (s0, s1), and their channels."""

    module: nn.Module
    C_prev_prev: int
    C_prev: int
    reduction_prev: bool  # True when s0 has twice the resolution of s1


class _CifarStem(nn.Module):
    def __init__(self, in_channels: int, C_out: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, C_out, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(C_out)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        s = self.bn(self.conv(x))  # (B, C_out, H, W)
        return s, s


class _ImageNetStem(nn.Module):
    def __init__(self, in_channels: int, C: int) -> None:
        super().__init__()
        self.stem0 = nn.Sequential(
            nn.Conv2d(in_channels, C // 2, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(C // 2),
            nn.ReLU(inplace=True),
            nn.Conv2d(C // 2, C, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(C),
        )
        self.stem1 = nn.Sequential(
            nn.ReLU(inplace=False),
            nn.Conv2d(C, C, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(C),
        )

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        s0 = self.stem0(x)  # (B, C, H/4, W/4)
        s1 = self.stem1(s0)  # (B, C, H/8, W/8)
        return s0, s1


def build_stem(kind: StemKind, in_channels: int, C: int, stem_multiplier: int) -> Stem:
    """The stem of the given kind for a network with ``C`` initial cell channels."""
    if kind == "cifar":
        C_stem = stem_multiplier * C
        return Stem(_CifarStem(in_channels, C_stem), C_stem, C_stem, False)
    if kind == "imagenet":
        return Stem(_ImageNetStem(in_channels, C), C, C, True)
    raise ConfigError(f"unknown stem {kind!r}; known: 'cifar', 'imagenet'")
