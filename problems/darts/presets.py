"""Network sizes and evaluation budgets per data set: DARTS's protocol, and small ones for digits.

The digits sizes are chosen for a CPU: one forward+backward of the digits supernet
(C=8, 3 cells, batch 64, one thread) takes about 0.5 s of CPU time, and an evaluation epoch of
the digits network a few seconds.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["NetSize", "Preset", "PRESETS"]


@dataclass(frozen=True)
class NetSize:
    """Initial channels, number of cells, batch size."""

    C: int
    layers: int
    batch_size: int


@dataclass(frozen=True)
class Preset:
    """Supernet size for the search, network size and budget for the evaluation from scratch."""

    search: NetSize
    evaluation: NetSize
    eval_epochs: int
    eval_lr: float


PRESETS: dict[str, Preset] = {
    # 3 cells: normal, reduction (8x8 -> 4x4), reduction (-> 2x2).
    "digits": Preset(search=NetSize(8, 3, 64), evaluation=NetSize(8, 3, 64), eval_epochs=10, eval_lr=0.05),
    # Fashion-MNIST at 14x14 on a CPU (14 -> 7 -> 4 through the two reduction cells).
    "fashion-mnist": Preset(search=NetSize(4, 3, 64), evaluation=NetSize(8, 3, 64), eval_epochs=10, eval_lr=0.05),
    # DARTS: search 8 cells, 16 channels, batch 64; evaluation 20 cells, 36 channels, batch 96, 600 epochs.
    "cifar10": Preset(NetSize(16, 8, 64), NetSize(36, 20, 96), 600, 0.025),
    "cifar100": Preset(NetSize(16, 8, 64), NetSize(36, 20, 96), 600, 0.025),
    # DARTS ImageNet (mobile setting) evaluation: 14 cells, 48 channels, batch 128, 250 epochs.
    "imagenet": Preset(NetSize(16, 8, 64), NetSize(48, 14, 128), 250, 0.1),
}
