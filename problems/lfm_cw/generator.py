"""The class-conditional image generator of LFM-CW: a small conditional GAN, or a user's module.

``ConditionalGenerator(noise, labels) -> images`` and ``ConditionalDiscriminator(images, labels)
-> logits`` train as two levels of the program (``generator`` and ``discriminator``), each reading
the other through a closure, with the non-saturating GAN losses. Sizes adapt to the data: 1x8x8
digits train in seconds on a CPU; 3x32x32 works with the same code.

Any module with the call ``(noise, labels) -> images`` can stand in for the generator
(``load_generator``); it is then a fixed data source.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mlo.errors import ConfigError, DataError

__all__ = ["ConditionalGenerator", "ConditionalDiscriminator", "discriminator_loss", "generator_loss", "load_generator"]


class ConditionalGenerator(nn.Module):
    """Noise and a class label to an image of ``shape`` (C, H, W); H and W divisible by 4."""

    def __init__(self, num_classes: int, shape: tuple[int, int, int], noise_dim: int = 32, width: int = 64) -> None:
        super().__init__()
        c, h, w = shape
        if h % 4 or w % 4:
            raise ConfigError(f"generator: image height and width must be divisible by 4, got {h}x{w}")
        self.noise_dim, self.num_classes, self.shape = noise_dim, num_classes, shape
        self.width, self.h0, self.w0 = width, h // 4, w // 4
        self.embed = nn.Embedding(num_classes, noise_dim)
        # No BatchNorm: the generator is also called inside other levels' losses, and its output
        # must not depend on the mode it is in nor move statistics there.
        self.project = nn.Sequential(nn.Linear(2 * noise_dim, 2 * width * self.h0 * self.w0), nn.LeakyReLU(0.2))
        self.body = nn.Sequential(
            nn.Upsample(scale_factor=2),
            nn.Conv2d(2 * width, width, 3, padding=1),
            nn.LeakyReLU(0.2),
            nn.Upsample(scale_factor=2),
            nn.Conv2d(width, c, 3, padding=1),
        )

    def forward(self, noise: Tensor, labels: Tensor) -> Tensor:
        z = torch.cat([noise, self.embed(labels)], dim=1)  # (B, 2*noise_dim)
        x = self.project(z).view(-1, 2 * self.width, self.h0, self.w0)  # (B, 2w, H/4, W/4)
        return self.body(x)  # (B, C, H, W)


class ConditionalDiscriminator(nn.Module):
    """Image and label to a real/fake logit; the label enters as one-hot channels."""

    def __init__(self, num_classes: int, shape: tuple[int, int, int], width: int = 64) -> None:
        super().__init__()
        c, h, w = shape
        self.num_classes = num_classes
        self.features = nn.Sequential(
            nn.Conv2d(c + num_classes, width, 3, stride=2, padding=1),
            nn.LeakyReLU(0.2),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1),
            nn.LeakyReLU(0.2),
            nn.AdaptiveAvgPool2d(1),
        )
        self.head = nn.Linear(2 * width, 1)

    def forward(self, images: Tensor, labels: Tensor) -> Tensor:
        b, _, h, w = images.shape
        onehot = F.one_hot(labels, self.num_classes).to(images.dtype).view(b, -1, 1, 1).expand(b, -1, h, w)
        x = self.features(torch.cat([images, onehot], dim=1)).flatten(1)  # (B, 2w)
        return self.head(x).squeeze(1)  # (B,)


def discriminator_loss(
    generator: nn.Module, discriminator: nn.Module, real: Tensor, labels: Tensor, noise: Tensor, fake_labels: Tensor
) -> Tensor:
    """Binary cross-entropy of telling real images from generated ones (the generator held fixed)."""
    with torch.no_grad():
        fake = generator(noise, fake_labels)
    real_logits = discriminator(real, labels)
    fake_logits = discriminator(fake, fake_labels)
    return F.binary_cross_entropy_with_logits(
        real_logits, torch.ones_like(real_logits)
    ) + F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits))


def generator_loss(generator: nn.Module, discriminator: nn.Module, noise: Tensor, fake_labels: Tensor) -> Tensor:
    """The non-saturating generator loss: -log D(G(z, k), k)."""
    logits = discriminator(generator(noise, fake_labels), fake_labels)
    return F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits))


def load_generator(
    path: str | Path, num_classes: int, shape: tuple[int, int, int], allow_pickle: bool = False
) -> nn.Module:
    """A generator from a checkpoint: a state dict of `ConditionalVAE` (as `mlo run` caches it)
    or of ``ConditionalGenerator(num_classes, shape)``, read with ``torch.load(weights_only=True)``,
    which runs no code from the file. A whole pickled module with the call ``(noise, labels) ->
    images`` loads only with ``allow_pickle=True`` (``--set unsafe_pickle=true``): unpickling
    runs whatever code the file holds, so use it only for files you made or trust."""
    from .cvae import ConditionalVAE

    path = Path(path)
    if not path.is_file():
        raise DataError(f"generator checkpoint {str(path)!r} does not exist")
    if allow_pickle:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            raise ConfigError(
                f"generator checkpoint {str(path)!r} is not a plain state dict ({str(err).splitlines()[0]}); "
                "a pickled module loads only with allow_pickle=True (--set unsafe_pickle=true), which runs "
                "the code the file holds: use it only for a file you trust"
            ) from None
    if isinstance(obj, nn.Module):
        return obj
    if isinstance(obj, dict):
        kind: type[nn.Module] = ConditionalVAE if any(k.startswith("decoder.") for k in obj) else ConditionalGenerator
        module = kind(num_classes, shape)
        try:
            module.load_state_dict(obj)
        except RuntimeError as err:
            raise ConfigError(
                f"generator checkpoint {str(path)!r} is a state dict that does not fit "
                f"{kind.__name__}({num_classes}, {shape}): {err}"
            ) from None
        return module.eval() if kind is ConditionalVAE else module
    raise ConfigError(f"generator checkpoint {str(path)!r} holds a {type(obj).__name__}, not a module or state dict")
