"""Shared fixtures: a small synthetic KITTI tree and the five real KITTI frames shipped in tests/data."""
from __future__ import annotations

import shutil
from pathlib import Path

import cv2
import pytest

from segmentation.synthetic import write_synthetic_kitti

KITTI_SAMPLE = Path(__file__).parent / "data" / "kitti-sample"


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    """10 labelled + 2 test scenes at a reduced size (96 x 320), shared read-only by the tests."""
    return write_synthetic_kitti(tmp_path_factory.mktemp("synthetic"), num_train=10, num_test=2, seed=0, size=(96, 320))


@pytest.fixture
def writable_tree(tmp_path, synthetic_root) -> Path:
    """A private copy of the synthetic tree that a test may damage."""
    return Path(shutil.copytree(synthetic_root, tmp_path / "tree"))


def one_line_error(entry_point, argv) -> str:
    """Run a command's main(argv), which must exit with one line "error: ..." (status 1, no traceback)."""
    with pytest.raises(SystemExit) as stop:
        entry_point(argv)
    message = str(stop.value.code)
    assert message.startswith("error: ") and "\n" not in message, message
    return message


def write_video(path: Path, frames_bgr: list, fps: float = 10.0) -> None:
    """An MP4 file (OpenCV's mp4v) of BGR frames, as test.py --images reads it."""
    height, width = frames_bgr[0].shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (width, height))
    for frame in frames_bgr:
        writer.write(frame)
    writer.release()


def train_argv(data_root: Path, out: Path, *extra: str) -> list[str]:
    """main.py flags for a tiny, fast CPU run on a synthetic tree."""
    return ["--no-pretrained", "--device", "cpu", "--epochs", "2", "--batch-size", "2", "--crop-size", "64",
            "--workers", "0", "--log-every", "2", "--data-root", str(data_root), "--out", str(out), *extra]


@pytest.fixture(scope="session")
def trained_run(synthetic_root, tmp_path_factory) -> Path:
    """A finished 2-epoch fcn16 run folder (checkpoints, metrics.csv, split files)."""
    import main
    out = tmp_path_factory.mktemp("runs") / "fcn16"
    main.train(main.parse_args(train_argv(synthetic_root, out, "--arch", "fcn16")))
    return out


def stopped_after_first_epoch(data_root: Path, out: Path, monkeypatch, *extra: str) -> dict:
    """A 3-epoch run stopped by Ctrl-C while epoch 1 validates, as a user stops one; returns its last.pt's state."""
    import signal

    import torch

    import main
    real_evaluate = main.evaluate

    def evaluate_interrupted(*args, **kwargs):
        signal.raise_signal(signal.SIGINT)
        return real_evaluate(*args, **kwargs)
    with monkeypatch.context() as patch:
        patch.setattr(main, "evaluate", evaluate_interrupted)
        with pytest.raises(SystemExit):
            main.train(main.parse_args(train_argv(data_root, out, "--arch", "fcn32", "--epochs", "3", *extra)))
    return torch.load(out / "last.pt", weights_only=True)
