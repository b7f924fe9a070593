"""run_data.make_loaders: how the training loader's workers get the dataset."""
import multiprocessing
import sys

import pytest
import torch

import distributed
import main
from conftest import train_argv
from data_preprocessing import SegmentationDataset
from run_data import make_loaders


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
    args = main.parse_args(train_argv(synthetic_root, tmp_path / "run"))
    data = make_loaders(args, distributed.Context(0, 1, torch.device("cpu")), tmp_path, workers=1)
    assert data.train_loader.dataset.cached

    def refuse(self, protocol):
        raise AssertionError("the dataset, cache included, was pickled to start a loader worker")
    monkeypatch.setattr(SegmentationDataset, "__reduce_ex__", refuse)
    images, labels = next(iter(data.train_loader))
    assert images.shape == (2, 3, 64, 64) and labels.shape == (2, 64, 64)
