"""What a run leaves in its folder besides checkpoints: the folder itself, metrics.csv and curves.png each epoch
(with its log line), TensorBoard event files where the tensorboard package is installed, and the confusion picture
of an evaluation."""
from __future__ import annotations

import csv
import math
import fcntl
import importlib.util
import os
import sys
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import IO, Callable, Iterator

import numpy as np
import torch
from matplotlib.figure import Figure  # a Figure made directly draws to files only: no GUI backend, no pyplot state

from labels import LabelSet, colorize
from segmentation import UserError, quoted, runtime
from segmentation.checkpoint import write_failure
from segmentation.engine import EpochProgress

STARTUP_FILES = {".lock", "train.txt", "val.txt", "metrics.csv", "class_iou.csv", "curves.png"}  # all but checkpoints
EVENT_FILE_PREFIX = "events.out.tfevents."  # TensorBoard's, made with the first last.pt: a killed run may leave one
HISTORY_FIELDS = ("epoch", "scale", "lr", "train_loss", "val_loss", "val_mIoU", "pixel_acc", "seconds", "data_wait",
                  "val_seconds", "peak_gpu_mb")
CURVES_EVERY_SECONDS = 30  # curves.png is redrawn at most this often (and at the end): matplotlib is slow


def epoch_record(epoch: int, lr: float, progress: EpochProgress, val_loss: float, report: dict | None,
                 val_seconds: float, device: torch.device, scale: float = 1.0) -> dict:
    """One row of metrics.csv (and of class_iou.csv). Its val_mIoU and pixel_acc describe one class set, the
    benchmark's: the 19 Cityscapes classes in both Cityscapes label sets (the 34 ids' pixel accuracy would count
    unlabeled and ego-vehicle pixels that the mIoU ignores), a class table's own classes otherwise. class_iou.csv
    holds each class of the run's own label set, named in its header. ``lr`` is the mean rate of the epoch's steps;
    ``scale`` the epoch's resolution stage (training and validation at that fraction of the dataset's sizes). A run
    without val images (a final fit) has no ``report``: its validation figures are NaN."""
    report = report or {"benchmark_mIoU": math.nan, "benchmark_pixel_acc": math.nan, "iou": []}
    return {"epoch": epoch, "scale": scale, "lr": lr, "train_loss": progress.loss_sum / max(progress.step, 1),
            "val_loss": val_loss, "val_mIoU": report["benchmark_mIoU"], "pixel_acc": report["benchmark_pixel_acc"],
            "seconds": progress.seconds, "data_wait": progress.data_wait / max(progress.seconds, 1e-9),
            "val_seconds": val_seconds,
            "peak_gpu_mb": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else 0,
            "class_iou": [None if np.isnan(iou) else round(float(iou), 6) for iou in report["iou"]]}  # None: absent


def plan_run_dir(out: Path | None, arch: str, resumed: Path | None = None) -> Path:
    """The folder a run will write: a resumed run's own (``resumed``: its last.pt), else ``out``, else
    runs/<arch>-<date>-<time>; checked, not made yet (a run that is refused while it starts leaves nothing behind).
    An existing, non-empty one is never reused by a new run."""
    if resumed is not None:
        check_writable(resumed.parent, fix=f"copy that folder somewhere writable and --resume from the copy's "
                                            f"{resumed.name}")
        return resumed.parent
    out = out or Path("runs") / f"{arch}-{time.strftime('%Y%m%d-%H%M%S')}"
    if out.exists() and (not out.is_dir() or not started_only(out)):
        refuse_taken(out)
    check_writable(out)
    return out


def started_only(folder: Path) -> bool:
    """Whether ``folder`` holds nothing, or only what a run writes besides checkpoints, and no last.pt: a run
    killed before its first checkpoint landed (even while writing it: a hidden .tmp file) left nothing to keep,
    so the same command may start again there."""
    names = {p.name for p in folder.iterdir() if not (p.name.startswith(".") and p.name.endswith(".tmp"))
             and not p.name.startswith(EVENT_FILE_PREFIX)}
    return names <= STARTUP_FILES


def refuse_taken(out: Path) -> None:
    if (out / "last.pt").is_file():
        raise UserError(f"run folder {out} already exists and is not empty; pass a new --out, or --resume "
                        f"{quoted(out / 'last.pt')} to continue it")
    raise UserError(f"run folder {out} already exists and is not empty, and holds no checkpoint; pass a new --out "
                    "(or delete the folder, if it is a run that stopped before its first epoch ended)")


def check_writable(folder: Path, fix: str = "choose another --out, or fix its permissions") -> None:
    """Refuse, before any work, a folder that cannot be made or written: the first existing ancestor must be
    writable (``os.access`` says so for a read-only file system too)."""
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"cannot write {folder}: {existing} is not a folder this user may write; {fix}")


@contextmanager
def claimed_run_dir(ctx: runtime.Context, folder: Path, new: bool) -> Iterator[None]:
    """Within the block, rank 0 holds ``folder``'s lock (``claim_run_dir``'s open file, closed however the block
    ends); the other ranks hold nothing."""
    with runtime.on_main_rank(ctx, lambda: claim_run_dir(folder, new), share=False) or nullcontext():
        yield


def claim_run_dir(folder: Path, new: bool) -> IO:
    """Make ``folder`` and hold its lock for as long as the returned file stays open (the process's life): a second
    main.py given the same folder at the same moment, or resuming a run that is still training, is refused."""
    folder.mkdir(parents=True, exist_ok=True)
    lock = open(folder / ".lock", "a")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        raise UserError(f"run folder {folder} is in use by another main.py; wait for it to end, or pass another "
                        "--out") from None
    if new and not started_only(folder):  # another process claimed it first
        lock.close()
        refuse_taken(folder)
    return lock


class TensorBoardLog:
    """Each epoch's scalars (losses, lr, val mIoU and pixel accuracy, each class's val IoU) and a few val overlays
    as TensorBoard event files in the run folder, so that ``tensorboard --logdir runs`` overlays every run's curves.
    Only where the ``tensorboard`` package is installed (pip install tensorboard); without it, nothing is written."""

    NUM_OVERLAYS = 2

    def __init__(self, run_dir: Path, label_set: LabelSet, first_epoch: int = 0):
        """``first_epoch``: the epochs already finished (a resumed run's). Anything a killed run logged after them
        is purged by TensorBoard when it reads the files, so no epoch shows twice."""
        self.run_dir, self.label_set, self.writer, self.overlays = run_dir, label_set, None, []
        self.purge_step = first_epoch + 1 if first_epoch else None
        self.available = importlib.util.find_spec("tensorboard") is not None

    def keep_overlays(self, loader) -> Callable[[int, torch.Tensor], None] | None:
        """``evaluate``'s ``on_prediction`` for one validation pass over ``loader``: keeps the first images'
        predictions as overlays for the next ``epoch``; None without tensorboard."""
        if not self.available:
            return None
        self.overlays = []

        def keep(batch_index: int, prediction: torch.Tensor) -> None:
            for index, classes in zip(loader.batch_sampler.batches[batch_index], prediction):
                if len(self.overlays) < self.NUM_OVERLAYS:
                    self.overlays.append(overlay(loader.dataset[index][0], classes, self.label_set))
        return keep

    def epoch(self, row: dict) -> None:
        """Log one metrics.csv ``row`` at step = its epoch, and the overlays kept during its validation."""
        if not self.available:
            return
        if self.writer is None:  # made at the first epoch's end, so a run refused at its start leaves no file
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.writer = SummaryWriter(str(self.run_dir), purge_step=self.purge_step)
            except Exception as error:  # e.g. a protobuf that this tensorboard cannot use: a record, not the run
                self.available = False
                print(f"warning: no TensorBoard files: {type(error).__name__}: {str(error).splitlines()[0]}",
                      file=sys.stderr, flush=True)
                return
        step = row["epoch"]
        for tag, key in (("loss/train", "train_loss"), ("loss/val", "val_loss"), ("lr", "lr"), ("scale", "scale"),
                         ("val/mIoU", "val_mIoU"), ("val/pixel_acc", "pixel_acc")):
            self.writer.add_scalar(tag, row[key], step)
        for name, iou in zip(self.label_set.class_names, row["class_iou"]):
            if iou is not None:  # None: the class is absent from val
                self.writer.add_scalar(f"val_iou/{name}", iou, step)
        for index, picture in enumerate(self.overlays):
            self.writer.add_image(f"val_overlay/{index}", picture, step, dataformats="HWC")
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def overlay(image: torch.Tensor, classes: torch.Tensor, label_set: LabelSet) -> np.ndarray:
    """A (3, H, W) uint8 image with its (H, W) predicted classes blended over it half and half, (H, W, 3) uint8."""
    picture = image.permute(1, 2, 0).numpy().astype(np.uint16)
    return ((picture + colorize(classes.cpu().numpy(), label_set)) // 2).astype(np.uint8)


class HistoryWriter:
    """metrics.csv and class_iou.csv (each class's validation IoU, so that a class that collapses shows early) every
    epoch, curves.png at most every CURVES_EVERY_SECONDS and at the end; all rewritten from the checkpoint's
    history, so a resume never duplicates rows. A failed write (a full disk) is a warning, not the run's end:
    the files are records of what the checkpoints hold, and a failed checkpoint write stops the run itself."""

    def __init__(self, run_dir: Path, class_names: tuple[str, ...]):
        self.run_dir, self.class_names, self.last_plot = run_dir, class_names, 0.0

    def write(self, history: list[dict], final: bool = False) -> None:
        iou_rows = [{"epoch": row["epoch"], **dict(zip(self.class_names, row.get("class_iou", [])))} for row in history]
        try:
            for name, fields, rows in (("metrics.csv", HISTORY_FIELDS, history),
                                       ("class_iou.csv", ("epoch", *self.class_names), iou_rows)):
                path, tmp = self.run_dir / name, self.run_dir / f".{name}.tmp"
                with open(tmp, "w", newline="") as f:
                    writer = csv.DictWriter(f, fields, extrasaction="ignore")
                    writer.writeheader()
                    writer.writerows(rows)
                tmp.replace(path)
            if history and (final or time.monotonic() - self.last_plot > CURVES_EVERY_SECONDS):
                path = self.run_dir / "curves.png"
                plot_curves(history, path)
                self.last_plot = time.monotonic()
        except OSError as error:  # a record, not the run's state: each write is whole, from the checkpoint's history
            for name in ("metrics.csv", "class_iou.csv"):
                (self.run_dir / f".{name}.tmp").unlink(missing_ok=True)
            print(f"warning: {write_failure(error, path)}; the run goes on: {path.name} is rewritten whole after "
                  "every epoch, and last.pt's history holds the same figures", file=sys.stderr, flush=True)


def epoch_line(row: dict, epochs: int, is_best: bool) -> str:
    stage = f"  scale {row['scale']:g}" if row.get("scale", 1) != 1 else ""
    scored = "  not validated" if math.isnan(row["val_mIoU"]) else (
        f"  val loss {row['val_loss']:.4f}  mIoU {100 * row['val_mIoU']:.2f}%  pixel acc {100 * row['pixel_acc']:.2f}%")
    line = (f"epoch {row['epoch']}/{epochs}{stage}  lr {row['lr']:.2e}  train loss {row['train_loss']:.4f}{scored}  "
            f"train {row['seconds']:.1f} s (data wait {100 * row['data_wait']:.1f}%)  val {row['val_seconds']:.1f} s")
    if row["peak_gpu_mb"]:
        line += f"  peak GPU {row['peak_gpu_mb']:.0f} MB"
    return line + ("  best" if is_best else "")


def plot_curves(history: list[dict], path: Path) -> None:
    """Loss (train and val) and validation mIoU per epoch, side by side."""
    epochs = [row["epoch"] for row in history]
    fig = Figure(figsize=(10, 3.6))
    ax_loss, ax_miou = fig.subplots(1, 2)
    ax_loss.plot(epochs, [row["train_loss"] for row in history], label="train")
    ax_loss.plot(epochs, [row["val_loss"] for row in history], label="val", marker=".")
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy", title="loss", yscale="log")  # early val losses can be 100s
    ax_loss.legend()
    # markers: a reduced stage is scored at its end only, a lone point between unscored (NaN) epochs
    ax_miou.plot(epochs, [100 * row["val_mIoU"] for row in history], color="tab:green", marker=".")
    ax_miou.set(xlabel="epoch", ylabel="mIoU (%)", title="validation mIoU (reduced stages at their scale)")
    for ax in (ax_loss, ax_miou):
        ax.grid(alpha=0.3)
        for before, row in zip(history, history[1:]):  # a resolution stage starts: its scale, at its first epoch
            if row.get("scale", 1) != before.get("scale", 1):
                ax.axvline(row["epoch"] - 0.5, color="grey", linestyle=":")
                ax.annotate(f"x{row.get('scale', 1):g}", (row["epoch"] - 0.5, 1), xycoords=("data", "axes fraction"),
                            fontsize=8, va="top")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def plot_confusion(confusion: np.ndarray, class_names: tuple[str, ...], path: Path) -> None:
    """Rows normalised to 1 (the share of each ground-truth class given to each prediction)."""
    rows = confusion.sum(axis=1, keepdims=True)
    normalised = np.divide(confusion, rows, out=np.zeros(confusion.shape), where=rows > 0)
    size = 0.32 * len(class_names) + 2
    fig = Figure(figsize=(size + 1, size))
    ax = fig.subplots()
    image = ax.imshow(normalised, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(class_names)), class_names, rotation=90, fontsize=7)
    ax.set_yticks(range(len(class_names)), class_names, fontsize=7)
    ax.set(xlabel="prediction", ylabel="ground truth", title="confusion (row-normalised)")
    fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
