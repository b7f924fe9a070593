"""Cityscapes -> KITTI: a run on the official layout, the official script scoring test.py's predictions, and a
KITTI fine-tuning stage that starts from the Cityscapes model."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from conftest import KITTI_SAMPLE, train_argv

import main
import test as evaluation
from labels import get_label_set
from segmentation import runtime
from segmentation.checkpoint import load_model
from segmentation.synthetic import write_synthetic_cityscapes

ROOT = Path(__file__).resolve().parents[1]
SIZE = (96, 192)


REAL_VAL = "munster/munster_000000_000019"


@pytest.fixture(scope="module")
def cityscapes_root(tmp_path_factory) -> Path:
    """Synthetic train/val/test scenes in the official layout, plus one real street frame (a KITTI frame from
    tests/data, 375 x 1242, with its Cityscapes label ids) as a val image under an official name."""
    root = write_synthetic_cityscapes(tmp_path_factory.mktemp("cityscapes"), num_train=8, num_val=3, num_test=2,
                                      seed=0, size=SIZE)
    name = sorted((KITTI_SAMPLE / "training" / "semantic").glob("*.png"))[0].name
    city, stem = REAL_VAL.split("/")
    (root / "leftImg8bit" / "val" / city).mkdir(parents=True, exist_ok=True)
    (root / "gtFine" / "val" / city).mkdir(parents=True, exist_ok=True)
    shutil.copy(KITTI_SAMPLE / "training" / "image_2" / name,
                root / "leftImg8bit" / "val" / city / f"{stem}_leftImg8bit.png")
    label = cv2.imread(str(KITTI_SAMPLE / "training" / "semantic" / name), cv2.IMREAD_UNCHANGED)
    cv2.imwrite(str(root / "gtFine" / "val" / city / f"{stem}_gtFine_labelIds.png"), label)
    cv2.imwrite(str(root / "gtFine" / "val" / city / f"{stem}_gtFine_instanceIds.png"), label.astype(np.uint16))
    return root


@pytest.fixture(scope="module")
def cityscapes_run(cityscapes_root, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "cityscapes"
    main.train(main.parse_args(train_argv(cityscapes_root, out, "--dataset", "cityscapes", "--arch", "fcn16",
                                          "--crop-size", "64", "128", "--epochs", "1")))
    return out


def test_cityscapes_run_uses_the_official_val_split(cityscapes_run, cityscapes_root):
    val = (cityscapes_run / "val.txt").read_text().split()
    official = sorted(f"{p.parent.name}/{p.name.removesuffix('_leftImg8bit.png')}"
                      for p in (cityscapes_root / "leftImg8bit" / "val").glob("*/*_leftImg8bit.png"))
    assert val == official and REAL_VAL in val and len((cityscapes_run / "train.txt").read_text().split()) == 8


def official_evaluation(dataset_root: Path, predictions: Path) -> dict:
    """cityscapesscripts' csEvalPixelLevelSemanticLabeling as a user runs it: environment variables, its own
    search for ground truth and its own matching of prediction files. (np.in1d: removed in NumPy 2.4.)"""
    code = ("import numpy as np; np.in1d = np.isin\n"
            "from cityscapesscripts.evaluation.evalPixelLevelSemanticLabeling import main; main()")
    env = {**os.environ, "CITYSCAPES_DATASET": str(dataset_root), "CITYSCAPES_RESULTS": str(predictions)}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=dataset_root)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return json.loads((dataset_root / "evaluationResults" / "resultPixelLevelSemanticLabeling.json").read_text())


def test_official_script_finds_and_scores_test_py_predictions_like_metrics_json(cityscapes_run, cityscapes_root,
                                                                               tmp_path):
    root = Path(tmp_path / "dataset")
    root.symlink_to(cityscapes_root)  # the official script writes evaluationResults/ into the dataset folder
    out = tmp_path / "eval"
    evaluation.main(["--checkpoint", str(cityscapes_run / "last.pt"), "--out", str(out), "--device", "cpu",
                     "--workers", "0", "--data-root", str(root)])
    ours = json.loads((out / "metrics.json").read_text())
    theirs = official_evaluation(root, out / "pred_labelIds")
    assert ours["num_images"] == 4 and ours["dataset"] == "cityscapes"  # the real 375 x 1242 frame among them
    real = cv2.imread(str(out / "pred_labelIds" / "munster_000000_000019.png"), cv2.IMREAD_UNCHANGED)
    assert real.shape == (375, 1242)
    assert ours["benchmark_mIoU"] == pytest.approx(theirs["averageScoreClasses"], abs=1e-6)
    for name, iou in ours["class_iou"].items():
        official = theirs["classScores"][name]
        assert (iou is None and official != official) or iou == pytest.approx(official, abs=1e-6), name


def test_test_split_writes_one_submission_png_per_test_image(cityscapes_run, cityscapes_root, tmp_path):
    evaluation.main(["--checkpoint", str(cityscapes_run / "last.pt"), "--split", "test", "--out", str(tmp_path),
                     "--device", "cpu", "--workers", "0"])
    expected = sorted(p.name.replace("_leftImg8bit", "")
                      for p in (cityscapes_root / "leftImg8bit" / "test").glob("*/*.png"))
    assert sorted(p.name for p in (tmp_path / "pred_labelIds").glob("*.png")) == expected


def test_kitti_stage_initialised_from_the_cityscapes_model_starts_with_its_exact_function(cityscapes_run,
                                                                                        synthetic_root, tmp_path):
    args = main.parse_args(train_argv(synthetic_root, tmp_path / "kitti", "--arch", "fcn16", "--lr", "0.001",
                                      "--init-from", str(cityscapes_run / "last.pt")))
    cpu = runtime.Context(0, 1, torch.device("cpu"))
    finetune = main.make_model(args, cpu, get_label_set(args.label_set), None).eval()
    first_stage = load_model(cityscapes_run / "last.pt", torch.device("cpu"))[0]
    x = torch.randn(2, 3, 96, 320)
    with torch.no_grad():
        assert torch.equal(finetune(x), first_stage(x))
    main.train(args)  # and the stage trains
    assert torch.load(tmp_path / "kitti" / "last.pt", weights_only=True)["config"]["init_from"] == \
        str(cityscapes_run / "last.pt")
