"""test.py: the metrics contract, label-id predictions, and one clear line for every bad checkpoint."""
import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

import labels
import test as evaluation
from checkpoint import load_checkpoint
from errors import UserError

ROOT = Path(__file__).resolve().parents[1]


def test_val_evaluation_writes_the_metrics_contract_and_label_id_predictions(trained_run, tmp_path):
    out = tmp_path / "eval"
    evaluation.main(["--checkpoint", str(trained_run / "best.pt"), "--out", str(out), "--device", "cpu",
                     "--workers", "0", "--num-visuals", "1"])
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("mIoU", "pixel_acc", "mean_acc", "fwIoU", "class_iou", "category_iou", "num_images", "checkpoint",
                "split"):
        assert key in metrics
    state = torch.load(trained_run / "best.pt", weights_only=True)
    assert metrics["mIoU"] == pytest.approx(state["best_miou"])  # same metric code as training's validation
    assert metrics["class_iou"]["train"] is None  # absent from the synthetic scenes: n/a, not 0
    val_names = (trained_run / "val.txt").read_text().split()
    assert metrics["num_images"] == len(val_names) and metrics["split"] == "val"
    written = sorted(p.stem for p in (out / "pred_labelIds").glob("*.png"))
    assert written == sorted(val_names)
    prediction = cv2.imread(str(out / "pred_labelIds" / f"{val_names[0]}.png"), cv2.IMREAD_UNCHANGED)
    assert prediction.shape == (96, 320) and set(np.unique(prediction)) <= set(labels.get_label_set("train").class_to_id)
    assert len(list((out / "overlay").glob("*.png"))) == 1 and (out / "confusion.png").is_file()
    assert (out / "metrics.csv").read_text().splitlines()[0] == "class,iou,acc,pixels"


def test_flip_tta_runs_and_reports(trained_run, tmp_path):
    evaluation.main(["--checkpoint", str(trained_run / "best.pt"), "--out", str(tmp_path), "--device", "cpu",
                     "--workers", "0", "--flip", "--scales", "0.75", "1"])
    assert json.loads((tmp_path / "metrics.json").read_text())["mIoU"] >= 0


def test_test_split_writes_submission_pngs_for_every_test_image(trained_run, synthetic_root, tmp_path):
    evaluation.main(["--checkpoint", str(trained_run / "best.pt"), "--split", "test", "--out", str(tmp_path),
                     "--device", "cpu", "--workers", "0"])
    assert sorted(p.name for p in (tmp_path / "pred_labelIds").glob("*.png")) == \
        sorted(p.name for p in (synthetic_root / "testing" / "image_2").glob("*.png"))


def run_cli(*args):
    return subprocess.run([sys.executable, str(ROOT / "test.py"), *args], capture_output=True, text=True)


def assert_one_line_error(result, *fragments):
    assert result.returncode == 1 and result.stderr.startswith("error: ")
    assert result.stderr.strip().count("\n") == 0, result.stderr
    for fragment in fragments:
        assert fragment in result.stderr


def test_missing_checkpoint(tmp_path):
    assert_one_line_error(run_cli("--checkpoint", str(tmp_path / "nope.pt")), "does not exist")


def test_truncated_checkpoint(trained_run, tmp_path):
    data = (trained_run / "best.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    assert_one_line_error(run_cli("--checkpoint", str(tmp_path / "cut.pt")), "truncated or corrupt")


def test_file_that_is_not_a_checkpoint(tmp_path):
    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.pt")
    assert_one_line_error(run_cli("--checkpoint", str(tmp_path / "other.pt")), "not a checkpoint written by main.py")


class RunsCode:
    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_a_pickle_carrying_code_is_refused_and_its_code_never_runs(tmp_path):
    payload = RunsCode()
    payload.marker = str(tmp_path / "code-ran")
    torch.save({"model": payload, "arch": "fcn32", "num_classes": 19, "label_set": "train"}, tmp_path / "evil.pt")
    with pytest.raises(UserError, match="refused to load"):
        load_checkpoint(tmp_path / "evil.pt")
    assert not (tmp_path / "code-ran").exists()


@pytest.mark.parametrize("change", [{"arch": "fcn8"}, {"num_classes": 34, "label_set": "full"}])
def test_checkpoint_of_another_arch_or_class_count(trained_run, tmp_path, change):
    state = torch.load(trained_run / "best.pt", weights_only=True)
    torch.save({**state, **change}, tmp_path / "changed.pt")
    assert_one_line_error(run_cli("--checkpoint", str(tmp_path / "changed.pt"), "--device", "cpu"),
                          "changed.pt: weights do not fit")


def test_data_root_without_the_split(trained_run, tmp_path):
    assert_one_line_error(run_cli("--checkpoint", str(trained_run / "best.pt"), "--data-root", str(tmp_path)),
                          str(tmp_path), "--download")


def test_images_folder_gets_a_prediction_per_image(trained_run, synthetic_root, tmp_path):
    evaluation.main(["--checkpoint", str(trained_run / "best.pt"), "--images", str(synthetic_root / "testing" / "image_2"),
                     "--out", str(tmp_path), "--device", "cpu", "--workers", "0", "--num-visuals", "1"])
    predictions = sorted((tmp_path / "pred_labelIds").glob("*.png"))
    assert len(predictions) == 2 and len(list((tmp_path / "pred_color").glob("*.png"))) == 1
    assert cv2.imread(str(predictions[0]), cv2.IMREAD_UNCHANGED).shape == (96, 320)
