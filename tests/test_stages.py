"""Resolution stages (STAGES / --stages): reduced-scale epochs first, sampled on the fly from the images a run
already reads, on every layout; each stage's own warm-up and decay; best.pt from full-scale epochs only; exact
resume inside each stage and at the boundary, after SIGKILL as after Ctrl-C."""
import argparse
import csv
import math
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import one_line_error, stopped_after_first_epoch, train_argv
from test_class_table import write_tree
from test_main import assert_same_history, assert_same_weights, final_weights, history_without_timings

import main
from labels import get_label_set
from segmentation import runtime
from segmentation.augmentation import TrainAugmentation, zoomed
from segmentation.engine import make_optimizer, stage_plan
from segmentation.layouts import resolve_split, write_split
from segmentation.loading import make_loaders
from segmentation.synthetic import write_synthetic_cityscapes

ROOT = Path(__file__).resolve().parents[1]
STAGED = ("--arch", "fcn16", "--epochs", "4", "--stages", "0.5:2")  # 8 train images, batch 2: 4 steps an epoch


def test_a_reduced_stage_crops_at_its_scale_from_the_full_size_image():
    """At zoom 0.5 the crop and the scaling range are those of the image resized to half: a 64x96 crop becomes
    32x48 and the shorter side is drawn from 0.5-2.0 x half the base size."""
    augment = TrainAugmentation((64, 96), base_size=96, jitter=0)
    image = torch.randint(0, 256, (3, 96, 320), dtype=torch.uint8)
    label = torch.randint(0, 3, (96, 320), dtype=torch.uint8)
    sides = []
    for seed in range(50):
        params = augment.scale_crop.draw(96, 320, torch.Generator().manual_seed(seed), zoom=0.5)
        sides.append(params["short_side"])
        out_image, out_label = augment(image, label, torch.Generator().manual_seed(seed), 0.5)
        assert out_image.shape == (3, 32, 48) and out_label.shape == (32, 48)
        assert set(out_label.unique().tolist()) <= {0, 1, 2, 255}  # nearest values, padding ignored
    assert min(sides) >= 24 and max(sides) <= 96 and max(sides) - min(sides) > 40
    full = augment(image, label, torch.Generator().manual_seed(0))
    assert full[0].shape == (3, 64, 96)


def test_validation_at_a_reduced_scale_resizes_images_by_area_and_labels_by_value():
    images = torch.zeros(1, 3, 4, 6, dtype=torch.uint8)
    images[..., :2, :] = 200  # top half bright: its 2x2 blocks average to 200 and 0
    labels = torch.tensor([[[1, 1, 2, 2, 3, 3]] * 4], dtype=torch.uint8)
    small_images, small_labels = zoomed(images, labels, 0.5)
    assert small_images.shape == (1, 3, 2, 3) and small_labels.tolist() == [[[1, 2, 3], [1, 2, 3]]]
    assert small_images[0, 0, 0].tolist() == [200] * 3 and small_images[0, 0, 1].tolist() == [0] * 3


def test_each_stage_warms_up_and_decays_on_its_own():
    args = argparse.Namespace(lr=0.1, momentum=0.9, weight_decay=0.0, warmup_epochs=1.0, poly_power=1.0,
                              epochs=5, stages=((0.5, 2),))
    _, scheduler = make_optimizer(torch.nn.Conv2d(1, 1, 1), args, stage_plan(args.stages, args.epochs),
                                  steps_per_epoch=4)
    rate = [scheduler.lr_lambdas[0](step) for step in range(20)]
    assert rate[0] == pytest.approx(0.1) and rate[4] == pytest.approx(1.0)  # stage 1: 4 warm-up steps, then decay
    assert rate[7] == pytest.approx(1 - 3 / 4)
    assert rate[8] == pytest.approx(0.1) and rate[12] == pytest.approx(1.0)  # stage 2 starts its own warm-up
    assert rate[19] == pytest.approx(1 - 7 / 8)
    assert [stage.scale for stage in stage_plan(args.stages, args.epochs)] == [0.5, 1.0]


@pytest.mark.parametrize("flags, message", [
    (("--stages", "0.5:4"), re.escape("STAGES = ((0.5, 4),) (--stages) take 4 of EPOCHS = 4 epochs")),
    (("--stages", "1.5:1"), "STAGES = .* is not valid: use \\(\\) or \\(scale, epochs\\) pairs"),
    (("--stages", "half"), "STAGES = .*'half'.* is not valid"),
])
def test_stages_that_cannot_run_are_refused_in_one_line(synthetic_root, tmp_path, flags, message):
    line = one_line_error(main.main, train_argv(synthetic_root, tmp_path / "run", "--epochs", "4", *flags))
    assert re.search(message, line), line
    assert not (tmp_path / "run").exists()


def metrics(run: Path) -> list[dict]:
    with open(run / "metrics.csv") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("layout", ["kitti", "cityscapes", "class table"])
def test_stages_run_on_every_layout_and_only_full_scale_epochs_choose_best(synthetic_root, tmp_path, layout):
    flags = ["--arch", "fcn32", "--epochs", "2", "--stages", "0.5:1"]
    root = synthetic_root
    if layout == "cityscapes":
        root = write_synthetic_cityscapes(tmp_path / "city", num_train=4, num_val=2, num_test=0, seed=0, size=(96, 192))
        flags += ["--dataset", "cityscapes", "--crop-size", "64", "128"]
    elif layout == "class table":
        root = write_tree(tmp_path / "tree")
        flags += ["--label-set", str(root / "table.csv"), "--base-size", "64"]
    run = tmp_path / "run"
    main.train(main.parse_args(train_argv(root, run, *flags)))
    rows = metrics(run)
    assert [row["scale"] for row in rows] == ["0.5", "1.0"] and all(float(row["val_mIoU"]) >= 0 for row in rows)
    assert torch.load(run / "best.pt", weights_only=True)["epoch"] == 2  # the half-scale epoch is never best


@pytest.mark.parametrize("layout", ["kitti", "cityscapes"])
def test_the_training_loader_crops_each_epoch_at_its_stage_scale(synthetic_root, tmp_path, layout):
    flags, root, crop = ["--epochs", "3", "--stages", "0.5:2"], synthetic_root, (64, 64)
    if layout == "cityscapes":
        root = write_synthetic_cityscapes(tmp_path / "city", num_train=4, num_val=2, seed=0, size=(96, 192))
        crop = (64, 128)
        flags += ["--dataset", "cityscapes", "--crop-size", "64", "128"]
    args = main.parse_args(train_argv(root, tmp_path / "run", *flags))
    data = make_loaders(args, runtime.Context(0, 1, torch.device("cpu")), tmp_path, get_label_set("train"),
                        stage_plan(args.stages, args.epochs))
    for epoch, scale in ((0, 0.5), (1, 0.5), (2, 1)):
        data.sampler.set_epoch(epoch)
        images, labels = next(iter(data.train_loader))
        size = tuple(int(side * scale) for side in crop)
        assert images.shape[-2:] == size and labels.shape[-2:] == size, (epoch, images.shape)


def test_validation_never_changes_what_a_run_learns_so_a_reduced_stage_is_scored_at_its_end_only(synthetic_root,
                                                                                                  tmp_path):
    """Validation reads the model and touches no training state: a staged run with val images ends with the weights
    of the same run without any (a final fit). So a reduced stage, whose epochs can never become best.pt, is scored
    once, after its last epoch (validation was 8 s of each 43 s half-scale epoch on CamVid)."""
    split = resolve_split("kitti", synthetic_root, ("train", "val")).names
    runs = {}
    for name, val in (("validated", split["val"]), ("final fit", [])):
        write_split({"train": split["train"], "val": val}, tmp_path / f"{name} split")
        runs[name] = tmp_path / name
        main.train(main.parse_args(train_argv(synthetic_root, runs[name], *STAGED, "--split-dir",
                                              str(tmp_path / f"{name} split"))))
    assert_same_weights(final_weights(runs["validated"]), final_weights(runs["final fit"]))
    rows = metrics(runs["validated"])
    assert [row["scale"] for row in rows] == ["0.5", "0.5", "1.0", "1.0"]
    assert [not math.isnan(float(row["val_mIoU"])) for row in rows] == [False, True, True, True]


def test_ctrl_c_inside_a_reduced_stage_resumes_exactly(synthetic_root, tmp_path, monkeypatch):
    straight = tmp_path / "straight"
    main.train(main.parse_args(train_argv(synthetic_root, straight, *STAGED)))
    real_step, calls = torch.optim.SGD.step, []

    def step_interrupted_on_its_sixth_call(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 6:  # epoch 2 (half scale), step 2 of 4
            signal.raise_signal(signal.SIGINT)
        return real_step(self, *args, **kwargs)
    monkeypatch.setattr(torch.optim.SGD, "step", step_interrupted_on_its_sixth_call)
    run = tmp_path / "run"
    with pytest.raises(SystemExit):
        main.train(main.parse_args(train_argv(synthetic_root, run, *STAGED)))
    assert torch.load(run / "last.pt", weights_only=True)["progress"]["step"] == 2
    monkeypatch.setattr(torch.optim.SGD, "step", real_step)
    main.train(main.parse_args(["--resume", str(run / "last.pt")]))
    assert_same_weights(final_weights(run), final_weights(straight))
    assert_same_history(history_without_timings(run), history_without_timings(straight))


@pytest.mark.slow
def test_sigkill_inside_each_stage_and_at_the_boundary_then_resume_ends_bit_identical(synthetic_root, tmp_path):
    straight = tmp_path / "straight"
    main.train(main.parse_args(train_argv(synthetic_root, straight, *STAGED)))
    for name, (kill, at) in {"in stage 1": ("KILL_AT_STEP", 6), "at the boundary": ("KILL_AFTER_SAVE", 2),
                             "in stage 2": ("KILL_AT_STEP", 14)}.items():
        run = tmp_path / name.replace(" ", "-")
        killed = subprocess.run([sys.executable, str(ROOT / "tests" / "kill_probe.py"),
                                 *train_argv(synthetic_root, run, *STAGED)], cwd=tmp_path, capture_output=True,
                                env={**os.environ, kill: str(at)}, timeout=300)
        assert killed.returncode == -signal.SIGKILL, (name, killed.stderr[-2000:])
        saved = torch.load(run / "last.pt", weights_only=True)["epoch"]
        assert saved == {"in stage 1": 1, "at the boundary": 2, "in stage 2": 3}[name], name
        subprocess.run([sys.executable, str(ROOT / "main.py"), "--resume", str(run / "last.pt")], cwd=tmp_path,
                       check=True, capture_output=True, timeout=300)
        assert_same_weights(final_weights(run), final_weights(straight))
        assert history_without_timings(run) == history_without_timings(straight), name


def test_a_checkpoint_from_before_stages_resumes_in_one_stage(synthetic_root, tmp_path, monkeypatch):
    run = tmp_path / "run"
    state = stopped_after_first_epoch(synthetic_root, run, monkeypatch)
    del state["config"]["stages"]  # as written before the setting existed
    del state["history"][0]["scale"]
    torch.save(state, run / "last.pt")
    monkeypatch.setattr(main, "STAGES", ((0.5, 1),))  # today's block would stage a new run
    main.train(main.parse_args(["--resume", str(run / "last.pt")]))
    assert [row["scale"] for row in metrics(run)] == ["", "1.0", "1.0"]
