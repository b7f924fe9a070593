"""The data side of a training run: which images (the split, kept in the run folder), the two loaders, and
the class weights of the loss. main.py calls ``make_loaders`` once; what differs between datasets lives in
layouts.py and augmentation.py's ``DATASET_DEFAULTS``."""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import BatchSampler, DataLoader

import distributed
from class_weights import class_pixel_counts, class_weights
from augmentation import DATASET_DEFAULTS, train_augmentation
from data_preprocessing import SegmentationDataset, default_cache_gb, png_size
from layouts import default_split_for, labelled_names, write_split
from errors import UserError
from labels import get_label_set
from resident_batches import ResidentBatches, check_fits_on_device
from samplers import SeededTrainSampler, ShapeBatchSampler


# Loader workers see the decoded cache copy-on-write only when forked. Python 3.14 made forkserver Linux's default,
# which pickles the dataset, cache included, into every worker: 7.1 s to the first batch against 0.08 s by fork
# (2 workers, 100 cached KITTI frames, forkserver forced on Python 3.11). Other systems keep their default (spawn).
WORKER_START = "fork" if sys.platform == "linux" else None


@dataclass
class RunData:
    train_loader: DataLoader | ResidentBatches
    val_loader: DataLoader | ResidentBatches
    sampler: SeededTrainSampler
    class_weights: torch.Tensor | None
    summary: str


class StartedEpoch:
    """One epoch's training batches, asked of the loader ahead of use. With workers, ``iter(DataLoader)`` sets
    them on the epoch's first batches at once (``prefetch_factor`` per worker), so main.py starts epoch k+1
    before it validates epoch k and the workers prepare while the GPU validates: the first batches of each
    epoch were most of the data wait on a GPU. Without workers, and for ResidentBatches, nothing is made
    ahead."""

    def __init__(self, loader: DataLoader | ResidentBatches, sampler: SeededTrainSampler, epoch: int, skip: int):
        sampler.set_epoch(epoch, skip)
        self.length, self.iterator = len(loader), iter(loader)

    def __len__(self) -> int:
        return self.length

    def __iter__(self):
        return self.iterator


def run_split(args: argparse.Namespace, ctx: distributed.Context, run_dir: Path,
              resuming: bool) -> dict[str, list[str]]:
    """The train/val names. A new run takes --split-dir's files or the dataset's default split and writes them
    into the run folder; a resumed run reads them back from there, so a data folder that gained or lost files
    cannot change it."""
    split_dir = run_dir if resuming else args.split_dir
    if split_dir is None:
        split = default_split_for(args.dataset, args.data_root)
    else:
        split = {name: labelled_names(args.dataset, args.data_root, name, split_dir) for name in ("train", "val")}
        shared = sorted(set(split["train"]) & set(split["val"]))
        if shared:
            raise UserError(f"{split_dir}: {', '.join(shared[:5])} in both train.txt and val.txt; validation would "
                            "score training images, so keep each name in one file")
    if ctx.is_main and not resuming:
        write_split(split, run_dir)
    return split


def crop_and_base_size(args: argparse.Namespace) -> tuple[tuple[int, int], int]:
    """--crop-size (H, or H W) and --base-size, or the dataset's defaults."""
    defaults = DATASET_DEFAULTS[args.dataset]
    crop = (args.crop_size[0], args.crop_size[-1]) if args.crop_size else tuple(defaults["crop_size"])
    return crop, args.base_size or defaults["base_size"]


def loss_weights(train_set: SegmentationDataset, method: str, state: dict | None) -> torch.Tensor | None:
    """The cross-entropy's class weights: computed once from the training labels, then kept in the checkpoint."""
    if method == "none":
        return None
    if state is not None and state.get("class_weights") is not None:
        return state["class_weights"]
    return class_weights(class_pixel_counts(train_set), method)


def describe_cache(dataset: SegmentationDataset, name: str) -> str:
    if dataset.decoded_gb is None:
        return f"{name} decoded in workers (cache off)"
    where = "cached in memory" if dataset.cached else "decoded in workers"
    return f"{name} {where} ({dataset.decoded_gb:.2f} GB decoded, budget {dataset.cache_budget_gb:.1f} GB)"


def loader_generator(args: argparse.Namespace, ctx: distributed.Context, which: int) -> torch.Generator:
    """A loader's own generator, different for each loader and rank."""
    return torch.Generator().manual_seed((args.seed * 1_000_003 + ctx.rank) * 2 + which)


def make_loaders(args: argparse.Namespace, ctx: distributed.Context, run_dir: Path, workers: int,
                 state: dict | None = None) -> RunData:
    """Training loader (seeded sampler, augmentation) and validation loader (full images batched by size, each
    scored once over all ranks)."""
    split = run_split(args, ctx, run_dir, resuming=state is not None)
    label_set = get_label_set(args.label_set)
    crop, base = crop_and_base_size(args)
    # each process holds its own cache: the default budget (half the free memory) is shared by a node's processes
    local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    cache = default_cache_gb() / local_processes if args.cache_gb is None else args.cache_gb
    train_set = SegmentationDataset(args.dataset, args.data_root, split["train"], label_set,
                                    train_augmentation(crop, base), cache=cache)
    val_set = SegmentationDataset(args.dataset, args.data_root, split["val"], label_set, cache=cache)
    if len(train_set) < args.batch_size * ctx.world_size:
        raise UserError(f"{args.data_root}: {len(train_set)} training images are fewer than one batch "
                        f"({args.batch_size} x {ctx.world_size} processes); lower --batch-size")
    weights = loss_weights(train_set, args.class_weights, state)
    sampler = SeededTrainSampler(len(train_set), args.seed, ctx.rank, ctx.world_size)
    sizes = [png_size(image) for image, _ in val_set.paths]
    # batches help a GPU; on the CPU one full-size image at a time measured faster (1.25 vs 1.26-1.6 x forwards)
    val_batches = ShapeBatchSampler(sizes, args.batch_size if ctx.device.type == "cuda" else 1, ctx.rank,
                                    ctx.world_size)
    train_batches = BatchSampler(sampler, args.batch_size, drop_last=True)
    if args.augment_on == "device":
        check_fits_on_device([train_set, val_set], ctx.device)
        train_loader, val_loader = (ResidentBatches(train_set, train_batches, ctx.device),
                                    ResidentBatches(val_set, val_batches, ctx.device))
        where = f"images resident on {ctx.device}, augmented there"
    else:
        # each loader draws its worker seeds from its own generator: drawing them from the global one would move
        # the state that checkpoints save, and an iterator started before a checkpoint (StartedEpoch) would then
        # differ on resume
        common = dict(num_workers=workers, pin_memory=ctx.device.type == "cuda", persistent_workers=workers > 0,
                      multiprocessing_context=WORKER_START if workers > 0 else None)
        train_loader = DataLoader(train_set, batch_sampler=train_batches, generator=loader_generator(args, ctx, 0),
                                  **common)
        val_loader = DataLoader(val_set, batch_sampler=val_batches, generator=loader_generator(args, ctx, 1),
                                **common)
        where = f"{workers} loader workers"
    summary = (f"{args.dataset}: {len(train_set)} train / {len(val_set)} val images, crop {crop[0]}x{crop[1]}, "
               f"{where}; {describe_cache(train_set, 'train')}, {describe_cache(val_set, 'val')}")
    if weights is not None:
        summary += f"\nclass weights ({args.class_weights}): " + " ".join(
            f"{name} {w:.2f}" for name, w in zip(label_set.class_names, weights.tolist()))
    return RunData(train_loader, val_loader, sampler, weights, summary)
