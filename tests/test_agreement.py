"""Figures that must agree: validation loss and training loss are one definition (class weights included),
test.py on best.pt reproduces the run's own validation and predicts folders and videos at the run's precision, a
metrics.csv row describes one class set, its lr is the
rate the epoch trained at, and WARMUP_EPOCHS = 0 means no warm-up."""
from __future__ import annotations

import csv
import json
import types

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import train_argv, write_video

import main
import test as evaluation
from labels import get_label_set
from segmentation import engine
from segmentation.engine import EpochProgress, evaluate, make_optimizer, segmentation_loss, stage_plan
from segmentation.metrics import evaluation_report
from segmentation.records import epoch_record


class FixedScores(torch.nn.Module):
    """A 'model' that returns precomputed logits, one batch after another."""

    def __init__(self, logits: list[torch.Tensor]):
        super().__init__()
        self.logits = iter(logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return next(self.logits)


def test_validation_loss_under_class_weights_is_the_training_losss_weighted_mean():
    generator = torch.Generator().manual_seed(0)
    logits = [torch.randn(1, 5, 8, 12, generator=generator) for _ in range(3)]
    targets = [torch.randint(0, 5, (1, 8, 12), generator=generator, dtype=torch.uint8) for _ in range(3)]
    targets[1][0, :3] = 255
    weights = torch.tensor([0.5, 1.0, 2.0, 4.0, 8.0])
    loader = [(torch.zeros(1, 3, 8, 12, dtype=torch.uint8), target) for target in targets]
    _, loss = evaluate(FixedScores(logits), loader, 5, torch.device("cpu"), show=False, class_weights=weights)
    all_logits = torch.cat([x.permute(0, 2, 3, 1).reshape(-1, 5) for x in logits])
    all_targets = torch.cat([t.reshape(-1) for t in targets]).long()
    expected = F.cross_entropy(all_logits, all_targets, weight=weights, ignore_index=255)
    assert loss == pytest.approx(expected.item(), rel=1e-6)
    assert expected.item() == pytest.approx(segmentation_loss(all_logits, all_targets, weights).item(), rel=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("device", ["cpu", "cpu-bf16", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU (scripts/gpu_results.sh runs it)"))])
def test_test_py_on_best_pt_reproduces_the_runs_validation_exactly(synthetic_root, tmp_path, device, monkeypatch):
    """cpu-bf16: CPU autocast in bfloat16 stands in for a GPU's, so that a test.py that scored in another precision
    than the run validated in fails here too (plain CPU runs are float32 on both sides). On CUDA main.py validates
    in batches with cuDNN autotuning and test.py one image at a time, so the two agree to a tolerance there."""
    if device == "cpu-bf16":
        monkeypatch.setattr(main.runtime, "amp_dtype_for", lambda device, amp: torch.bfloat16 if amp else None)
    run, device = tmp_path / "run", device.removesuffix("-bf16")
    main.train(main.parse_args(train_argv(synthetic_root, run, "--arch", "fcn16", "--class-weights", "log",
                                          "--epochs", "3", "--device", device)))
    evaluation.main(["--checkpoint", str(run / "best.pt"), "--split", "val", "--workers", "0", "--device", device,
                     "--num-visuals", "0", "--out", str(tmp_path / "scored")])
    scored = json.loads((tmp_path / "scored" / "metrics.json").read_text())
    state = torch.load(run / "best.pt", weights_only=True)
    best = max(state["history"], key=lambda row: row["val_mIoU"])
    exact = device == "cpu"  # the same computation, image by image
    assert scored["benchmark_mIoU"] == pytest.approx(best["val_mIoU"], abs=0 if exact else 2e-3)
    assert state["best_miou"] == best["val_mIoU"]
    assert scored["loss"] == pytest.approx(best["val_loss"], rel=1e-12 if exact else 2e-3)  # both weighted alike
    runs_at = main.runtime.amp_dtype_for(torch.device(device), True)
    assert scored["precision"] == main.runtime.precision_name(runs_at)


def test_folders_and_videos_are_predicted_at_the_runs_precision_like_its_split(trained_run, synthetic_root,
                                                                             tmp_path, monkeypatch):
    """CPU autocast in bfloat16 stands in for a GPU's: the run's --amp setting must reach every path of test.py,
    so that a folder holding the val images gets the label-id PNGs the val evaluation writes."""
    monkeypatch.setattr(evaluation.runtime, "amp_dtype_for", lambda device, amp: torch.bfloat16 if amp else None)
    precisions, real_autocast = [], engine.autocast
    monkeypatch.setattr(engine, "autocast", lambda device, dtype: precisions.append(dtype) or real_autocast(device,
                                                                                                            dtype))
    common = ["--checkpoint", str(trained_run / "best.pt"), "--device", "cpu", "--workers", "0", "--num-visuals", "0"]
    evaluation.main([*common, "--split", "val", "--out", str(tmp_path / "val")])
    evaluation.main([*common, "--images", str(synthetic_root / "training" / "image_2"), "--out", str(tmp_path / "dir")])
    frames = [cv2.imread(str(p)) for p in sorted((synthetic_root / "testing" / "image_2").glob("*.png"))]
    write_video(tmp_path / "drive.mp4", frames)
    evaluation.main([*common, "--images", str(tmp_path / "drive.mp4"), "--out", str(tmp_path / "video")])
    assert precisions and set(precisions) == {torch.bfloat16}
    val_names = (trained_run / "val.txt").read_text().split()
    for name in val_names:
        assert np.array_equal(cv2.imread(str(tmp_path / "val" / "pred_labelIds" / f"{name}.png"), cv2.IMREAD_UNCHANGED),
                              cv2.imread(str(tmp_path / "dir" / "pred_labelIds" / f"{name}.png"), cv2.IMREAD_UNCHANGED))


def test_a_metrics_row_scores_the_benchmark_classes_only_in_the_full_label_set():
    full = get_label_set("full")
    confusion = np.zeros((full.num_classes, full.num_classes), dtype=np.int64)
    road, car, ego = (full.class_names.index(name) for name in ("road", "car", "ego vehicle"))
    confusion[road, road], confusion[car, road] = 60, 40  # benchmark pixels: 60 of 100 right
    confusion[ego, ego] = 900  # right, but not a benchmark class: no part of the 19-class figures
    report = evaluation_report(confusion, full)
    row = epoch_record(1, 0.01, EpochProgress(step=1), 0.0, report, 0.0, torch.device("cpu"))
    assert row["pixel_acc"] == pytest.approx(0.6)
    assert report["pixel_acc"] == pytest.approx(0.96)  # the 34 ids' accuracy, which metrics.csv must not mix in


def test_the_logged_lr_is_the_mean_rate_of_the_epochs_steps(synthetic_root, tmp_path):
    run = tmp_path / "run"
    main.train(main.parse_args(train_argv(synthetic_root, run, "--arch", "fcn32", "--warmup-epochs", "0",
                                          "--poly-power", "1", "--lr", "0.01")))
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    steps, total = 4, 8  # 8 training images, batch 2, 2 epochs
    for epoch, row in enumerate(rows):
        expected = 0.01 * np.mean([1 - step / total for step in range(epoch * steps, (epoch + 1) * steps)])
        assert float(row["lr"]) == pytest.approx(expected, rel=1e-6)


def test_zero_warmup_epochs_runs_the_first_step_at_the_full_rate():
    model = torch.nn.Conv2d(3, 2, 1)
    args = types.SimpleNamespace(lr=0.01, momentum=0.9, weight_decay=0.0, epochs=2, stages=(), warmup_epochs=0.0,
                                 poly_power=0.9)
    optimizer, _ = make_optimizer(model, args, stage_plan(args.stages, args.epochs), steps_per_epoch=10)
    assert optimizer.param_groups[0]["lr"] == 0.01
    args.warmup_epochs = 1.0
    optimizer, _ = make_optimizer(model, args, stage_plan(args.stages, args.epochs), steps_per_epoch=10)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.001)
