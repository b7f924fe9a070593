"""Our confusion-matrix metrics against the official Cityscapes evaluation (cityscapesscripts)."""
import math

import cv2
import numpy as np
import pytest
import torch

import labels
from segmentation.metrics import ConfusionMatrix, evaluation_report, iou_per_class, summarize

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


def skewed_pairs(rng, label_set):
    """Label-id maps with very unequal class frequencies and some ignored (255) ground truth, and predictions
    among the ids ``label_set`` can predict that are right more often for common classes; 'train' and 'bus'
    are absent from the ground truth as above."""
    gt_ids = np.array([i for i in labels.VALID_IDS if i not in (ABSENT_EVERYWHERE, PREDICTED_ONLY)] + [255])
    frequency = 0.8 ** np.arange(len(gt_ids))  # the most common class over 1000x the rarest
    hit_rate = np.linspace(0.9, 0.3, len(gt_ids))  # and predicted more often right than the rare ones
    prediction_ids = label_set.class_to_id[label_set.class_to_id != ABSENT_EVERYWHERE]
    pairs = []
    for h, w in SIZES:
        k = rng.choice(len(gt_ids), size=(h, w), p=frequency / frequency.sum())
        gt = gt_ids[k].astype(np.uint8)
        prediction = np.where(np.isin(gt, prediction_ids) & (rng.random((h, w)) < hit_rate[k]), gt,
                              rng.choice(prediction_ids, size=(h, w))).astype(np.uint8)
        pairs.append((gt, prediction))
    return pairs


def numpy_figures(pairs, class_ids: np.ndarray) -> dict[str, float]:
    """The FCN paper's figures counted straight from pixels: ground truth outside ``class_ids`` is ignored."""
    gt = np.concatenate([g.ravel() for g, _ in pairs])
    prediction = np.concatenate([p.ravel() for _, p in pairs])
    scored = np.isin(gt, class_ids)
    gt, prediction = gt[scored], prediction[scored]
    accuracies, ious, weights = [], [], []
    for c in class_ids:
        in_gt, predicted = gt == c, prediction == c
        if in_gt.any():
            accuracies.append((in_gt & predicted).sum() / in_gt.sum())
        if (in_gt | predicted).any():
            ious.append((in_gt & predicted).sum() / (in_gt | predicted).sum())
            weights.append(in_gt.sum() / len(gt))
    return {"pixel_acc": float((gt == prediction).mean()), "mean_acc": float(np.mean(accuracies)),
            "mIoU": float(np.mean(ious)), "fwIoU": float(np.dot(weights, ious))}


@pytest.mark.parametrize("label_set_name", ["train", "full"])
def test_pixel_and_mean_accuracy_miou_and_fwiou_equal_a_direct_count_over_pixels(label_set_name):
    label_set = labels.get_label_set(label_set_name)
    pairs = skewed_pairs(np.random.default_rng(2), label_set)
    expected = numpy_figures(pairs, label_set.class_to_id)
    ours = run_ours(pairs, label_set)
    assert abs(expected["fwIoU"] - expected["mIoU"]) > 0.05  # unequal frequencies: fwIoU is not the mIoU
    assert abs(expected["pixel_acc"] - expected["mean_acc"]) > 0.05
    for key, value in expected.items():
        assert ours[key] == pytest.approx(value, rel=1e-12, abs=1e-12), key


def test_pixel_accuracy_matches_the_official_confusion_matrix(tmp_path):
    """cityscapesscripts 2.3.0's evalPixelAccuracy cannot serve: its 'nbNotIgnoredPixels' counts the ignored
    pixels (np.in1d(..., invert=True)) and its 'nbCorrectPixels' the wrong ones among them. The confusion matrix
    it returns (label ids, rows ground truth) gives the pixel accuracy over the 19 scored classes instead."""
    label_set = labels.get_label_set("train")
    pairs = make_pairs(np.random.default_rng(3), label_set.class_to_id)
    official_matrix = np.array(run_official(pairs, tmp_path)["confMatrix"], dtype=np.int64)
    scored = [label.id for label in labels.TRAIN_LABELS]
    theirs = official_matrix[scored, scored].sum() / official_matrix[scored].sum()
    assert run_ours(pairs, label_set)["pixel_acc"] == pytest.approx(theirs, rel=1e-12)
