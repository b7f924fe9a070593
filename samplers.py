"""Samplers that make training order and augmentation reproducible, and evaluation exact under DDP."""
from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import Sampler


class SeededTrainSampler(Sampler):
    """Shuffles once per epoch from (seed, epoch) and yields ``(index, augmentation_seed)`` pairs.

    Because each sample carries its own seed, a crop/flip/jitter is a pure function of (seed, epoch,
    position): the same for any worker count, after ``--resume``, and across DDP world sizes. Under DDP
    each rank takes every ``world_size``-th position of the shared permutation; like
    ``DistributedSampler`` the permutation is padded by repetition to a multiple of the world size, which
    is harmless for training (it never touches evaluation, see ``ShardSampler``).
    ``set_epoch(epoch, skip)`` starts the epoch ``skip`` samples in (this rank's), for mid-epoch resume.
    """

    def __init__(self, num_samples: int, seed: int, rank: int = 0, world_size: int = 1):
        self.num_samples, self.seed, self.rank, self.world_size = num_samples, seed, rank, world_size
        self.per_rank = -(-num_samples // world_size)
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = epoch, skip

    def __len__(self) -> int:
        return self.per_rank - self.skip

    def __iter__(self) -> Iterator[tuple[int, int]]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.num_samples, generator=g)
        order = order.repeat(-(-self.per_rank * self.world_size // self.num_samples))[: self.per_rank * self.world_size]
        sample_seeds = torch.randint(0, 2**62, (len(order),), generator=g)
        positions = range(self.rank, len(order), self.world_size)
        for position in list(positions)[self.skip:]:
            yield int(order[position]), int(sample_seeds[position])


class ShardSampler(Sampler):
    """Evaluation sampler: rank r gets indices r, r+W, r+2W, ... with no padding.

    ``DistributedSampler`` pads by repeating images so every rank has the same count; an all-reduced
    confusion matrix would then count those images twice. Here every image is seen exactly once.
    """

    def __init__(self, num_samples: int, rank: int = 0, world_size: int = 1):
        self.indices = range(rank, num_samples, world_size)

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)


class ShapeBatchSampler(Sampler):
    """Evaluation batches of same-sized images, split across DDP ranks without padding.

    Full-size validation images cannot be stacked unless they share a size; KITTI has a handful of sizes,
    so grouping by size lets validation run batches instead of one image at a time. Batches hold at most
    ``batch_size`` images and ``max_pixels`` pixels; rank r takes batches r, r+W, r+2W, ..., so every image
    is scored exactly once over all ranks.
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
