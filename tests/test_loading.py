"""segmentation.loading: seeded training order, exact evaluation batches, and the loaders a run makes."""
import multiprocessing
import sys

import pytest
import torch
from conftest import train_argv

import main
from data_preprocessing import SegmentationDataset
from labels import get_label_set
from segmentation import runtime
from segmentation.engine import stage_plan
from segmentation.loading import SeededTrainSampler, ShapeBatchSampler, make_loaders


@pytest.fixture
def forkserver_by_default():
    """Python 3.14's default start method on Linux, on any Python."""
    previous = multiprocessing.get_start_method()
    multiprocessing.set_start_method("forkserver", force=True)
    yield
    multiprocessing.set_start_method(previous, force=True)


@pytest.mark.skipif(sys.platform != "linux", reason="workers are forked on Linux only")
def test_workers_share_the_cached_dataset_by_fork_not_by_pickling(synthetic_root, tmp_path, monkeypatch,
                                                                  forkserver_by_default):
    args = main.parse_args(train_argv(synthetic_root, tmp_path / "run", "--workers", "1"))
    data = make_loaders(args, runtime.Context(0, 1, torch.device("cpu")), tmp_path, get_label_set("train"),
                        stage_plan(args.stages, args.epochs))
    assert data.train_loader.dataset.cached

    def refuse(self, protocol):
        raise AssertionError("the dataset, cache included, was pickled to start a loader worker")
    monkeypatch.setattr(SegmentationDataset, "__reduce_ex__", refuse)
    images, labels = next(iter(data.train_loader))
    assert images.shape == (2, 3, 64, 64) and labels.shape == (2, 64, 64)


def test_a_non_square_crop_keeps_its_orientation_height_then_width(synthetic_root, tmp_path):
    args = main.parse_args(train_argv(synthetic_root, tmp_path / "run", "--crop-size", "64", "96"))
    data = make_loaders(args, runtime.Context(0, 1, torch.device("cpu")), tmp_path, get_label_set("train"),
                        stage_plan(args.stages, args.epochs))
    images, labels = next(iter(data.train_loader))
    assert images.shape == (2, 3, 64, 96) and labels.shape == (2, 64, 96)
    assert "crop 64x96" in data.summary


def test_training_order_is_a_function_of_seed_and_epoch():
    sampler = SeededTrainSampler(20, seed=1)
    sampler.set_epoch(3)
    first = list(sampler)
    assert first == list(sampler)
    sampler.set_epoch(4)
    assert [i for i, *_ in first] != [i for i, *_ in sampler]
    assert sorted(i for i, *_ in first) == list(range(20))


def test_ddp_ranks_share_one_permutation_without_overlap_beyond_padding():
    world = 3
    per_rank = [list(SeededTrainSampler(10, seed=0, rank=r, world_size=world)) for r in range(world)]
    assert all(len(items) == 4 for items in per_rank)  # 10 padded to 12
    indices = [i for items in per_rank for i, *_ in items]
    assert set(indices) == set(range(10)) and len(indices) == 12


def test_skip_resumes_the_same_sequence_mid_epoch():
    sampler = SeededTrainSampler(16, seed=2)
    sampler.set_epoch(1)
    full = list(sampler)
    sampler.set_epoch(1, skip=6)
    assert list(sampler) == full[6:] and len(sampler) == 10


def test_shape_batches_hold_one_size_each_and_cover_every_image_once_over_ranks():
    sizes = [(375, 1242), (370, 1224), (375, 1242), (374, 1238), (375, 1242), (370, 1224), (375, 1242)]
    shards = [list(ShapeBatchSampler(sizes, batch_size=2, rank=r, world_size=2)) for r in range(2)]
    batches = shards[0] + shards[1]
    assert all(len({sizes[i] for i in batch}) == 1 and 1 <= len(batch) <= 2 for batch in batches)
    assert sorted(i for batch in batches for i in batch) == list(range(len(sizes)))
    assert list(ShapeBatchSampler(sizes, batch_size=8, max_pixels=2 * 375 * 1242)) == [[1, 5], [3], [0, 2], [4, 6]]


def test_batched_validation_equals_one_image_at_a_time(synthetic_root):
    import torch
    from torch.utils.data import DataLoader

    from data_preprocessing import KittiSemantics
    from model import build_model
    from segmentation.engine import evaluate
    from segmentation.layouts import list_labelled
    dataset = KittiSemantics(synthetic_root, list_labelled(synthetic_root)[:5])
    torch.manual_seed(0)
    net = build_model("fcn16", 19, pretrained=False)
    batched = DataLoader(dataset, batch_sampler=ShapeBatchSampler([(96, 320)] * 5, batch_size=4))
    one_by_one = DataLoader(dataset, 1)
    (confusion_a, loss_a), (confusion_b, loss_b) = (evaluate(net, loader, 19, torch.device("cpu"), show=False)
                                                    for loader in (batched, one_by_one))
    assert len(batched) == 2 and (confusion_a.matrix == confusion_b.matrix).all()
    assert abs(loss_a - loss_b) < 1e-6 * abs(loss_b)


def test_one_cache_budget_holds_train_first_and_val_in_what_is_left(synthetic_root, tmp_path):
    def loaders(cache_gb: float):
        args = main.parse_args(["--no-pretrained", "--data-root", str(synthetic_root), "--workers", "0",
                                "--cache-gb", str(cache_gb), "--batch-size", "2"])
        return make_loaders(args, runtime.Context(0, 1, torch.device("cpu")), tmp_path, get_label_set("train"),
                            stage_plan(args.stages, args.epochs))
    whole = loaders(1.0)
    train_gb, val_gb = whole.train_loader.dataset.decoded_gb, whole.val_loader.dataset.decoded_gb
    assert whole.train_loader.dataset.cached and whole.val_loader.dataset.cached
    tight = loaders(train_gb + val_gb / 2)  # each fits alone, not both
    assert tight.train_loader.dataset.cached and not tight.val_loader.dataset.cached
