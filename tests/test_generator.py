"""The conditional GAN of LFM-CW: shapes from digits to 32x32 RGB, its losses train it, and a
user's generator loads from a checkpoint (whole module or state dict) with clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mlo.problems.lfm_cw.generator import (
    ConditionalDiscriminator,
    ConditionalGenerator,
    discriminator_loss,
    generator_loss,
    load_generator,
)


@pytest.mark.parametrize("shape", [(1, 8, 8), (3, 32, 32)])
def test_generator_and_discriminator_shapes(shape: tuple[int, int, int], one_thread: None) -> None:
    gen, disc = ConditionalGenerator(10, shape, noise_dim=16), ConditionalDiscriminator(10, shape)
    z, k = torch.randn(5, 16), torch.arange(5)
    images = gen(z, k)
    assert images.shape == (5, *shape)
    assert disc(images, k).shape == (5,)


def test_generator_rejects_sizes_it_cannot_make() -> None:
    with pytest.raises(ValueError, match="divisible by 4"):
        ConditionalGenerator(10, (1, 10, 10))


def test_gan_losses_move_their_own_module_only(one_thread: None) -> None:
    torch.manual_seed(0)
    gen, disc = ConditionalGenerator(3, (1, 8, 8), noise_dim=8), ConditionalDiscriminator(3, (1, 8, 8))
    real, labels, z, k = torch.randn(6, 1, 8, 8), torch.randint(3, (6,)), torch.randn(6, 8), torch.randint(3, (6,))
    d = discriminator_loss(gen, disc, real, labels, z, k)
    assert all(p.grad is None for p in gen.parameters())
    d.backward()
    assert all(p.grad is None for p in gen.parameters())  # the generator is held fixed
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in disc.parameters())
    g = generator_loss(gen, disc, z, k)
    grads = torch.autograd.grad(g, list(gen.parameters()))
    assert any(float(x.abs().sum()) > 0 for x in grads)


def test_load_generator_from_state_dict_and_whole_module(tmp_path: Path) -> None:
    gen = ConditionalGenerator(10, (1, 8, 8))
    z, k = torch.randn(4, gen.noise_dim), torch.arange(4)
    torch.save(gen.state_dict(), tmp_path / "state.pt")
    torch.save(gen, tmp_path / "module.pt")
    for name in ("state.pt", "module.pt"):
        loaded = load_generator(tmp_path / name, 10, (1, 8, 8), allow_pickle=name == "module.pt")
        assert torch.equal(loaded(z, k), gen(z, k))


def test_load_generator_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nothing.pt"):
        load_generator(tmp_path / "nothing.pt", 10, (1, 8, 8))
    torch.save(ConditionalGenerator(5, (1, 8, 8)).state_dict(), tmp_path / "other.pt")
    with pytest.raises(ValueError, match="other.pt.*does not fit"):
        load_generator(tmp_path / "other.pt", 10, (1, 8, 8))
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="list.pt.*holds a list"):
        load_generator(tmp_path / "list.pt", 10, (1, 8, 8))
