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
from errors import UserError

RESIDENT_SHARE_OF_FREE_MEMORY = 0.5  # images may take at most this share of the GPU's free memory


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


def check_fits_on_device(datasets: list[SegmentationDataset], device: torch.device) -> None:
    """Refuse, in one line, images that are not cached in memory or would take more than
    RESIDENT_SHARE_OF_FREE_MEMORY of a GPU's free memory (uint8 image and label: ``decoded_gb``)."""
    if not all(d.cached for d in datasets):
        raise UserError("--augment-on device needs the images cached in memory, and they are not (see --cache-gb); "
                        "use --augment-on workers, or a larger --cache-gb")
    if device.type == "cuda":
        free_gb = torch.cuda.mem_get_info(device)[0] / 1e9
        needed_gb = sum(d.decoded_gb for d in datasets)
        if needed_gb > RESIDENT_SHARE_OF_FREE_MEMORY * free_gb:
            raise UserError(f"--augment-on device: the images take {needed_gb:.1f} GB, more than half of the "
                            f"{free_gb:.1f} GB free on {device}; use --augment-on workers")
