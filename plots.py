"""Figures written next to a run: training curves and the normalised confusion matrix."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
import numpy as np  # noqa: E402


def plot_curves(history: list[dict], path: Path) -> None:
    """Loss (train and val) and validation mIoU per epoch, side by side."""
    epochs = [row["epoch"] for row in history]
    fig, (ax_loss, ax_miou) = plt.subplots(1, 2, figsize=(10, 3.6))
    ax_loss.plot(epochs, [row["train_loss"] for row in history], label="train")
    ax_loss.plot(epochs, [row["val_loss"] for row in history], label="val")
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
    ax_loss.legend()
    ax_miou.plot(epochs, [100 * row["val_mIoU"] for row in history], color="tab:green")
    ax_miou.set(xlabel="epoch", ylabel="mIoU (%)", title="validation mIoU")
    for ax in (ax_loss, ax_miou):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_confusion(confusion: np.ndarray, class_names: tuple[str, ...], path: Path) -> None:
    """Rows normalised to 1 (the share of each ground-truth class given to each prediction)."""
    rows = confusion.sum(axis=1, keepdims=True)
    normalised = np.divide(confusion, rows, out=np.zeros(confusion.shape), where=rows > 0)
    size = 0.32 * len(class_names) + 2
    fig, ax = plt.subplots(figsize=(size + 1, size))
    image = ax.imshow(normalised, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(class_names)), class_names, rotation=90, fontsize=7)
    ax.set_yticks(range(len(class_names)), class_names, fontsize=7)
    ax.set(xlabel="prediction", ylabel="ground truth", title="confusion (row-normalised)")
    fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
