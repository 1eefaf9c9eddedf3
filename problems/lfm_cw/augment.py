"""The ``lfm-cw-aug`` ablation's "generator": a random augmentation of a real image of class k.

``AugmentedReal(noise, labels) -> images`` has the generator call of LFM-CW, but draws a real
training image of each requested class and shifts it by up to ``shift`` pixels (zero-filled with
the background value, the images' minimum) and, with ``flip``, mirrors it. Every choice is read
from the noise (so the same noise gives the same images): ``noise[:, 0]`` picks the image,
``noise[:, 1:3]`` the shift, ``noise[:, 3]`` the flip. It separates the effect of class weighting
from the quality of a learned generator.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mlo.errors import ConfigError, DataError

__all__ = ["AugmentedReal"]


class AugmentedReal(nn.Module):
    """A bank of real images sorted by class; see the module docstring."""

    images: Tensor
    starts: Tensor
    counts: Tensor

    def __init__(self, images: Tensor, labels: Tensor, num_classes: int, shift: int = 2, flip: bool = False) -> None:
        super().__init__()
        counts = torch.bincount(labels, minlength=num_classes)
        if len(counts) > num_classes or bool((counts == 0).any()):
            raise DataError(f"AugmentedReal needs at least one image of each of the {num_classes} classes, got counts {counts.tolist()}")
        if shift < 0:
            raise ConfigError(f"shift must be >= 0, got {shift}")
        order = torch.argsort(labels, stable=True)
        self.register_buffer("images", images[order].clone())
        self.register_buffer("counts", counts)
        self.register_buffer("starts", torch.cumsum(counts, 0) - counts)
        self.num_classes, self.shift, self.flip, self.noise_dim = num_classes, shift, flip, 4
        self.background = float(images.min())

    def forward(self, noise: Tensor, labels: Tensor) -> Tensor:
        if noise.shape[1] < 4:
            raise ConfigError(f"AugmentedReal reads 4 noise coordinates per image, got {noise.shape[1]}")
        u = torch.special.ndtr(noise[:, :3])  # uniform in (0, 1), (B, 3)
        counts = self.counts[labels]
        pick = self.starts[labels] + torch.minimum((u[:, 0] * counts).long(), counts - 1)
        x = self.images[pick]  # (B, C, H, W)
        s = self.shift
        if s:  # crop each padded image at its own offset, by indexing (no per-image host sync)
            b, h, w = x.shape[0], x.shape[-2], x.shape[-1]
            padded = nn.functional.pad(x, (s, s, s, s), value=self.background)  # (B, C, H+2s, W+2s)
            dy = (u[:, 1] * (2 * s + 1)).long().clamp(max=2 * s)  # (B,)
            dx = (u[:, 2] * (2 * s + 1)).long().clamp(max=2 * s)
            rows = (torch.arange(h, device=x.device) + dy[:, None])[:, :, None]  # (B, H, 1)
            cols = (torch.arange(w, device=x.device) + dx[:, None])[:, None, :]  # (B, 1, W)
            batch = torch.arange(b, device=x.device)[:, None, None]
            x = padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2)  # (B, C, H, W)
        if self.flip:
            mirror = (noise[:, 3] > 0).view(-1, 1, 1, 1)
            x = torch.where(mirror, x.flip(-1), x)
        return x
