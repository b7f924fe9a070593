"""Our confusion-matrix metrics against the official Cityscapes evaluation (cityscapesscripts)."""
import math

import cv2
import numpy as np
import pytest
import torch

import labels
from metrics import ConfusionMatrix, evaluation_report, iou_per_class, summarize

if not hasattr(np, "in1d"):  # cityscapesscripts 2.3.0 still calls np.in1d, removed in NumPy 2.4
    np.in1d = np.isin
from cityscapesscripts.evaluation import evalPixelLevelSemanticLabeling as official  # noqa: E402

ABSENT_EVERYWHERE = 31   # 'train': neither in ground truth nor predicted -> n/a
PREDICTED_ONLY = 28      # 'bus': predicted, never in ground truth -> IoU 0
SIZES = ((37, 50), (64, 48), (23, 91))


def make_pairs(rng, prediction_ids):
    """Ground-truth label-id maps (void ids included) and noisy predictions drawn from ``prediction_ids``."""
    gt_ids = np.array([i for i in labels.VALID_IDS if i not in (ABSENT_EVERYWHERE, PREDICTED_ONLY)], np.uint8)
    pairs = []
    for h, w in SIZES:
        gt = rng.choice(gt_ids, size=(h, w)).astype(np.uint8)
        prediction = np.where(rng.random((h, w)) < 0.6, gt, rng.choice(prediction_ids, size=(h, w))).astype(np.uint8)
        prediction = np.where(np.isin(prediction, prediction_ids), prediction,
                              rng.choice(prediction_ids, size=(h, w))).astype(np.uint8)
        pairs.append((gt, prediction))
    return pairs


def run_official(pairs, tmp_path):
    predictions, truths = [], []
    for i, (gt, prediction) in enumerate(pairs):
        truths.append(str(tmp_path / f"{i}_gt_labelIds.png"))
        predictions.append(str(tmp_path / f"{i}_pred.png"))
        cv2.imwrite(truths[-1], gt)
        cv2.imwrite(predictions[-1], prediction)
    args = official.args
    args.evalInstLevelScore, args.evalPixelAccuracy, args.quiet, args.JSONOutput = False, False, True, False
    return official.evaluateImgLists(predictions, truths, args)


def run_ours(pairs, label_set):
    confusion = ConfusionMatrix(label_set.num_classes)
    for gt, prediction in pairs:
        confusion.update(torch.from_numpy(label_set.id_to_class[prediction]), torch.from_numpy(label_set.id_to_class[gt]))
    return evaluation_report(confusion.matrix, label_set)


def assert_close_or_both_nan(ours, theirs):
    assert (math.isnan(ours) and math.isnan(theirs)) or abs(ours - theirs) < 1e-6, (ours, theirs)


@pytest.mark.parametrize("label_set_name", ["train", "full"])
def test_class_category_and_mean_iou_match_the_official_evaluation(tmp_path, label_set_name):
    label_set = labels.get_label_set(label_set_name)
    # a 'train' model can only predict the 19 classes; a 'full' model may predict void ids, which count as FN
    prediction_ids = label_set.class_to_id[label_set.class_to_id != ABSENT_EVERYWHERE]
    pairs = make_pairs(np.random.default_rng(1), prediction_ids)
    theirs = run_official(pairs, tmp_path)
    ours = run_ours(pairs, label_set)
    for train_id, label in enumerate(labels.TRAIN_LABELS):
        assert_close_or_both_nan(ours["benchmark_iou"][train_id], theirs["classScores"][label.name])
    assert math.isnan(theirs["classScores"]["train"]) and theirs["classScores"]["bus"] == 0.0
    assert_close_or_both_nan(ours["benchmark_mIoU"], theirs["averageScoreClasses"])
    for category, value in ours["category_iou"].items():
        assert_close_or_both_nan(value, theirs["categoryScores"][category])
    assert_close_or_both_nan(float(np.nanmean(list(ours["category_iou"].values()))), theirs["averageScoreCategories"])


def test_absent_class_is_nan_and_left_out_of_the_mean_while_a_false_positive_class_scores_zero():
    confusion = np.array([[5, 1, 0], [0, 4, 0], [0, 0, 0]])  # class 2: no pixels at all
    assert math.isnan(iou_per_class(confusion)[2])
    assert summarize(confusion)["mIoU"] == pytest.approx(np.mean([5 / 6, 4 / 5]))
    confusion[0, 2] = 2  # class 2 predicted on class-0 pixels, never in the ground truth
    assert iou_per_class(confusion)[2] == 0.0
    assert summarize(confusion)["mIoU"] == pytest.approx(np.mean([5 / 8, 4 / 5, 0.0]))


def test_ignored_pixels_are_never_counted():
    confusion = ConfusionMatrix(3)
    confusion.update(torch.tensor([[0, 1, 2, 2]]), torch.tensor([[0, 255, 255, 2]]))
    assert confusion.matrix.sum() == 2 and confusion.matrix[0, 0] == 1 and confusion.matrix[2, 2] == 1


def test_confusion_matrix_equals_a_direct_numpy_count_over_batches():
    rng = np.random.default_rng(0)
    target = rng.integers(0, 6, (4, 30, 40))
    target[rng.random(target.shape) < 0.1] = 255
    prediction = rng.integers(0, 6, target.shape)
    confusion = ConfusionMatrix(6)
    for t, p in zip(target, prediction):
        confusion.update(torch.from_numpy(p), torch.from_numpy(t))
    valid = target != 255
    expected = np.bincount(target[valid] * 6 + prediction[valid], minlength=36).reshape(6, 6)
    assert (confusion.matrix == expected).all()


def test_fcn_paper_figures_from_a_known_matrix():
    confusion = np.array([[8, 2], [1, 9]])
    report = summarize(confusion)
    assert report["pixel_acc"] == pytest.approx(17 / 20)
    assert report["mean_acc"] == pytest.approx((8 / 10 + 9 / 10) / 2)
    iou = [8 / 11, 9 / 12]
    assert report["mIoU"] == pytest.approx(np.mean(iou))
    assert report["fwIoU"] == pytest.approx(0.5 * iou[0] + 0.5 * iou[1])
