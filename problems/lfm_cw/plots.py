"""The PNG figures of a run: class weights over the search, architecture weights per edge, and
training curves. Written with matplotlib's Agg backend (no display needed)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

__all__ = ["class_weights", "architecture", "curves"]


def class_weights(history: Sequence[Sequence[float]], class_names: Sequence[str], path: Path, title: str) -> Path:
    """One line per class: its weight ``c_k`` after each round of the search."""
    data = np.asarray(history)  # (rounds, K)
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=120)
    cmap = plt.get_cmap("tab10" if data.shape[1] <= 10 else "tab20")
    for k in range(data.shape[1]):
        ax.plot(np.arange(1, len(data) + 1), data[:, k], color=cmap(k % cmap.N), label=str(class_names[k]), lw=1.6)
    ax.axhline(1.0, color="0.5", ls="--", lw=1, label="uniform")
    ax.set_xlabel("search round")
    ax.set_ylabel("class weight $c_k$ (sum = K)")
    ax.set_title(title)
    if data.shape[1] <= 20:
        ax.legend(title="class", ncol=2, fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def architecture(
    weights: Mapping[str, np.ndarray], ops: Sequence[str], edge_names: Sequence[str], path: Path, title: str
) -> Path:
    """Heat maps of the final softmax weight of each operation on each edge, one per cell type."""
    cells = list(weights)
    fig, axes = plt.subplots(1, len(cells), figsize=(5.2 * len(cells), 0.38 * len(edge_names) + 2.2), dpi=120)
    axes = np.atleast_1d(axes)
    for ax, cell in zip(axes, cells):
        w = np.asarray(weights[cell])  # (edges, ops)
        # colour scale spans this cell's weights, so small departures from uniform stay visible
        im = ax.imshow(w, cmap="viridis", aspect="auto", vmin=float(w.min()), vmax=max(float(w.max()), float(w.min()) + 1e-6))
        ax.set_xticks(range(len(ops)), ops, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(len(edge_names)), edge_names, fontsize=8)
        ax.set_title(f"{cell} cell")
        for i in range(w.shape[0]):
            j = int(w[i].argmax())
            ax.text(j, i, f"{w[i, j]:.3f}", ha="center", va="center", fontsize=6, color="black")
        fig.colorbar(im, ax=ax, fraction=0.04, label="softmax weight")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def curves(
    search: Mapping[str, Sequence[float]], train_loss: Sequence[float], test_error: Sequence[float], path: Path, title: str
) -> Path:
    """Left: each level's loss over the search rounds; right: training loss and test error (%)
    of the derived genotype trained from scratch, per epoch."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2), dpi=120)
    for name, values in search.items():
        if len(values):
            left.plot(np.arange(1, len(values) + 1), values, label=name, lw=1.4)
    left.set_xlabel("search round")
    left.set_ylabel("loss (mean over the round's steps)")
    left.set_title("search: loss per level")
    if any(len(v) for v in search.values()):
        left.legend(fontsize=8)
    else:
        left.text(0.5, 0.5, "no per-level losses recorded", ha="center", va="center", transform=left.transAxes)
    left.grid(alpha=0.3)
    epochs = np.arange(1, len(train_loss) + 1)
    right.plot(epochs, train_loss, color="tab:blue", marker="o", ms=3, lw=1.4, label="train loss")
    right.set_xlabel("epoch")
    right.set_ylabel("train loss", color="tab:blue")
    twin = right.twinx()
    twin.plot(epochs, test_error, color="tab:red", marker="s", ms=3, lw=1.4, label="test error")
    twin.set_ylabel("test error (%)", color="tab:red")
    right.set_title("evaluation: genotype trained from scratch")
    right.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def samples(images: np.ndarray, path: Path, title: str) -> Path:
    """A grid of generated images, one row per class: images (K, n, C, H, W)."""
    k, n = images.shape[:2]
    fig, axes = plt.subplots(k, n, figsize=(0.6 * n + 0.8, 0.6 * k + 0.6), dpi=120, squeeze=False)
    for i in range(k):
        for j in range(n):
            img = images[i, j]
            img = img[0] if img.shape[0] == 1 else np.transpose(img, (1, 2, 0))
            lo, hi = float(img.min()), float(img.max())
            axes[i, j].imshow((img - lo) / max(hi - lo, 1e-8), cmap="gray" if img.ndim == 2 else None)
            axes[i, j].set_xticks([])
            axes[i, j].set_yticks([])
        axes[i, 0].set_ylabel(str(i), rotation=0, ha="right", va="center", fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
