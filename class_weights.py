"""Class weights for the cross-entropy loss, from how often each class occurs in the training labels.

Both rules count labelled pixels only (255 = ignore is never a class):

- ``median-freq`` (Eigen & Fergus 2015, used by SegNet): freq(c) = pixels of c / labelled pixels of the
  images where c is present; weight(c) = median over the present classes of freq / freq(c).
- ``log`` (ENet, Paszke et al. 2016): weight(c) = 1 / ln(1.02 + p(c)), p(c) = pixels of c / all labelled
  pixels; between 1 / ln(2.02) = 1.42 for a class covering everything and 1 / ln(1.02) = 50.5 for a vanishing one.
- ``none``: every weight 1.

A class absent from the training labels gets the largest weight of the present classes. ``F.cross_entropy``
multiplies only the pixels whose target is c by weight[c], so the training loss never uses that value; a
finite one keeps the tensor free of inf, and a validation loss computed with the same weights counts such a
class like the rarest one instead of ignoring it.

    python class_weights.py --data-root ROOT [--dataset cityscapes] [--method log]   # print the weights
"""
from __future__ import annotations

import argparse
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from data_preprocessing import SegmentationDataset
from layouts import DATASETS, labelled_names
from errors import UserError

METHODS = ("none", "median-freq", "log")
ENET_C = 1.02  # ENet's constant: caps the weight of a vanishing class at 1 / ln(1.02)


def class_pixel_counts(dataset: SegmentationDataset) -> np.ndarray:
    """(N, C) int64: pixels of each class in each image, ignored pixels left out. The labels come from the
    dataset's cache, or from the label PNGs alone (images are not decoded). One row per image because
    median frequency needs to know which images hold a class; ``.sum(0)`` gives the (C,) totals."""
    num_classes = dataset.label_set.num_classes

    def count(index: int) -> np.ndarray:
        return np.bincount(dataset.load_label(index).ravel(), minlength=256)[:num_classes]
    with ThreadPoolExecutor(4) as pool:  # cv2 releases the GIL while decoding
        return np.stack(list(pool.map(count, range(len(dataset))))).astype(np.int64)


def class_weights(counts: np.ndarray, method: str) -> torch.Tensor:
    """(C,) float32 loss weights from (N, C) per-image pixel counts (``class_pixel_counts``) by ``method``."""
    counts = np.atleast_2d(np.asarray(counts, dtype=np.float64))
    total = counts.sum(0)
    present = total > 0
    if method not in METHODS:
        raise UserError(f"unknown class weighting {method!r}; choose one of {', '.join(METHODS)}")
    if not present.any():
        raise UserError("the training labels hold no labelled pixel: every pixel is 255 (ignore)")
    weights = np.ones_like(total)
    if method == "median-freq":
        pixels_where_present = ((counts > 0) * counts.sum(1, keepdims=True)).sum(0)
        freq = total[present] / pixels_where_present[present]
        weights[present] = np.median(freq) / freq
    elif method == "log":
        weights = 1 / np.log(ENET_C + total / total.sum())
    weights[~present] = weights[present].max()
    return torch.tensor(weights, dtype=torch.float32)


def rarest_class(counts: np.ndarray) -> int:
    """Index of the present class with the fewest pixels: the one balancing should help most."""
    total = np.atleast_2d(counts).sum(0)
    return int(np.where(total > 0, total, np.iinfo(np.int64).max).argmin())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", type=Path, required=True)
    parser.add_argument("--dataset", default="kitti", choices=DATASETS)
    parser.add_argument("--label-set", default="train", choices=("train", "full"))
    parser.add_argument("--split-dir", type=Path, help="folder with train.txt (default: the fixed split)")
    parser.add_argument("--method", default="median-freq", choices=METHODS)
    args = parser.parse_args(argv)
    try:
        names = labelled_names(args.dataset, args.data_root, "train", args.split_dir)
        dataset = SegmentationDataset(args.dataset, args.data_root, names, args.label_set)
        counts = class_pixel_counts(dataset)
        weights = class_weights(counts, args.method)
    except UserError as error:
        sys.exit(f"error: {error}")
    share = counts.sum(0) / counts.sum()
    for name, fraction, weight in zip(dataset.label_set.class_names, share, weights):
        print(f"{name:>16}  {100 * fraction:6.2f}% of pixels  weight {weight:.3f}")


if __name__ == "__main__":
    main()
