"""Batches augmented on the training device from resident images equal the DataLoader's, sample for sample."""
import pytest
import torch
from torch.utils.data import BatchSampler, DataLoader

import main
from augmentation import train_augmentation
from conftest import train_argv
from data_preprocessing import SegmentationDataset, png_size
from layouts import list_labelled
from errors import UserError
from resident_batches import ResidentBatches, check_fits_on_device
from samplers import SeededTrainSampler, ShapeBatchSampler


def assert_same_batches(loader, resident) -> None:
    batches = list(zip(loader, resident, strict=True))
    assert batches
    for (images, labels), (r_images, r_labels) in batches:
        assert torch.equal(images, r_images) and torch.equal(labels, r_labels)


def test_training_batches_equal_the_loaders_also_from_mid_epoch(synthetic_root):
    dataset = SegmentationDataset("kitti", synthetic_root, list_labelled(synthetic_root), cache=1.0,
                                  transform=train_augmentation(64, 96))
    sampler = SeededTrainSampler(len(dataset), seed=3)
    batches = BatchSampler(sampler, 3, drop_last=True)
    resident = ResidentBatches(dataset, batches, torch.device("cpu"))
    for epoch, skip in ((0, 0), (1, 3)):
        sampler.set_epoch(epoch, skip)
        assert_same_batches(DataLoader(dataset, batch_sampler=batches, num_workers=2), resident)
    assert len(resident) == (len(dataset) - 3) // 3


def test_validation_batches_equal_the_loaders(synthetic_root):
    dataset = SegmentationDataset("kitti", synthetic_root, list_labelled(synthetic_root), cache=1.0)
    batches = ShapeBatchSampler([png_size(image) for image, _ in dataset.paths], 4)
    resident = ResidentBatches(dataset, batches, torch.device("cpu"))
    assert_same_batches(DataLoader(dataset, batch_sampler=batches), resident)


def test_a_run_augmenting_on_the_device_ends_with_the_loader_runs_weights(synthetic_root, trained_run, tmp_path):
    """trained_run augments in the loader workers (the default); on the CPU both paths are bit-identical."""
    main.train(main.parse_args(train_argv(synthetic_root, tmp_path / "resident", "--arch", "fcn16",
                                          "--augment-on", "device")))
    loader_run = torch.load(trained_run / "last.pt", weights_only=True)
    resident_run = torch.load(tmp_path / "resident" / "last.pt", weights_only=True)
    assert [r["train_loss"] for r in loader_run["history"]] == [r["train_loss"] for r in resident_run["history"]]
    for key, value in loader_run["model"].items():
        assert torch.equal(value, resident_run["model"][key]), key


def test_augmenting_on_the_device_without_the_cache_is_refused_in_one_line(synthetic_root, tmp_path):
    with pytest.raises(UserError, match="--augment-on device needs the images cached"):
        main.train(main.parse_args(train_argv(synthetic_root, tmp_path / "run", "--augment-on", "device",
                                              "--no-cache")))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_a_gpu_the_batches_differ_from_the_loaders_only_by_rounding(synthetic_root):
    """Same crops, flips and jitter factors (drawn on the CPU); only the GPU's interpolation rounds differently."""
    dataset = SegmentationDataset("kitti", synthetic_root, list_labelled(synthetic_root), cache=1.0,
                                  transform=train_augmentation(64, 96))
    batches = BatchSampler(SeededTrainSampler(len(dataset), seed=3), 3, drop_last=True)
    resident = ResidentBatches(dataset, batches, torch.device("cuda"))
    for (images, labels), (r_images, r_labels) in zip(DataLoader(dataset, batch_sampler=batches), resident,
                                                        strict=True):
        assert r_images.is_cuda and r_images.dtype == torch.uint8
        assert (r_labels.cpu() == labels).float().mean() > 0.999
        assert ((r_images.cpu().int() - images.int()).abs() <= 3).float().mean() > 0.999


def test_images_too_large_for_the_gpu_are_refused_in_one_line(synthetic_root, monkeypatch):
    """The GPU's free memory is faked: the check reads it, and needs no GPU to be tested."""
    dataset = SegmentationDataset("kitti", synthetic_root, list_labelled(synthetic_root), cache=1.0)
    needed = 2 * dataset.decoded_gb * 1e9
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (int(2 * needed - 1e3), int(4 * needed)))
    with pytest.raises(UserError, match=r"^--augment-on device: the images take .* GB, more than half of the .* GB "
                                        r"free on cuda; use --augment-on workers$"):
        check_fits_on_device([dataset, dataset], torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (int(2 * needed + 1e3), int(4 * needed)))
    check_fits_on_device([dataset, dataset], torch.device("cuda"))  # fits in half: accepted
