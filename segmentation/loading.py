"""What a training run reads: its split (kept in the run folder), the samplers that make order and augmentation
reproducible and evaluation exact under DDP, the two loaders, and the class weights of the loss. What differs
between datasets lives in its layout (layouts.py).

Class weights count labelled pixels only (255 = ignore is never a class):

- ``median-freq`` (Eigen & Fergus 2015, used by SegNet): freq(c) = pixels of c / labelled pixels of the
  images where c is present; weight(c) = median over the present classes of freq / freq(c).
- ``log`` (ENet, Paszke et al. 2016): weight(c) = 1 / ln(1.02 + p(c)), p(c) = pixels of c / all labelled
  pixels; between 1 / ln(2.02) = 1.42 for a class covering everything and 1 / ln(1.02) = 50.5 for a vanishing one.
- ``none``: every weight 1.

A class absent from the training labels gets the largest weight of the present classes. The cross-entropy
multiplies only the pixels whose target is c by weight[c], so the training loss never uses that value; a
finite one keeps the tensor free of inf.
"""
from __future__ import annotations

import argparse
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import BatchSampler, Sampler

from data_preprocessing import SegmentationDataset, default_cache_gb, image_size
from labels import LabelSet
from segmentation import UserError, runtime
from segmentation.augmentation import TrainAugmentation
from segmentation.engine import Stage, stage_of
from segmentation.layouts import get_layout, resolve_split

# Loader workers see the decoded cache copy-on-write only when forked. Python 3.14 made forkserver Linux's default,
# which pickles the dataset, cache included, into every worker (docs/results.md). Other systems keep their default.
WORKER_START = "fork" if sys.platform == "linux" else None
WEIGHTINGS = ("none", "median-freq", "log")
ENET_C = 1.02  # ENet's constant: caps the weight of a vanishing class at 1 / ln(1.02)


class SeededTrainSampler(Sampler):
    """Shuffles once per epoch from (seed, epoch) and yields ``(index, augmentation_seed, zoom)``: ``zoom`` is the
    epoch's resolution stage scale (``plan``, engine.stage_plan; 1 without one), which the augmentation applies.

    Because each sample carries its own seed, a crop/flip/jitter is a pure function of (seed, epoch,
    position): the same for any worker count, after ``--resume``, and across DDP world sizes. Under DDP
    each rank takes every ``world_size``-th position of the shared permutation; like
    ``DistributedSampler`` the permutation is padded by repetition to a multiple of the world size, which
    is harmless for training (it never touches evaluation, see ``ShapeBatchSampler``).
    ``set_epoch(epoch, skip)`` starts the epoch ``skip`` samples in (this rank's), for mid-epoch resume.
    """

    def __init__(self, num_samples: int, seed: int, rank: int = 0, world_size: int = 1, plan: list | None = None):
        self.num_samples, self.seed, self.rank, self.world_size, self.plan = num_samples, seed, rank, world_size, plan
        self.per_rank = -(-num_samples // world_size)
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = epoch, skip

    def __len__(self) -> int:
        return self.per_rank - self.skip

    def __iter__(self) -> Iterator[tuple[int, int, float]]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.num_samples, generator=g)
        order = order.repeat(-(-self.per_rank * self.world_size // self.num_samples))[: self.per_rank * self.world_size]
        sample_seeds = torch.randint(0, 2**62, (len(order),), generator=g)
        zoom = stage_of(self.plan, self.epoch).scale if self.plan else 1.0
        for position in range(self.rank, len(order), self.world_size)[self.skip:]:
            yield int(order[position]), int(sample_seeds[position]), zoom


class ShapeBatchSampler(Sampler):
    """Evaluation batches of same-sized images, split across DDP ranks without padding.

    Full-size validation images cannot be stacked unless they share a size; KITTI has a handful of sizes, so grouping by
    size lets validation run batches instead of one image at a time. Batches hold at most ``batch_size`` images and
    ``max_pixels`` pixels; rank r takes batches r, r+W, r+2W, ..., so every image is scored exactly once over all ranks.
    """

    def __init__(self, sizes: list[tuple[int, int]], batch_size: int, rank: int = 0, world_size: int = 1,
                 max_pixels: int = 2**22):
        groups: dict[tuple[int, int], list[int]] = {}
        for index, size in enumerate(sizes):
            groups.setdefault(tuple(size), []).append(index)
        batches = []
        for (height, width), indices in sorted(groups.items()):
            per_batch = max(1, min(batch_size, max_pixels // (height * width)))
            batches += [indices[i:i + per_batch] for i in range(0, len(indices), per_batch)]
        self.batches = batches[rank::world_size]

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches)


def class_pixel_counts(dataset: SegmentationDataset) -> np.ndarray:
    """(N, C) int64: pixels of each class in each image, ignored pixels left out. The labels come from the
    dataset's cache, or from the label PNGs alone (images are not decoded). One row per image because
    median frequency needs to know which images hold a class; ``.sum(0)`` gives the (C,) totals."""
    def count(index: int) -> np.ndarray:
        return np.bincount(dataset.load_label(index).ravel(), minlength=256)[:dataset.label_set.num_classes]
    with ThreadPoolExecutor(4) as pool:  # cv2 releases the GIL while decoding
        return np.stack(list(pool.map(count, range(len(dataset))))).astype(np.int64)


def class_weights(counts: np.ndarray, method: str) -> torch.Tensor:
    """(C,) float32 loss weights from (N, C) per-image pixel counts (``class_pixel_counts``) by ``method``."""
    counts = np.atleast_2d(np.asarray(counts, dtype=np.float64))
    total = counts.sum(0)
    present = total > 0
    if method not in WEIGHTINGS:
        raise UserError(f"unknown class weighting {method!r}; choose one of {', '.join(WEIGHTINGS)}")
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


@dataclass
class RunData:
    train_loader: runtime.StopSafeLoader
    val_loader: runtime.StopSafeLoader | None
    sampler: SeededTrainSampler
    class_weights: torch.Tensor | None
    summary: str
    split: dict[str, list[str]]


class StartedEpoch:
    """One epoch's training batches, asked of the loader ahead of use. With workers, ``iter(DataLoader)`` sets
    them on the epoch's first batches at once (``prefetch_factor`` per worker), so the recipe starts epoch k+1
    before it validates epoch k and the workers prepare while the model validates: the first batches of each
    epoch were most of the data wait on a GPU. Without workers nothing is made ahead."""

    def __init__(self, loader: runtime.StopSafeLoader, sampler: SeededTrainSampler, epoch: int, skip: int = 0):
        sampler.set_epoch(epoch, skip)
        self.length, self.iterator = len(loader), iter(loader)

    def __len__(self) -> int:
        return self.length

    def __iter__(self):
        return self.iterator


def crop_and_base_size(args: argparse.Namespace) -> tuple[tuple[int, int], int]:
    """--crop-size (H, or H W) and --base-size, or the dataset's defaults."""
    layout = get_layout(args.dataset)
    crop = (args.crop_size[0], args.crop_size[-1]) if args.crop_size else tuple(layout.crop_size)
    return crop, args.base_size or layout.base_size


def loss_weights(train_set: SegmentationDataset, method: str, state: dict | None) -> torch.Tensor | None:
    """The cross-entropy's class weights: computed once from the training labels, then kept in the checkpoint."""
    if method == "none":
        return None
    if state is not None and state.get("class_weights") is not None:
        return state["class_weights"]
    return class_weights(class_pixel_counts(train_set), method)


def stages_text(stages: tuple) -> str:
    """The resolution stages for the run's start line, e.g. ", first 50 epochs at scale 0.5"."""
    return "".join(f", {'first' if i == 0 else 'then'} {epochs} epochs at scale {scale:g}"
                   for i, (scale, epochs) in enumerate(stages))


def describe_cache(dataset: SegmentationDataset, name: str) -> str:
    if dataset.decoded_gb is None:
        return f"{name} decoded in workers (cache off)"
    where = "cached in memory" if dataset.cached else "decoded in workers"
    return f"{name} {where} ({dataset.decoded_gb:.2f} GB decoded, budget {dataset.cache_budget_gb:.1f} GB)"


def loader_generator(args: argparse.Namespace, ctx: runtime.Context, which: int) -> torch.Generator:
    """A loader's own generator, different for each loader and rank."""
    return torch.Generator().manual_seed((args.seed * 1_000_003 + ctx.rank) * 2 + which)


def make_loaders(args: argparse.Namespace, ctx: runtime.Context, run_dir: Path, label_set: LabelSet,
                 plan: list[Stage], state: dict | None = None) -> RunData:
    """Training loader (seeded sampler, augmentation, ``plan``'s scale each epoch) and validation loader (full
    images batched by size, each scored once over all ranks), labels as ``label_set``'s classes."""
    # a new run's split is --split-dir's or the data's; a resumed run reads back what it wrote into its folder, so a
    # data folder that gained or lost files cannot change it
    split, source = resolve_split(args.dataset, args.data_root, ("train", "val"), None if state else args.split_dir,
                                  (run_dir,) if state else ())
    crop, base = crop_and_base_size(args)
    # each process holds its own cache: the default budget (half the free memory) is shared by a node's processes;
    # one budget per process, train's images first, val's in what is left
    local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    cache = default_cache_gb() / local_processes if args.cache_gb is None else args.cache_gb
    train_set = SegmentationDataset(args.dataset, args.data_root, split["train"], label_set,
                                    TrainAugmentation(crop, base), cache=cache)
    left = max(0.0, cache - (train_set.decoded_gb if train_set.cached else 0.0))
    val_set = SegmentationDataset(args.dataset, args.data_root, split["val"], label_set, cache=left)
    if len(train_set) < args.batch_size * ctx.world_size:
        raise UserError(f"{args.data_root}: {len(train_set)} training images are fewer than one batch "
                        f"({args.batch_size} x {ctx.world_size} processes); lower --batch-size")
    weights = loss_weights(train_set, args.class_weights, state)
    sampler = SeededTrainSampler(len(train_set), args.seed, ctx.rank, ctx.world_size, plan)
    sizes = [image_size(image) for image, _ in val_set.paths]
    # batches help a GPU; on the CPU one full-size image at a time measured faster (docs/results.md)
    val_batches = ShapeBatchSampler(sizes, args.batch_size if ctx.device.type == "cuda" else 1, ctx.rank,
                                    ctx.world_size)
    workers = runtime.worker_count(args.workers, ctx.world_size)
    common = dict(num_workers=workers, pin_memory=ctx.device.type == "cuda", persistent_workers=workers > 0,
                  multiprocessing_context=WORKER_START if workers > 0 else None)
    # each loader draws its worker seeds from its own generator: drawing them from the global one would move the
    # state that checkpoints save, and an iterator started before a checkpoint (StartedEpoch) would then differ
    train_batches = BatchSampler(sampler, args.batch_size, drop_last=True)
    train_loader = runtime.StopSafeLoader(train_set, batch_sampler=train_batches,
                                          generator=loader_generator(args, ctx, 0), **common)
    val_loader = runtime.StopSafeLoader(val_set, batch_sampler=val_batches, generator=loader_generator(args, ctx, 1),
                                        **common) if len(val_set) else None  # none: a final fit, no selection
    summary = (f"{args.dataset} layout: {len(train_set)} train / {len(val_set)} val images ({source}), crop "
               f"{crop[0]}x{crop[1]}{stages_text(args.stages)}, {workers} loader workers; "
               f"{describe_cache(train_set, 'train')}, {describe_cache(val_set, 'val')}")
    if not len(val_set):
        summary += ("\nno validation images (an empty val.txt): a final fit, which trains its whole schedule and keeps "
                    "the last epoch as best.pt")
    if weights is not None:
        summary += f"\nclass weights ({args.class_weights}): " + " ".join(
            f"{name} {w:.2f}" for name, w in zip(label_set.class_names, weights.tolist()))
    return RunData(train_loader, val_loader, sampler, weights, summary, split)
