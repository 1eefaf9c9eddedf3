"""The default generator of LFM-CW: a class-conditional VAE, pretrained once per data set and seed.

A conditional VAE is the stable choice at this scale: it has one loss (the negative ELBO), no
adversary, and its samples cover every class. Images of any shape (C, H, W) are flattened; the
encoder and decoder are two-layer MLPs conditioned on a one-hot label. Pixels are mapped to
[0, 1] with the training data's range (``low``, ``high``, buffers) and the decoder's Bernoulli
mean is mapped back, so generated images are bounded and on the data's scale.

``ConditionalVAE(noise, labels) -> images`` is the generator call LFM-CW uses (``noise`` the
latent code, standard normal); ``negative_elbo(images, labels)`` its training loss, also the
loss of the ``generator`` level when it is fine-tuned during the search.

``pixels`` chooses what an image is: ``"mean"`` (default) the decoder's Bernoulli mean, a smooth
image for each code; ``"sample"`` a draw from the decoder's distribution, each pixel at ``high``
with the mean's probability and at ``low`` otherwise (torch's global random stream; binary
pixels, noisier and less prototypical than the mean). It is a setting, not a weight: the same
state dict serves both.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from mlo.errors import ConfigError, DataError

from ..data import labels_of
from .streams import BalancedBatches, data_range, stream

__all__ = ["ConditionalVAE", "pretrain_cvae", "PIXELS"]

#: what `ConditionalVAE` returns as an image: the decoder's mean or a sample of it
PIXELS = ("mean", "sample")


class ConditionalVAE(nn.Module):
    """Encoder q(z | x, k), decoder p(x | z, k) (Bernoulli mean), prior N(0, I) on ``noise_dim``."""

    low: Tensor
    high: Tensor

    def __init__(
        self, num_classes: int, shape: tuple[int, int, int], noise_dim: int = 32, width: int = 256, pixels: str = "mean"
    ) -> None:
        super().__init__()
        if num_classes < 1 or noise_dim < 1 or width < 1:
            raise ConfigError(f"ConditionalVAE: need positive sizes, got classes={num_classes}, noise_dim={noise_dim}, width={width}")
        if pixels not in PIXELS:
            raise ConfigError(f"ConditionalVAE: pixels must be one of {', '.join(PIXELS)}, got {pixels!r}")
        self.num_classes, self.shape, self.noise_dim, self.pixels = num_classes, tuple(shape), noise_dim, pixels
        size = shape[0] * shape[1] * shape[2]
        self.encoder = nn.Sequential(nn.Linear(size + num_classes, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU())
        self.mean_logvar = nn.Linear(width, 2 * noise_dim)
        self.decoder = nn.Sequential(
            nn.Linear(noise_dim + num_classes, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, size)
        )
        self.register_buffer("low", torch.zeros(()))
        self.register_buffer("high", torch.ones(()))

    def _onehot(self, labels: Tensor, like: Tensor) -> Tensor:
        return F.one_hot(labels, self.num_classes).to(like.dtype)

    def _logits(self, noise: Tensor, labels: Tensor) -> Tensor:
        return self.decoder(torch.cat([noise, self._onehot(labels, noise)], dim=1))  # (B, C*H*W)

    def forward(self, noise: Tensor, labels: Tensor) -> Tensor:
        unit = torch.sigmoid(self._logits(noise, labels))  # (B, C*H*W) in [0, 1]
        if self.pixels == "sample":
            unit = torch.bernoulli(unit.detach()) + (unit - unit.detach())  # values of a draw, the mean's gradient
        return (self.low + (self.high - self.low) * unit).view(-1, *self.shape)  # (B, C, H, W)

    def negative_elbo(self, images: Tensor, labels: Tensor, kl_weight: float = 1.0) -> Tensor:
        """Mean over the batch of -ELBO: Bernoulli reconstruction (pixels scaled to [0, 1]) +
        ``kl_weight`` * KL (below 1 keeps more of each image's own detail in the code)."""
        unit = ((images.flatten(1) - self.low) / (self.high - self.low)).clamp(0.0, 1.0)  # (B, P)
        hidden = self.encoder(torch.cat([unit, self._onehot(labels, unit)], dim=1))
        mean, logvar = self.mean_logvar(hidden).chunk(2, dim=1)  # (B, noise_dim) each
        z = mean + torch.randn_like(mean) * torch.exp(0.5 * logvar)
        recon = F.binary_cross_entropy_with_logits(self._logits(z, labels), unit, reduction="none").sum(1)
        kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).sum(1)
        return (recon + kl_weight * kl).mean()


def pretrain_cvae(
    train: Dataset, num_classes: int, shape: tuple[int, int, int], seed: int = 0, steps: int = 3000,
    batch_size: int = 64, lr: float = 2e-3, noise_dim: int = 32, kl_weight: float = 0.5,
    device: torch.device | str = "cpu", workers: int = 0, pixels: str = "mean",
) -> ConditionalVAE:
    """A `ConditionalVAE` trained with Adam on ``train`` for ``steps`` batches (seeded,
    deterministic on a CPU); the data range is taken from ``train``. Batches are drawn class-
    balanced (with replacement), so that the tail classes of a long-tailed ``train`` are learned
    as well as the head. The images are streamed through a DataLoader (``workers`` processes),
    one pass for the range and then batch by batch, never held whole. Returned in eval mode,
    making images as ``pixels`` says (`ConditionalVAE`)."""
    device = torch.device(device)
    torch.manual_seed(seed)
    vae = ConditionalVAE(num_classes, shape, noise_dim, pixels=pixels).to(device)
    low, high = data_range(train, workers=workers)
    if not high > low:
        raise DataError(f"pretrain_cvae: the training images are constant (range [{low}, {high}])")
    vae.low.fill_(low)
    vae.high.fill_(high)
    labels = torch.from_numpy(labels_of(train))
    opt = torch.optim.Adam(vae.parameters(), lr)
    for images, y in stream(train, BalancedBatches(labels, batch_size, steps, seed), workers):
        loss = vae.negative_elbo(images.float().to(device, non_blocking=True), y.to(device, non_blocking=True), kl_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return vae.eval()
