"""Confusion matrix -> IoU and friends, following the official Cityscapes/KITTI evaluation.

One confusion matrix is accumulated over the whole split (never a mean of per-image or per-batch scores).
Rows are ground truth, columns predictions; ignored ground truth (255) is never counted.

IoU of class c = TP / (TP + FP + FN) with
- FN: every other prediction in row c, including predictions of classes that are not scored;
- FP: column c over the scored rows only;
- a class with TP + FP + FN = 0 is n/a (NaN), left out of every mean; a class predicted but absent from
  the ground truth scores 0.
The benchmark view (``benchmark_confusion``) maps any label set onto the 19 train classes plus one
column for "predicted an unscored class", which is how the official script treats such predictions.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

from labels import CATEGORIES, IGNORE_INDEX, TRAIN_LABELS, LabelSet


class ConfusionMatrix:
    """(C, C) int64 counts on the device; ``update`` never synchronises with the host."""

    def __init__(self, num_classes: int, device: torch.device | str = "cpu"):
        self.num_classes = num_classes
        self.counts = torch.zeros(num_classes * num_classes + 1, dtype=torch.int64, device=device)

    def update(self, prediction: torch.Tensor, target: torch.Tensor) -> None:
        """prediction: class indices; target: same shape, 255 (or any value >= C) ignored."""
        c = self.num_classes
        target = target.long()
        index = torch.where(target < c, target * c + prediction.long(), c * c)  # ignored pixels go to a spare bin
        self.counts.index_add_(0, index.flatten(), torch.ones_like(index.flatten()))

    def all_reduce(self) -> None:
        """Sum the counts over DDP ranks (each rank must have seen a disjoint part of the split)."""
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(self.counts)

    @property
    def matrix(self) -> np.ndarray:
        c = self.num_classes
        return self.counts[: c * c].view(c, c).cpu().numpy()


def iou_per_class(confusion: np.ndarray) -> np.ndarray:
    """(R,) IoU for a (R, R + K) matrix: rows are scored classes, K extra columns are unscored predictions."""
    rows = confusion.shape[0]
    confusion = confusion.astype(np.float64)
    tp = np.diag(confusion[:, :rows])
    fn = confusion.sum(axis=1) - tp
    fp = confusion[:, :rows].sum(axis=0) - tp
    denominator = tp + fp + fn
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, tp / denominator, np.nan)


def summarize(confusion: np.ndarray) -> dict[str, float | np.ndarray]:
    """The FCN paper's four figures: pixel accuracy, mean accuracy, mean IoU, frequency-weighted IoU."""
    tp = np.diag(confusion[:, : confusion.shape[0]]).astype(np.float64)
    gt_pixels = confusion.sum(axis=1).astype(np.float64)
    iou = iou_per_class(confusion)
    with np.errstate(invalid="ignore", divide="ignore"):
        accuracy = np.where(gt_pixels > 0, tp / gt_pixels, np.nan)
    total = gt_pixels.sum()
    frequency = gt_pixels / total if total else np.zeros_like(gt_pixels)
    present = ~np.isnan(iou)
    return {"mIoU": _nanmean(iou), "pixel_acc": float(tp.sum() / total) if total else float("nan"),
            "mean_acc": _nanmean(accuracy), "fwIoU": float((frequency[present] * iou[present]).sum()),
            "iou": iou, "acc": accuracy, "pixels": gt_pixels.astype(np.int64)}


def _nanmean(values: np.ndarray) -> float:
    return float(np.nanmean(values)) if np.any(~np.isnan(values)) else float("nan")


def benchmark_confusion(confusion: np.ndarray, label_set: LabelSet) -> np.ndarray:
    """(C, C) matrix of any label set -> (19, 20): train classes, plus one column for unscored predictions."""
    train_ids = label_set.class_to_train_id.astype(np.int64)
    num_train = len(TRAIN_LABELS)
    columns = np.where(train_ids == IGNORE_INDEX, num_train, train_ids)
    out = np.zeros((num_train, num_train + 1), dtype=np.int64)
    scored_rows = train_ids != IGNORE_INDEX
    np.add.at(out, (train_ids[scored_rows][:, None], columns[None, :]), confusion[scored_rows])
    return out


def category_confusion(benchmark: np.ndarray) -> np.ndarray:
    """(19, 20) benchmark matrix -> (7, 8): classes merged into their Cityscapes categories."""
    category_of = np.array([CATEGORIES.index(label.category) for label in TRAIN_LABELS] + [len(CATEGORIES)])
    out = np.zeros((len(CATEGORIES), len(CATEGORIES) + 1), dtype=np.int64)
    np.add.at(out, (category_of[:-1][:, None], category_of[None, :]), benchmark)
    return out


def evaluation_report(confusion: np.ndarray, label_set: LabelSet) -> dict:
    """Everything test.py and main.py report for one split, from one (C, C) confusion matrix. ``benchmark_mIoU``
    is the figure a model is chosen and compared by: the 19-class Cityscapes benchmark for the Cityscapes label
    sets, the table's own mIoU for another vocabulary (which has no categories)."""
    report = summarize(confusion)
    report["class_names"], report["category_iou"] = label_set.class_names, {}
    benchmark = report  # another vocabulary's table is its own benchmark
    if label_set.class_to_train_id is not None:
        benchmark_matrix = benchmark_confusion(confusion, label_set)
        benchmark = summarize(benchmark_matrix)  # its pixel accuracy, too, over the benchmark's pixels
        report["category_iou"] = dict(zip(CATEGORIES, iou_per_class(category_confusion(benchmark_matrix))))
    for key in ("mIoU", "iou", "pixel_acc"):
        report[f"benchmark_{key}"] = benchmark[key]
    return report
