"""Train a discrete genotype from scratch and report its test error (the DARTS evaluation loop).

SGD with momentum and a learning-rate schedule stepped per epoch, weight decay, auxiliary loss
weight, drop path ramped linearly from 0 to ``drop_path_prob``, gradient norm clipped at 5, as in
the DARTS evaluation protocol. Two schedules: ``"cosine"`` (DARTS on CIFAR: cosine annealing to 0
over the epochs) and ``"exponential"`` (DARTS on ImageNet: the rate multiplied by ``lr_decay``
after every epoch, 0.97 there). ``label_smoothing`` smooths the targets of the main and the
auxiliary loss (DARTS on ImageNet: 0.1). By default the network trains on train and val together
(DARTS retrains on the whole official training set) and is tested on test.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import ConcatDataset, DataLoader, Dataset

from mlo.errors import ConfigError

from ..data import DataSplits
from ..metrics import balanced_error, error
from .genotype import Genotype
from .network import NetworkFromGenotype
from .stem import stem_for

__all__ = ["EpochRecord", "EvalResult", "LR_SCHEDULES", "train_from_scratch", "evaluate", "count_parameters"]

#: learning-rate schedules of `train_from_scratch`, stepped once per epoch
LR_SCHEDULES = ("cosine", "exponential")


@dataclass(frozen=True)
class EpochRecord:
    """One epoch of training: mean train loss, train accuracy (%), test errors (%), lr, seconds."""

    epoch: int
    train_loss: float
    train_acc: float
    test_error: float
    balanced_error: float
    lr: float
    seconds: float


@dataclass
class EvalResult:
    """Final test error and balanced (mean per-class) error in percent, parameter count, history."""

    test_error: float
    balanced_error: float
    params: int
    history: list[EpochRecord] = field(default_factory=list)


def count_parameters(model: nn.Module, exclude_auxiliary: bool = True) -> int:
    """Number of parameters; the auxiliary head is excluded by default, as papers report."""
    return sum(
        p.numel()
        for name, p in model.named_parameters()
        if not (exclude_auxiliary and name.startswith("auxiliary_head."))
    )


@torch.no_grad()
def evaluate(
    model: nn.Module, loader: DataLoader, num_classes: int, device: torch.device | str = "cpu"
) -> tuple[float, float]:
    """(error %, balanced error %) of ``model`` on ``loader``, in eval mode."""
    was_training = model.training
    model.eval()
    preds, labels = [], []
    for x, y in loader:
        preds.append(model(x.to(device)).argmax(dim=1).cpu())
        labels.append(y)
    model.train(was_training)
    p, t = torch.cat(preds), torch.cat(labels)
    return error(p, t), balanced_error(p, t, num_classes)


def train_from_scratch(
    genotype: Genotype,
    splits: DataSplits,
    epochs: int = 600,
    batch_size: int = 96,
    lr: float = 0.025,
    *,
    C: int = 36,
    layers: int = 20,
    momentum: float = 0.9,
    weight_decay: float = 3e-4,
    lr_schedule: str = "cosine",
    lr_decay: float = 0.97,
    label_smoothing: float = 0.0,
    auxiliary: bool = True,
    auxiliary_weight: float = 0.4,
    drop_path_prob: float = 0.2,
    grad_clip: float = 5.0,
    train_on_val: bool = True,
    device: torch.device | str = "cpu",
    num_workers: int = 0,
    seed: int = 0,
    progress_callback: Callable[[EpochRecord], None] | None = None,
    test_every_epoch: bool = True,
) -> EvalResult:
    """Train ``NetworkFromGenotype(genotype, C, layers)`` on ``splits`` and test it.

    Defaults are the DARTS CIFAR-10 evaluation protocol (36 channels, 20 cells, 600 epochs,
    batch 96). For digits on a CPU use a small network, e.g. ``C=8, layers=3, epochs=10,
    batch_size=64, lr=0.05`` (a few seconds per epoch). DARTS's ImageNet protocol is ``C=48,
    layers=14, epochs=250, batch_size=128, lr=0.1, lr_schedule="exponential", lr_decay=0.97,
    weight_decay=3e-5, label_smoothing=0.1, drop_path_prob=0``. ``progress_callback`` is called
    after every epoch with its `EpochRecord`. Returns the test errors after the last epoch.
    ``test_every_epoch=False`` tests only after the last epoch (the other epochs' records hold
    NaN test errors): on a large test set, testing costs more than the training epoch.
    """
    if epochs < 1:
        raise ConfigError(f"epochs must be at least 1, got {epochs}")
    if lr_schedule not in LR_SCHEDULES:
        raise ConfigError(f"lr_schedule must be one of {', '.join(LR_SCHEDULES)}, got {lr_schedule!r}")
    if not 0 < lr_decay <= 1:
        raise ConfigError(f"lr_decay must be in (0, 1], got {lr_decay}")
    if not 0 <= label_smoothing < 1:
        raise ConfigError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    if weight_decay < 0:
        raise ConfigError(f"weight_decay must be >= 0, got {weight_decay}")
    device = torch.device(device)
    torch.manual_seed(seed)
    model = NetworkFromGenotype(
        genotype,
        C=C,
        num_classes=splits.num_classes,
        layers=layers,
        in_channels=splits.input_shape[0],
        auxiliary=auxiliary,
        stem=stem_for(splits.input_shape),
    ).to(device)
    train_set: Dataset = ConcatDataset([splits.train, splits.val]) if train_on_val else splits.train
    g = torch.Generator().manual_seed(seed)
    pin = device.type == "cuda"
    train_loader = DataLoader(
        train_set, batch_size=batch_size, shuffle=True, generator=g,
        num_workers=num_workers, pin_memory=pin, drop_last=False,
    )
    test_loader = DataLoader(
        splits.test, batch_size=max(batch_size, 256), shuffle=False,
        num_workers=num_workers, pin_memory=pin,
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    scheduler: torch.optim.lr_scheduler.LRScheduler = (
        torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs) if lr_schedule == "cosine"
        else torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=lr_decay)
    )

    history: list[EpochRecord] = []
    test_err = bal_err = 100.0
    for epoch in range(epochs):
        start = time.perf_counter()
        current_lr = optimizer.param_groups[0]["lr"]
        model.drop_path_prob = drop_path_prob * epoch / epochs
        model.train()
        total_loss, correct, seen = 0.0, 0, 0
        for x, y in train_loader:
            x, y = x.to(device, non_blocking=pin), y.to(device, non_blocking=pin)
            logits, aux = model.forward_aux(x)
            loss = F.cross_entropy(logits, y, label_smoothing=label_smoothing)
            if aux is not None:
                loss = loss + auxiliary_weight * F.cross_entropy(aux, y, label_smoothing=label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            optimizer.step()
            n = y.shape[0]
            total_loss += float(loss.detach()) * n
            correct += int((logits.detach().argmax(dim=1) == y).sum())
            seen += n
        scheduler.step()
        if test_every_epoch or epoch == epochs - 1:
            test_err, bal_err = evaluate(model, test_loader, splits.num_classes, device)
        else:
            test_err = bal_err = float("nan")
        record = EpochRecord(
            epoch=epoch + 1,
            train_loss=total_loss / max(seen, 1),
            train_acc=100.0 * correct / max(seen, 1),
            test_error=test_err,
            balanced_error=bal_err,
            lr=current_lr,
            seconds=time.perf_counter() - start,
        )
        history.append(record)
        if progress_callback is not None:
            progress_callback(record)
    return EvalResult(test_error=test_err, balanced_error=bal_err, params=count_parameters(model), history=history)
