import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader
from torchvision.transforms import v2

import labels
from conftest import KITTI_SAMPLE
from data_preprocessing import (KittiSemantics, check_tree, default_split, list_labelled, resolve_split,
                                train_augmentation, write_split)
from errors import UserError
from samplers import SeededTrainSampler
from synthetic_kitti import KITTI_SIZES, make_scene

ROOT = Path(__file__).resolve().parents[1]


# --- real KITTI frames -------------------------------------------------------------------------------------
@pytest.mark.parametrize("label_set_name", ["train", "full"])
def test_real_kitti_frames_map_label_ids_like_a_direct_numpy_lookup(label_set_name):
    label_set = labels.get_label_set(label_set_name)
    names = list_labelled(KITTI_SAMPLE)
    dataset = KittiSemantics(KITTI_SAMPLE, names, label_set)
    assert len(dataset) == 3
    for index, name in enumerate(names):
        image, label = dataset[index]
        raw = cv2.imread(str(KITTI_SAMPLE / "training" / "semantic" / f"{name}.png"), cv2.IMREAD_UNCHANGED)
        assert image.dtype == torch.uint8 and image.shape == (3, *raw.shape) == (3, 375, 1242)
        assert label.dtype == torch.uint8 and label.shape == raw.shape
        expected = labels.ID_TO_TRAIN_ID[raw] if label_set_name == "train" else raw
        counts = np.bincount(label.numpy().ravel(), minlength=256)
        assert (counts == np.bincount(expected.ravel(), minlength=256)).all()
        if label_set_name == "train":
            assert counts[0] > 0 and counts[255] > 0  # road present, void ignored


def test_real_kitti_semantic_rgb_equals_colorize_of_semantic():
    for name in list_labelled(KITTI_SAMPLE):
        ids = cv2.imread(str(KITTI_SAMPLE / "training" / "semantic" / f"{name}.png"), cv2.IMREAD_UNCHANGED)
        rgb = cv2.imread(str(KITTI_SAMPLE / "training" / "semantic_rgb" / f"{name}.png"))[..., ::-1]
        assert (labels.colorize(ids) == rgb).all()


def test_images_come_back_in_rgb_order(writable_tree):
    path = writable_tree / "training" / "image_2" / "000000_10.png"
    bgr = np.zeros((96, 320, 3), np.uint8)
    bgr[:, :, 2] = 200  # red, as OpenCV stores it
    cv2.imwrite(str(path), bgr)
    image, _ = KittiSemantics(writable_tree, ["000000_10"])[0]
    assert image[:, 10, 10].tolist() == [200, 0, 0]


def test_cache_returns_the_same_tensors_as_reading_from_disk(synthetic_root):
    names = list_labelled(synthetic_root)
    cached, uncached = KittiSemantics(synthetic_root, names, cache=True), KittiSemantics(synthetic_root, names)
    for i in range(len(names)):
        assert all(torch.equal(a, b) for a, b in zip(cached[i], uncached[i]))


# --- splits ----------------------------------------------------------------------------------------------
def test_default_split_is_deterministic_disjoint_and_160_40_for_kitti():
    names = [f"{i:06d}_10" for i in range(200)]
    split = default_split(names)
    assert split == default_split(list(reversed(names)))
    assert len(split["train"]) == 160 and len(split["val"]) == 40
    assert not set(split["train"]) & set(split["val"]) and set(split["train"]) | set(split["val"]) == set(names)
    assert default_split(names, seed=1) != split


def test_split_files_round_trip_and_unknown_names_are_reported(synthetic_root, tmp_path):
    split = default_split(list_labelled(synthetic_root))
    write_split(split, tmp_path)
    assert resolve_split(synthetic_root, "val", tmp_path) == split["val"]
    (tmp_path / "val.txt").write_text("000000_10\nnot_there\n")
    with pytest.raises(UserError, match="not_there"):
        resolve_split(synthetic_root, "val", tmp_path)


# --- augmentation ----------------------------------------------------------------------------------------
PALETTE = np.array([(0, 0, 0), (255, 255, 255), (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)], np.uint8)


def colour_coded_pair(rng, size=(120, 400), block=20):
    """An image of coloured blocks and a label that is the block's colour index: alignment is checkable."""
    classes = rng.integers(1, len(PALETTE), (size[0] // block, size[1] // block))
    label = np.kron(classes, np.ones((block, block), np.int64)).astype(np.uint8)
    return torch.from_numpy(PALETTE[label]).permute(2, 0, 1), torch.from_numpy(label)


def test_augmentation_keeps_image_and_label_aligned_and_pads_label_with_255():
    geometric = v2.Compose(train_augmentation(crop_size=256, base_size=120).transforms[:-1])  # no colour jitter
    rng = np.random.default_rng(0)
    from torchvision import tv_tensors
    for seed in range(8):
        image, label = colour_coded_pair(rng)
        torch.manual_seed(seed)
        out_image, out_label = geometric(tv_tensors.Image(image), tv_tensors.Mask(label))
        assert out_image.shape == (3, 256, 256) and out_label.shape == (256, 256)
        pixels, target = out_image.permute(1, 2, 0).reshape(-1, 3).numpy(), out_label.reshape(-1).numpy()
        padded = target == 255
        assert (pixels[padded] == 0).all()
        nearest = np.abs(pixels[:, None, :].astype(int) - PALETTE[None].astype(int)).sum(-1).argmin(1)
        assert (nearest[~padded] == target[~padded]).mean() > 0.95
    assert padded.any()  # base 120 scaled by <= 2.0 is smaller than the 256 crop: padding happened


def test_seeded_augmentation_is_reproducible_and_varies_with_the_seed(synthetic_root):
    dataset = KittiSemantics(synthetic_root, list_labelled(synthetic_root), transform=train_augmentation(64, base_size=96))
    first, again, other = dataset[(0, 123)], dataset[(0, 123)], dataset[(0, 124)]
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert not torch.equal(first[0], other[0])


def test_batches_do_not_depend_on_the_number_of_workers(synthetic_root):
    dataset = KittiSemantics(synthetic_root, list_labelled(synthetic_root), transform=train_augmentation(64, base_size=96))

    def batches(workers):
        sampler = SeededTrainSampler(len(dataset), seed=3)
        sampler.set_epoch(2)
        return list(DataLoader(dataset, 4, sampler=sampler, num_workers=workers))
    for (a_img, a_lbl), (b_img, b_lbl) in zip(batches(0), batches(2)):
        assert torch.equal(a_img, b_img) and torch.equal(a_lbl, b_lbl)


# --- synthetic generator ---------------------------------------------------------------------------------
def test_synthetic_scenes_are_deterministic_kitti_sized_and_readable_in_both_label_sets(tmp_path):
    image, label = make_scene(seed=5, index=3)
    again, label_again = make_scene(seed=5, index=3)
    assert (image == again).all() and (label == label_again).all() and image.shape[:2] in KITTI_SIZES
    assert {7, 8, 11, 21, 23, 26}.issubset(set(np.unique(label).tolist()))
    from synthetic_kitti import write_synthetic_kitti
    root = write_synthetic_kitti(tmp_path, num_train=2, num_test=1, seed=0)
    assert "2 labelled pairs, 1 test images" in check_tree(root)
    for name in ("train", "full"):
        _, mapped = KittiSemantics(root, list_labelled(root), name)[0]
        assert mapped.max() < 255 or (mapped == 255).any()


# --- bad input: one clear line each ----------------------------------------------------------------------
def test_missing_root_names_the_layout_and_download(tmp_path):
    with pytest.raises(UserError, match="does not exist.*--download"):
        list_labelled(tmp_path / "nowhere")


def test_missing_label_folder_names_the_folder(writable_tree):
    import shutil
    shutil.rmtree(writable_tree / "training" / "semantic")
    with pytest.raises(UserError, match=r"training/semantic is missing.*--download"):
        list_labelled(writable_tree)


def test_images_without_labels_are_named(writable_tree):
    (writable_tree / "training" / "semantic" / "000003_10.png").unlink()
    with pytest.raises(UserError, match="training/semantic: no file for 1 name.*000003_10"):
        list_labelled(writable_tree)


def test_unreadable_png_names_the_file(writable_tree):
    path = writable_tree / "training" / "image_2" / "000001_10.png"
    path.write_bytes(b"not a png")
    with pytest.raises(UserError, match="000001_10.png: cannot be read"):
        KittiSemantics(writable_tree, ["000001_10"])[0]


def test_image_label_size_mismatch_names_the_file(writable_tree):
    cv2.imwrite(str(writable_tree / "training" / "semantic" / "000002_10.png"), np.full((50, 60), 7, np.uint8))
    with pytest.raises(UserError, match=r"000002_10.png: label size \(50, 60\) differs"):
        KittiSemantics(writable_tree, ["000002_10"])[0]


def test_label_ids_outside_the_table_are_named_with_the_file(writable_tree):
    label = np.full((96, 320), 7, np.uint8)
    label[0, :3] = [40, 41, 41]
    cv2.imwrite(str(writable_tree / "training" / "semantic" / "000004_10.png"), label)
    with pytest.raises(UserError, match=r"000004_10.png: label ids \[40, 41\] are not in the Cityscapes table"):
        KittiSemantics(writable_tree, ["000004_10"])[0]


def test_three_channel_label_is_refused_with_a_hint(writable_tree):
    cv2.imwrite(str(writable_tree / "training" / "semantic" / "000005_10.png"), np.zeros((96, 320, 3), np.uint8))
    with pytest.raises(UserError, match="single-channel.*semantic_rgb"):
        KittiSemantics(writable_tree, ["000005_10"])[0]


@pytest.mark.parametrize("script,args", [("data_preprocessing.py", ["--check"]),
                                         ("main.py", ["--no-pretrained", "--epochs", "1", "--data-root"])])
def test_command_line_reports_bad_data_root_in_one_line(tmp_path, script, args):
    result = subprocess.run([sys.executable, str(ROOT / script), *args, str(tmp_path / "missing")],
                            capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip().count("\n") == 0 and result.stderr.startswith("error: ")
    assert "missing" in result.stderr and "--download" in result.stderr
