import math
import statistics
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from data_preprocessing import KittiSemantics
from segmentation import UserError
from segmentation.layouts import list_labelled
from segmentation.loading import class_pixel_counts, class_weights

# Three hand-made 4 x 5 label maps, as {Cityscapes label id: pixels}; id 4 (static) is void in the 'train' set.
# In 'train' classes: road (id 7) = 0, pole (17) = 5, sky (23) = 10, car (26) = 13.
IMAGES = {"a": {7: 12, 26: 6, 4: 2}, "b": {7: 10, 23: 10}, "c": {7: 5, 26: 5, 23: 5, 17: 5}}
TRAIN_CLASS = {7: 0, 17: 5, 23: 10, 26: 13}


@pytest.fixture
def hand_made_tree(tmp_path) -> Path:
    """The label maps above in the KITTI layout; the 'images' are not PNGs, so decoding one would fail."""
    for folder in ("image_2", "semantic"):
        (tmp_path / "training" / folder).mkdir(parents=True)
    for name, pixels in IMAGES.items():
        ids = np.concatenate([np.full(n, label_id, np.uint8) for label_id, n in pixels.items()])
        cv2.imwrite(str(tmp_path / "training" / "semantic" / f"{name}.png"), ids.reshape(4, 5))
        (tmp_path / "training" / "image_2" / f"{name}.png").write_bytes(b"never decoded")
    return tmp_path


def test_pixel_counts_come_from_the_labels_alone(hand_made_tree):
    counts = class_pixel_counts(KittiSemantics(hand_made_tree, ["a", "b", "c"], "train"))
    assert counts.shape == (3, 19)
    for row, pixels in zip(counts, IMAGES.values()):
        expected = np.zeros(19, np.int64)
        for label_id, n in pixels.items():
            if label_id in TRAIN_CLASS:
                expected[TRAIN_CLASS[label_id]] = n
        assert np.array_equal(row, expected)  # void pixels (id 4) counted nowhere


def test_cached_and_uncached_counts_agree(synthetic_root):
    names = list_labelled(synthetic_root)
    cached = KittiSemantics(synthetic_root, names, cache=10.0)
    assert cached.cached
    counts = class_pixel_counts(KittiSemantics(synthetic_root, names))
    assert np.array_equal(class_pixel_counts(cached), counts)
    assert counts.sum() == sum(int((cached[i][1] != 255).sum()) for i in range(len(names)))


def test_median_frequency_weights_match_the_formula_on_the_hand_counts(hand_made_tree):
    counts = class_pixel_counts(KittiSemantics(hand_made_tree, ["a", "b", "c"], "train"))
    labelled = {name: sum(n for i, n in pixels.items() if i in TRAIN_CLASS) for name, pixels in IMAGES.items()}
    freq = {}
    for label_id, cls in TRAIN_CLASS.items():
        holding = [name for name, pixels in IMAGES.items() if label_id in pixels]
        freq[cls] = sum(IMAGES[name][label_id] for name in holding) / sum(labelled[name] for name in holding)
    median = statistics.median(freq.values())
    weights = class_weights(counts, "median-freq")
    assert weights.dtype == torch.float32 and weights.shape == (19,)
    for cls, f in freq.items():
        assert weights[cls].item() == pytest.approx(median / f, rel=1e-6)
    absent = [c for c in range(19) if c not in freq]
    assert (weights[absent] == max(median / f for f in freq.values())).all()  # the rarest class's weight
    assert weights[5] > weights[0]  # pole (rare) outweighs road


def test_enet_log_weights_match_the_formula_on_the_hand_counts(hand_made_tree):
    counts = class_pixel_counts(KittiSemantics(hand_made_tree, ["a", "b", "c"], "train"))
    totals = {cls: sum(pixels.get(label_id, 0) for pixels in IMAGES.values())
              for label_id, cls in TRAIN_CLASS.items()}
    all_labelled = sum(totals.values())  # 58: the two void pixels are not part of p_class
    weights = class_weights(counts, "log")
    expected = {cls: 1 / math.log(1.02 + n / all_labelled) for cls, n in totals.items()}
    for cls, w in expected.items():
        assert weights[cls].item() == pytest.approx(w, rel=1e-6)
    absent = weights[[c for c in range(19) if c not in totals]]
    assert absent.tolist() == pytest.approx([max(expected.values())] * len(absent))
    assert torch.equal(class_weights(counts, "none"), torch.ones(19))


def test_bad_method_and_all_ignored_labels_are_one_line_errors():
    with pytest.raises(UserError, match="unknown class weighting 'inverse'"):
        class_weights(np.ones((1, 3)), "inverse")
    with pytest.raises(UserError, match="no labelled pixel"):
        class_weights(np.zeros((2, 3)), "log")


def write_rare_sign_tree(root: Path, num: int = 16, size: int = 64) -> Path:
    """Road below, building above, and one 6 x 6 traffic sign (0.9% of the pixels) at a random place."""
    rng = np.random.default_rng(0)
    colours = {7: (128, 64, 128), 11: (70, 70, 70), 20: (220, 220, 0)}
    for folder in ("image_2", "semantic"):
        (root / "training" / folder).mkdir(parents=True)
    for i in range(num):
        label = np.full((size, size), 7, np.uint8)
        label[: size // 2] = 11
        y, x = rng.integers(4, size - 12, 2)
        label[y:y + 6, x:x + 6] = 20
        image = np.zeros((size, size, 3))
        for label_id, colour in colours.items():
            image[label == label_id] = colour
        image = np.clip(image + rng.normal(0, 25, image.shape), 0, 255).astype(np.uint8)
        cv2.imwrite(str(root / "training" / "image_2" / f"{i:06d}.png"), image[..., ::-1])
        cv2.imwrite(str(root / "training" / "semantic" / f"{i:06d}.png"), label)
    return root


@pytest.mark.slow
def test_median_frequency_balancing_raises_the_iou_of_a_rare_class_at_equal_seed(tmp_path):
    import json

    from conftest import train_argv

    import main
    import test as evaluation
    root = write_rare_sign_tree(tmp_path / "tree")
    sign_iou = {}
    for method in ("none", "median-freq"):
        run = tmp_path / method
        main.train(main.parse_args(train_argv(root, run, "--arch", "fcn8", "--epochs", "6", "--batch-size", "4",
                                              "--crop-size", "64", "--base-size", "64", "--class-weights", method)))
        evaluation.main(["--checkpoint", str(run / "last.pt"), "--device", "cpu", "--workers", "0"])
        sign_iou[method] = json.loads((run / "test_val" / "metrics.json").read_text())["class_iou"]["traffic sign"]
        state = torch.load(run / "last.pt", weights_only=True)
        if method != "none":  # computed once from the training labels and kept in the checkpoint
            train_set = KittiSemantics(root, (run / "train.txt").read_text().split())
            assert torch.equal(state["class_weights"], class_weights(class_pixel_counts(train_set), method))
    assert sign_iou["median-freq"] > sign_iou["none"] + 0.03, sign_iou
