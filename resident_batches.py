"""Batches cut from images that live on the training device: no loader processes, no copies per step.

On a GPU the DataLoader path decodes nothing (the images are cached as uint8) but still crops, flips and
jitters every sample on the CPU, ships it between processes and copies it to the device: the measured data
wait was 20-23% of each training epoch (H200, issue 13). Here the decoded images are copied to the device
once and each step's samples are augmented there, one by one, by the dataset's own ``augment``: the same
transform, with its random parameters drawn on the CPU from the same per-sample seed. On the CPU the
batches are therefore bit-identical to the DataLoader's (tested); on a GPU they differ only by the rounding
of its interpolation kernels.
"""
from __future__ import annotations

from typing import Iterable, Iterator

import torch

from data_preprocessing import SegmentationDataset

RESIDENT_SHARE_OF_FREE_MEMORY = 0.25  # auto puts images on the GPU only if they take at most this share of it


class ResidentBatches:
    """Iterates like a DataLoader over ``batch_sampler``'s batches (lists of indices, or of ``(index, seed)``
    pairs from ``SeededTrainSampler``), yielding ``(uint8 images (N, 3, H, W), uint8 labels (N, H, W))`` on
    ``device``. Samples in a batch must end the same size: training crops, or ``ShapeBatchSampler``'s."""

    def __init__(self, dataset: SegmentationDataset, batch_sampler: Iterable, device: torch.device):
        self.dataset, self.batch_sampler = dataset, batch_sampler
        self.pairs = [tuple(t.to(device) for t in dataset.pair(i)) for i in range(len(dataset))]

    def __len__(self) -> int:
        return len(self.batch_sampler)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for batch in self.batch_sampler:
            keys = [key if isinstance(key, tuple) else (key, None) for key in batch]
            samples = [self.dataset.augment(*self.pairs[index], seed) for index, seed in keys]
            yield torch.stack([image for image, _ in samples]), torch.stack([label for _, label in samples])


def fits_on_device(datasets: list[SegmentationDataset], device: torch.device) -> bool:
    """True when every dataset is cached and together they take at most RESIDENT_SHARE_OF_FREE_MEMORY of the
    device's free memory (uint8 image and label: 4 bytes a pixel, ``decoded_gb``)."""
    if device.type != "cuda" or not all(d.cached for d in datasets):
        return False
    free_bytes, _ = torch.cuda.mem_get_info(device)
    return sum(d.decoded_gb for d in datasets) * 1e9 <= RESIDENT_SHARE_OF_FREE_MEMORY * free_bytes
