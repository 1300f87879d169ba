"""Per-epoch metrics: ``metrics.csv`` and a ``metrics.png`` plot of loss and accuracy (both atomic)."""

from __future__ import annotations

import csv
import os
from pathlib import Path

from mf_edge.publish import partial_file

COLUMNS = ("epoch", "phase", "lr", "train_loss", "val_loss", "val_top1", "val_top5", "seconds")


def write_csv(history: list[dict], path: Path) -> Path:
    """One row per finished epoch (``COLUMNS``)."""
    tmp = partial_file(path)
    with open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(history)
    os.replace(tmp, path)
    return path


def plot(history: list[dict], path: Path, title: str) -> Path:
    """Loss (train, val) and validation accuracy (top-1, top-5) against the epoch."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    epochs = [row["epoch"] for row in history]
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    loss_ax.plot(epochs, [row["train_loss"] for row in history], marker="o", label="train")
    loss_ax.plot(epochs, [row["val_loss"] for row in history], marker="o", label="val")
    loss_ax.set(xlabel="epoch", ylabel="loss", title="loss")
    acc_ax.plot(epochs, [row["val_top1"] for row in history], marker="o", label="top-1")
    acc_ax.plot(epochs, [row["val_top5"] for row in history], marker="o", label="top-5")
    acc_ax.set(xlabel="epoch", ylabel="accuracy (%)", title="validation accuracy")
    for axis in (loss_ax, acc_ax):
        axis.legend()
        axis.grid(alpha=0.3)
    fig.suptitle(title)
    tmp = partial_file(path)
    fig.savefig(tmp, dpi=100, format=path.suffix.lstrip(".") or "png")
    plt.close(fig)
    os.replace(tmp, path)
    return path
