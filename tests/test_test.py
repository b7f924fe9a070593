"""test.py: the metrics contract, label-id predictions, and one clear line for every bad checkpoint."""
import json
import math
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import labels
import test as evaluation
from data_preprocessing import normalize
from model import build_model
from segmentation import UserError
from segmentation.checkpoint import load_checkpoint
from segmentation.engine import class_map, predict, score_batch

if not hasattr(np, "in1d"):  # cityscapesscripts 2.3.0 still calls np.in1d, removed in NumPy 2.4
    np.in1d = np.isin
from cityscapesscripts.evaluation import evalPixelLevelSemanticLabeling as official  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def official_scores(predictions: list[Path], truths: list[Path]) -> dict:
    """cityscapesscripts' evaluateImgLists on pairs of label-id PNGs (it pairs the lists by position; file names
    only matter for the instance-level score, which is switched off)."""
    args = official.args
    args.evalInstLevelScore, args.evalPixelAccuracy, args.quiet, args.JSONOutput = False, False, True, False
    return official.evaluateImgLists([str(p) for p in predictions], [str(p) for p in truths], args)


def test_val_evaluation_writes_the_metrics_contract_and_label_id_predictions(trained_run, tmp_path):
    out = tmp_path / "eval"
    evaluation.main(["--checkpoint", str(trained_run / "best.pt"), "--out", str(out), "--device", "cpu",
                     "--workers", "0", "--num-visuals", "1"])
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("mIoU", "pixel_acc", "mean_acc", "fwIoU", "class_iou", "category_iou", "num_images", "checkpoint",
                "split"):
        assert key in metrics
    assert metrics["class_iou"]["train"] is None  # absent from the synthetic scenes: n/a, not 0
    val_names = (trained_run / "val.txt").read_text().split()
    assert metrics["num_images"] == len(val_names) and metrics["split"] == "val"
    written = sorted(p.stem for p in (out / "pred_labelIds").glob("*.png"))
    assert written == sorted(val_names)
    prediction = cv2.imread(str(out / "pred_labelIds" / f"{val_names[0]}.png"), cv2.IMREAD_UNCHANGED)
    assert prediction.shape == (96, 320) and set(np.unique(prediction)) <= set(labels.get_label_set("train").class_to_id)
    assert len(list((out / "overlay").glob("*.png"))) == 1 and (out / "confusion.png").is_file()
    assert (out / "metrics.csv").read_text().splitlines()[0] == "class,iou,acc,pixels"


def test_val_miou_equals_the_official_evaluation_of_the_written_predictions(trained_run, synthetic_root, tmp_path):
    evaluation.main(["--checkpoint", str(trained_run / "best.pt"), "--out", str(tmp_path), "--device", "cpu",
                     "--workers", "0", "--num-visuals", "0"])
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    val_names = (trained_run / "val.txt").read_text().split()
    theirs = official_scores([tmp_path / "pred_labelIds" / f"{n}.png" for n in val_names],
                             [synthetic_root / "training" / "semantic" / f"{n}.png" for n in val_names])
    assert 0 < theirs["averageScoreClasses"] < 1
    assert metrics["mIoU"] == pytest.approx(theirs["averageScoreClasses"], abs=1e-6)
    assert metrics["benchmark_mIoU"] == pytest.approx(theirs["averageScoreClasses"], abs=1e-6)
    for label in labels.TRAIN_LABELS:
        if np.isnan(theirs["classScores"][label.name]):
            assert metrics["class_iou"][label.name] is None, label.name
        else:
            assert metrics["class_iou"][label.name] == pytest.approx(theirs["classScores"][label.name], abs=1e-6)


@pytest.fixture(scope="module")
def trained_model(trained_run):
    """The model in trained_run's best.pt, on the CPU in eval mode, channels_last as test.py holds it (the same
    float path, so argmax ties break the same way)."""
    state = torch.load(trained_run / "best.pt", weights_only=True)
    model = build_model(state["arch"], state["num_classes"], pretrained=False)
    model.load_state_dict(state["model"])
    return model.to(memory_format=torch.channels_last).eval()


@pytest.fixture(scope="module")
def random_model():
    """A randomly initialised fcn16 in eval mode: its filters are not mirror-symmetric, and its logits span a
    few units, so float32 softmaxes stay well conditioned (a briefly trained model's can reach 1e-40)."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return build_model("fcn16", 19, pretrained=False).eval()


@pytest.fixture(scope="module")
def scenes(synthetic_root) -> torch.Tensor:
    """(2, 3, 64, 96) uint8 RGB crops of two synthetic scenes; 64 and 96 are multiples of 4, so x0.75 is exact."""
    crops = [cv2.imread(str(synthetic_root / "training" / "image_2" / f"{name}.png"))[16:80, 100:196, ::-1]
             for name in ("000000_10", "000001_10")]
    return torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).contiguous()


def softmax_at(model, x: torch.Tensor, scale: float, flipped: bool) -> torch.Tensor:
    """The softmax of ``model`` on normalised ``x`` resized by ``scale`` and maybe mirrored, mapped back onto x."""
    h, w = x.shape[-2:]
    inp = F.interpolate(x, size=(round(h * scale), round(w * scale)), mode="bilinear", align_corners=False)
    logits = model(inp.flip(-1) if flipped else inp)
    logits = logits.flip(-1) if flipped else logits
    return F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False).softmax(1)


@torch.no_grad()
def test_flip_tta_is_the_log_of_the_mean_softmax_of_the_image_and_its_mirror(random_model, scenes):
    x = normalize(scenes)
    expected = ((random_model(x).softmax(1) + random_model(x.flip(-1)).flip(-1).softmax(1)) / 2).log()
    ours = predict(random_model, scenes, torch.device("cpu"), flip=True)
    without = predict(random_model, scenes, torch.device("cpu"))
    assert ours.shape == (2, 19, 64, 96)
    assert (expected.exp() - without.softmax(1)).abs().max() > 0.02  # the mirror changes the answer (predict: logits)
    torch.testing.assert_close(ours.exp(), expected.exp(), rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_multiscale_flip_tta_averages_the_softmax_of_every_scale_and_mirror(random_model, scenes):
    x = normalize(scenes)
    variants = [softmax_at(random_model, x, s, f) for s in (0.75, 1.0) for f in (False, True)]
    expected = (sum(variants) / 4).log()
    ours = predict(random_model, scenes, torch.device("cpu"), flip=True, scales=(0.75, 1.0))
    flip_only = predict(random_model, scenes, torch.device("cpu"), flip=True)
    assert (expected.exp() - flip_only.exp()).abs().max() > 0.02  # the 0.75 scale changes the answer
    torch.testing.assert_close(ours.exp(), expected.exp(), rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_multiscale_tta_maps_a_scale_that_does_not_divide_the_image_back_onto_its_pixels(random_model, scenes):
    """61 x 93 at 0.75 is 45.75 x 69.75: the reduced image is resized to (46, 70) and back, and its logits land on
    the pixels the reference maps them to (a resize by factor, then back to a size, would drift by up to a pixel)."""
    crop = scenes[..., :61, :93]
    x = normalize(crop)
    expected = ((softmax_at(random_model, x, 0.75, False) + softmax_at(random_model, x, 1.0, False)) / 2).log()
    ours = predict(random_model, crop, torch.device("cpu"), scales=(0.75, 1.0))
    torch.testing.assert_close(ours.exp(), expected.exp(), rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_tta_scores_stay_finite_where_a_confident_models_softmax_underflows(random_model, scenes):
    """Logits a thousand times the random model's: float32 softmaxes underflow to exact zeros, so the log of their
    plain average has -inf entries (a pixel's loss would be inf). TTA's scores stay finite and equal the log of the
    average computed in float64."""
    class Confident(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return 1000 * random_model(x)
    confident, x = Confident(), normalize(scenes)
    plain, mirrored = confident(x), confident(x.flip(-1)).flip(-1)
    least_likely = class_map(-(plain + mirrored))
    naive = ((plain.softmax(1) + mirrored.softmax(1)) / 2).log()
    assert not score_batch(naive, least_likely)[0].isfinite()  # the underflow happens, and would reach the loss
    expected = torch.logaddexp(plain.double().log_softmax(1), mirrored.double().log_softmax(1)) - math.log(2)
    ours = predict(confident, scenes, torch.device("cpu"), flip=True)
    assert ours.isfinite().all() and score_batch(ours, least_likely)[0].isfinite()
    torch.testing.assert_close(ours.double(), expected, rtol=1e-5, atol=1e-2)


@torch.no_grad()
def test_flip_tta_output_on_a_mirror_symmetric_image_is_itself_mirror_symmetric(random_model, scenes):
    """For x equal to its mirror, TTA gives (p(x) + flip(p(x))) / 2, which flipping leaves unchanged; the
    model alone is not mirror-equivariant, so without TTA the output is not symmetric."""
    symmetric = torch.cat([scenes[..., :48], scenes[..., :48].flip(-1)], dim=-1)
    assert torch.equal(symmetric, symmetric.flip(-1))
    with_tta = predict(random_model, symmetric, torch.device("cpu"), flip=True)
    without = predict(random_model, symmetric, torch.device("cpu"))
    assert (without.softmax(1) - without.flip(-1).softmax(1)).abs().max() > 0.02  # predict without TTA: logits
    torch.testing.assert_close(with_tta.exp(), with_tta.flip(-1).exp(), rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_flip_and_scales_flags_put_the_tta_prediction_in_the_written_pngs(trained_run, trained_model, synthetic_root,
                                                                          tmp_path):
    evaluation.main(["--checkpoint", str(trained_run / "best.pt"), "--out", str(tmp_path), "--device", "cpu",
                     "--workers", "0", "--num-visuals", "0", "--flip", "--scales", "0.75", "1"])
    class_to_id = labels.get_label_set("train").class_to_id
    differs_from_plain = 0
    for name in (trained_run / "val.txt").read_text().split():
        rgb = cv2.imread(str(synthetic_root / "training" / "image_2" / f"{name}.png"))[..., ::-1]
        image = torch.from_numpy(rgb.copy()).permute(2, 0, 1)[None]
        tta = predict(trained_model, image, torch.device("cpu"), flip=True, scales=(0.75, 1.0)).argmax(1)[0]
        plain = predict(trained_model, image, torch.device("cpu")).argmax(1)[0]
        written = cv2.imread(str(tmp_path / "pred_labelIds" / f"{name}.png"), cv2.IMREAD_UNCHANGED)
        assert (written == class_to_id[tta.numpy()]).all(), name
        differs_from_plain += int((tta != plain).sum())
    assert differs_from_plain > 0  # TTA changes some pixels, so the flags' effect is visible


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


@pytest.mark.parametrize("change", [{"arch": "fcn8"}, {"num_classes": 34, "label_set": "full", "label_table": None}])
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


def test_a_weights_only_checkpoint_predicts_a_folder_of_images(trained_run, synthetic_root, tmp_path):
    state = torch.load(trained_run / "best.pt", weights_only=True)
    torch.save({key: state[key] for key in ("model", "arch", "num_classes", "label_set")}, tmp_path / "weights.pt")
    evaluation.main(["--checkpoint", str(tmp_path / "weights.pt"), "--images", str(synthetic_root / "testing" /
                     "image_2"), "--out", str(tmp_path / "out"), "--device", "cpu", "--workers", "0"])
    assert sorted(p.name for p in (tmp_path / "out" / "pred_labelIds").glob("*.png")) == ["000000_10.png",
                                                                                           "000001_10.png"]


def test_an_output_folder_never_holds_the_figures_of_two_runs(trained_run, synthetic_root, tmp_path, monkeypatch):
    """A rerun into the same --out replaces the previous run's outputs whole, after it finishes; an interrupted
    rerun leaves them as they were; files test.py did not write stay."""
    out = tmp_path / "out"
    common = ["--checkpoint", str(trained_run / "best.pt"), "--device", "cpu", "--workers", "0", "--out", str(out)]
    evaluation.main(common)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert (out / "metrics.json").is_file() and (out / "confusion.png").is_file()
    (out / "my notes.txt").write_text("mine")
    real_writer, calls = evaluation.PredictionWriter.__call__, []

    def interrupted_on_the_second_image(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_writer(self, *args, **kwargs)
    monkeypatch.setattr(evaluation.PredictionWriter, "__call__", interrupted_on_the_second_image)
    with pytest.raises(SystemExit):
        evaluation.main(common + ["--scales", "0.75", "1.0"])
    monkeypatch.setattr(evaluation.PredictionWriter, "__call__", real_writer)
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != "my notes.txt"}
    assert after == before  # the interrupted run changed nothing
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # and left no partial folder
    images = tmp_path / "images"
    images.mkdir()
    for path in sorted((synthetic_root / "testing" / "image_2").glob("*.png")):
        (images / path.name).write_bytes(path.read_bytes())
    evaluation.main(common + ["--images", str(images)])  # predictions of a folder: the split's metrics must go
    assert sorted(p.name for p in out.iterdir()) == ["my notes.txt", "overlay", "pred_color", "pred_labelIds"]
    assert sorted(p.name for p in (out / "pred_labelIds").iterdir()) == sorted(p.name for p in images.iterdir())
