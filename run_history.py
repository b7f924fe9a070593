"""What a run records each epoch: the row of metrics.csv, the curves picture, and the log line."""
from __future__ import annotations

import csv
import time
from pathlib import Path

import torch

from engine import EpochProgress
from plots import plot_curves

HISTORY_FIELDS = ("epoch", "lr", "train_loss", "val_loss", "val_mIoU", "pixel_acc", "seconds", "data_wait",
                  "val_seconds", "peak_gpu_mb")
CURVES_EVERY_SECONDS = 30  # curves.png is redrawn at most this often (and at the end): matplotlib is slow


def epoch_record(epoch: int, lr: float, progress: EpochProgress, val_loss: float, report: dict, val_seconds: float,
                 device: torch.device) -> dict:
    """One row of metrics.csv; val_mIoU is the 19-class benchmark mIoU in every label set."""
    return {"epoch": epoch, "lr": lr, "train_loss": progress.loss_sum / max(progress.step, 1), "val_loss": val_loss,
            "val_mIoU": report["benchmark_mIoU"], "pixel_acc": report["pixel_acc"], "seconds": progress.seconds,
            "data_wait": progress.data_wait / max(progress.seconds, 1e-9), "val_seconds": val_seconds,
            "peak_gpu_mb": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else 0}


class HistoryWriter:
    """metrics.csv every epoch, curves.png at most every CURVES_EVERY_SECONDS and at the end; both rewritten from
    the checkpoint's history, so a resume never duplicates rows."""

    def __init__(self, run_dir: Path):
        self.run_dir, self.last_plot = run_dir, 0.0

    def write(self, history: list[dict], final: bool = False) -> None:
        tmp = self.run_dir / ".metrics.csv.tmp"
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, HISTORY_FIELDS)
            writer.writeheader()
            writer.writerows(history)
        tmp.replace(self.run_dir / "metrics.csv")
        if history and (final or time.monotonic() - self.last_plot > CURVES_EVERY_SECONDS):
            plot_curves(history, self.run_dir / "curves.png")
            self.last_plot = time.monotonic()


def epoch_line(row: dict, epochs: int, is_best: bool) -> str:
    line = (f"epoch {row['epoch']}/{epochs}  lr {row['lr']:.2e}  train loss {row['train_loss']:.4f}  val loss "
            f"{row['val_loss']:.4f}  mIoU {100 * row['val_mIoU']:.2f}%  pixel acc {100 * row['pixel_acc']:.2f}%  "
            f"train {row['seconds']:.1f} s (data wait {100 * row['data_wait']:.1f}%)  val {row['val_seconds']:.1f} s")
    if row["peak_gpu_mb"]:
        line += f"  peak GPU {row['peak_gpu_mb']:.0f} MB"
    return line + ("  best" if is_best else "")
