import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader
from torchvision.transforms import v2

from torchvision import tv_tensors

import data_preprocessing
import labels
from conftest import KITTI_SAMPLE
from data_preprocessing import (DATASET_DEFAULTS, DATASETS, ImageList, KittiSemantics, RandomScaleCrop,
                                SegmentationDataset, check_tree, default_cache_gb, default_split, default_split_for,
                                estimate_decoded_bytes, labelled_names, list_labelled, list_test_images, resolve_split,
                                train_augmentation, write_split)
from errors import UserError
from samplers import SeededTrainSampler
from synthetic_kitti import KITTI_SIZES, make_scene, write_synthetic_cityscapes, write_synthetic_kitti

ROOT = Path(__file__).resolve().parents[1]


# --- real KITTI frames -------------------------------------------------------------------------------------
@pytest.mark.parametrize("label_set_name", ["train", "full"])
def test_real_kitti_frames_map_label_ids_pixel_by_pixel(label_set_name):
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
        assert np.array_equal(label.numpy(), expected)  # pixel by pixel: a scrambled map fails
        if label_set_name == "train":
            assert (label == 0).any() and (label == 255).any()  # road present, void ignored


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
# Non-contiguous label values: a bilinear (or any averaging) resize of the mask makes values between them.
LABEL_VALUES = np.array([3, 7, 11, 17, 26], np.uint8)
PALETTE = np.zeros((256, 3), np.uint8)
PALETTE[LABEL_VALUES] = [(255, 255, 255), (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]


def colour_coded_pair(rng, size=(120, 400), block=20):
    """An image of coloured blocks and a label that is the block's value: alignment is checkable."""
    values = rng.choice(LABEL_VALUES, (size[0] // block, size[1] // block))
    label = np.kron(values, np.ones((block, block), np.int64)).astype(np.uint8)
    return torch.from_numpy(PALETTE[label]).permute(2, 0, 1), torch.from_numpy(label)


def centre_sampled(label: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """Nearest-neighbour resize that samples output pixel centres, in exact integer arithmetic: output j takes
    input floor((j + 1/2) * n_in / n_out). (cv2's INTER_NEAREST_EXACT rounds some of these ties differently.)"""
    rows = (2 * np.arange(out_h) + 1) * label.shape[0] // (2 * out_h)
    cols = (2 * np.arange(out_w) + 1) * label.shape[1] // (2 * out_w)
    return label[rows][:, cols]


def test_scale_crop_resizes_labels_by_nearest_centre_sampling_of_the_chosen_window():
    crop = RandomScaleCrop((72, 136), base_size=120, scale_range=(0.5, 2.0))
    rng, compared = np.random.default_rng(0), 0
    for seed in range(60):
        image, label = colour_coded_pair(rng)
        torch.manual_seed(seed)
        params = crop.make_params([tv_tensors.Image(image), tv_tensors.Mask(label)])
        out = crop.transform(tv_tensors.Mask(label), params).numpy()
        assert out.shape == (72, 136) and set(np.unique(out)) <= {*LABEL_VALUES.tolist(), 255}
        top, left, height, width = params["top"], params["left"], params["height"], params["width"]
        inside = top >= 0 and left >= 0 and top + height <= 120 and left + width <= 400
        if inside and height % 2 and width % 2:  # odd windows: no exact ties (j + 1/2) * n_in / n_out
            window = label.numpy()[top:top + height, left:left + width]
            assert np.array_equal(out, centre_sampled(window, 72, 136))
            compared += 1
    assert compared >= 5


def half_plane_edge_offsets(crop: RandomScaleCrop, windows) -> np.ndarray:
    """Mask edge minus image edge, in output pixels, for a vertical half-plane seen through each window.

    The image is 0 left of column 50 and 255 from it; the mask 0 and 1. The image's edge is where its bilinear
    ramp crosses 50%, i.e. the sum of (1 - value / 255) along a row; the mask's edge is its count of zeros.
    """
    image = torch.zeros(3, 40, 100, dtype=torch.uint8)
    image[..., 50:] = 255
    mask = (image[0] > 0).to(torch.uint8)
    offsets = []
    for top, left, height, width in windows:
        params = {"top": top, "left": left, "height": height, "width": width}
        out_image = crop.transform(tv_tensors.Image(image), params)[0, 0].float()
        out_mask = crop.transform(tv_tensors.Mask(mask), params)[0]
        offsets.append((out_mask == 0).sum().item() - (1 - out_image / 255).sum().item())
    return np.array(offsets)


def test_label_edges_stay_within_half_an_output_pixel_of_the_image_edges():
    crop = RandomScaleCrop((8, 64), base_size=40, scale_range=(0.5, 2.0))
    windows = [(0, left, 8, width) for width in range(14, 90, 3)  # inside the image, edge inside the window
               for left in range(max(0, 52 - width), min(48, 100 - width) + 1, 3)]
    offsets = half_plane_edge_offsets(crop, windows)
    # centre sampling rounds the edge to the nearest output pixel: |offset| <= 1/2, zero on average.
    # Floor sampling (plain NEAREST) lags by 1/2 on average and up to a whole pixel.
    assert np.abs(offsets).max() <= 0.5 + 1e-3 and abs(offsets.mean()) < 0.1


def test_augmentation_keeps_image_and_label_aligned_and_pads_label_with_255():
    geometric = v2.Compose(train_augmentation(crop_size=256, base_size=120).transforms[:-1])  # no colour jitter
    rng = np.random.default_rng(0)
    for seed in range(8):
        image, label = colour_coded_pair(rng)
        torch.manual_seed(seed)
        out_image, out_label = geometric(tv_tensors.Image(image), tv_tensors.Mask(label))
        assert out_image.shape == (3, 256, 256) and out_label.shape == (256, 256)
        pixels, target = out_image.permute(1, 2, 0).reshape(-1, 3).numpy(), out_label.reshape(-1).numpy()
        padded = target == 255
        assert (pixels[padded] == 0).all()
        distance = np.abs(pixels[:, None, :].astype(int) - PALETTE[None, LABEL_VALUES].astype(int)).sum(-1)
        assert (LABEL_VALUES[distance.argmin(1)][~padded] == target[~padded]).mean() > 0.95
    assert padded.any()  # base 120 scaled by <= 2.0 is smaller than the 256 crop: padding happened


def short_sides(crop: RandomScaleCrop, height: int, width: int, seeds: int = 300) -> set[int]:
    image = tv_tensors.Image(torch.zeros(3, height, width, dtype=torch.uint8))
    drawn = set()
    for seed in range(seeds):
        torch.manual_seed(seed)
        drawn.add(crop.make_params([image])["short_side"])
    return drawn


def test_random_scale_draws_every_short_side_from_half_to_twice_the_base_both_included():
    assert short_sides(RandomScaleCrop(16, base_size=10, scale_range=(0.5, 2.0)), 30, 50) == set(range(5, 21))
    assert short_sides(RandomScaleCrop(16, base_size=10, scale_range=(2.0, 2.0)), 30, 50, seeds=3) == {20}
    # base_size=None scales each image's own shorter side (here 30: 15..60)
    assert short_sides(RandomScaleCrop(16, base_size=None, scale_range=(0.5, 2.0)), 30, 50) == set(range(15, 61))


def test_non_square_crop_comes_out_height_by_width():
    augment = train_augmentation((48, 96), base_size=None)
    torch.manual_seed(0)
    image, label = augment(tv_tensors.Image(torch.zeros(3, 60, 200, dtype=torch.uint8)),
                           tv_tensors.Mask(torch.zeros(60, 200, dtype=torch.uint8)))
    assert image.shape == (3, 48, 96) and label.shape == (48, 96)
    assert DATASET_DEFAULTS["cityscapes"]["crop_size"] == (512, 1024) and set(DATASET_DEFAULTS) == set(DATASETS)


def test_seeded_augmentation_is_reproducible_and_varies_with_the_seed(synthetic_root):
    augment = train_augmentation(64, base_size=96)
    dataset = KittiSemantics(synthetic_root, list_labelled(synthetic_root), transform=augment)
    first, again, other = dataset[(0, 123)], dataset[(0, 123)], dataset[(0, 124)]
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert not torch.equal(first[0], other[0])


def test_batches_do_not_depend_on_the_number_of_workers(synthetic_root):
    augment = train_augmentation(64, base_size=96)
    dataset = KittiSemantics(synthetic_root, list_labelled(synthetic_root), transform=augment)

    def batches(workers):
        sampler = SeededTrainSampler(len(dataset), seed=3)
        sampler.set_epoch(2)
        return list(DataLoader(dataset, 4, sampler=sampler, num_workers=workers))
    for (a_img, a_lbl), (b_img, b_lbl) in zip(batches(0), batches(2)):
        assert torch.equal(a_img, b_img) and torch.equal(a_lbl, b_lbl)


# --- synthetic generator ---------------------------------------------------------------------------------
def test_synthetic_scenes_are_deterministic_kitti_sized_and_map_ids_by_the_label_table(tmp_path):
    image, label = make_scene(seed=5, index=3)
    again, label_again = make_scene(seed=5, index=3)
    assert (image == again).all() and (label == label_again).all() and image.shape[:2] in KITTI_SIZES
    assert {4, 7, 8, 11, 21, 23, 26}.issubset(set(np.unique(label).tolist()))
    root = write_synthetic_kitti(tmp_path, num_train=2, num_test=1, seed=0, size=(96, 320))
    assert "2 labelled pairs, 1 test images" in check_tree(root)
    raw = cv2.imread(str(root / "training" / "semantic" / "000000_10.png"), cv2.IMREAD_UNCHANGED)
    _, train = KittiSemantics(root, ["000000_10"], "train")[0]
    _, full = KittiSemantics(root, ["000000_10"], "full")[0]
    train_id = {row.id: row.trainId for row in labels.LABELS}  # the table's rows, read here directly
    for label_id in (4, 7, 26):  # static (void), road, car
        assert (raw == label_id).any()
        assert (train[raw == label_id] == train_id[label_id]).all() and (full[raw == label_id] == label_id).all()
    assert train_id[4] == 255 and train_id[7] == 0 and train_id[26] == 13
    with pytest.raises(UserError, match="at least 60 rows, not 40"):
        make_scene(0, 0, (40, 120))
    ignored = np.isin(raw, [i for i, t in train_id.items() if t == 255])
    assert np.array_equal(train.numpy() == 255, ignored)  # every void id, and only those, is ignored


# --- Cityscapes layout -----------------------------------------------------------------------------------
CITY_TRAIN = ["aachen/aachen_000000_000019", "aachen/aachen_000001_000019", "bochum/bochum_000000_000019",
              "bochum/bochum_000001_000019"]
CITY_VAL = ["frankfurt/frankfurt_000000_000019", "frankfurt/frankfurt_000001_000019"]


@pytest.fixture(scope="module")
def cityscapes_root(tmp_path_factory) -> Path:
    """4 train + 2 val + 1 test synthetic scenes in the official layout, at 64 x 128."""
    return write_synthetic_cityscapes(tmp_path_factory.mktemp("cityscapes"), 4, 2, 1, seed=0, size=(64, 128))


@pytest.fixture
def cityscapes_copy(tmp_path, cityscapes_root) -> Path:
    import shutil
    return Path(shutil.copytree(cityscapes_root, tmp_path / "cityscapes"))


def gt(root: Path, split: str, name: str, kind: str = "labelIds") -> Path:
    return root / "gtFine" / split / f"{name}_gtFine_{kind}.png"


def test_cityscapes_splits_are_the_official_folders_named_city_slash_stem(cityscapes_root):
    assert default_split_for("cityscapes", cityscapes_root) == {"train": CITY_TRAIN, "val": CITY_VAL}
    assert labelled_names("cityscapes", cityscapes_root, "val") == CITY_VAL
    assert labelled_names("cityscapes", cityscapes_root, "trainval") == sorted(CITY_TRAIN + CITY_VAL)
    [(name, path)] = list_test_images("cityscapes", cityscapes_root)
    assert name == "berlin/berlin_000000_000019"
    assert path == cityscapes_root / "leftImg8bit" / "test" / "berlin" / "berlin_000000_000019_leftImg8bit.png"
    assert ImageList(list_test_images("cityscapes", cityscapes_root))[0].shape == (3, 64, 128)


def test_cityscapes_reads_rgb_images_and_labelIds_pixel_by_pixel_and_never_the_color_files(cityscapes_copy):
    for color in cityscapes_copy.glob("gtFine/*/*/*_gtFine_color.png"):
        color.write_bytes(b"not read")  # a reader that looked at these would fail
    dataset = SegmentationDataset("cityscapes", cityscapes_copy, CITY_VAL, "train")
    for index, name in enumerate(CITY_VAL):
        image, label = dataset[index]
        bgr = cv2.imread(str(cityscapes_copy / "leftImg8bit" / "val" / f"{name}_leftImg8bit.png"))
        raw = cv2.imread(str(gt(cityscapes_copy, "val", name)), cv2.IMREAD_UNCHANGED)
        assert np.array_equal(image.permute(1, 2, 0).numpy(), bgr[..., ::-1])
        assert np.array_equal(label.numpy(), labels.ID_TO_TRAIN_ID[raw]) and (label == 0).any()


def test_cityscapes_split_dir_overrides_the_official_folders(cityscapes_root, tmp_path):
    write_split({"train": CITY_VAL[:1], "val": CITY_TRAIN[:2]}, tmp_path)
    assert labelled_names("cityscapes", cityscapes_root, "train", tmp_path) == CITY_VAL[:1]
    names = labelled_names("cityscapes", cityscapes_root, "val", tmp_path)
    assert len(SegmentationDataset("cityscapes", cityscapes_root, names)) == 2
    (tmp_path / "val.txt").write_text("aachen_000000_000019\n")  # the city folder is part of the name
    with pytest.raises(UserError, match="aachen_000000_000019"):
        labelled_names("cityscapes", cityscapes_root, "val", tmp_path)


def test_cityscapes_seeded_augmentation_with_a_non_square_crop(cityscapes_root):
    augment = train_augmentation((32, 64), base_size=None)
    dataset = SegmentationDataset("cityscapes", cityscapes_root, CITY_TRAIN, transform=augment)
    (image, label), (again, label_again) = dataset[(1, 7)], dataset[(1, 7)]
    assert image.shape == (3, 32, 64) and label.shape == (32, 64)
    assert torch.equal(image, again) and torch.equal(label, label_again)


def test_cityscapes_image_without_labelIds_names_the_missing_file(cityscapes_copy):
    gt(cityscapes_copy, "train", CITY_TRAIN[2]).unlink()
    gt(cityscapes_copy, "train", CITY_TRAIN[2], "color").unlink()
    gt(cityscapes_copy, "train", CITY_TRAIN[2], "instanceIds").unlink()
    with pytest.raises(UserError, match=r"bochum_000000_000019_gtFine_labelIds.png is missing: every leftImg8bit"):
        default_split_for("cityscapes", cityscapes_copy)


def test_cityscapes_color_files_alone_are_refused_as_labels(cityscapes_copy):
    for label in cityscapes_copy.glob("gtFine/val/*/*_gtFine_labelIds.png"):
        label.unlink()
    with pytest.raises(UserError, match=r"labelIds.png is missing \(and 1 more\); found .*color.png \(colours\).*, not label ids"):
        labelled_names("cityscapes", cityscapes_copy, "val")


def test_cityscapes_instance_ids_are_refused_as_labels(cityscapes_copy):
    name = CITY_TRAIN[0]
    instances = cv2.imread(str(gt(cityscapes_copy, "train", name)), cv2.IMREAD_UNCHANGED).astype(np.uint16) * 1000
    cv2.imwrite(str(gt(cityscapes_copy, "train", name, "instanceIds")), instances)
    gt(cityscapes_copy, "train", name).rename(gt(cityscapes_copy, "train", name, "unused"))
    with pytest.raises(UserError, match=r"aachen_000000_000019_gtFine_labelIds.png is missing; found .*color.png "
                                        r"\(colours\) and .*instanceIds.png \(16-bit instance ids\), not label ids"):
        default_split_for("cityscapes", cityscapes_copy)
    cv2.imwrite(str(gt(cityscapes_copy, "train", name)), instances)  # 16-bit values under the labelIds name
    with pytest.raises(UserError, match=r"aachen_000000_000019_gtFine_labelIds.png: .*8-bit.*uint16.*instanceIds"):
        SegmentationDataset("cityscapes", cityscapes_copy, [name])[0]


@pytest.mark.parametrize("damage,message", [
    (lambda label: label[:, :3].fill(40), r"labelIds.png: label ids \[40\] are not in the Cityscapes table"),
    (lambda label: None, r"labelIds.png: label size \(32, 128\) differs from its image's \(64, 128\)"),
])
def test_cityscapes_bad_labelIds_name_the_file(cityscapes_copy, damage, message):
    path = gt(cityscapes_copy, "train", CITY_TRAIN[1])
    label = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    damage(label)
    cv2.imwrite(str(path), label if (label == 40).any() else label[:32])
    with pytest.raises(UserError, match=f"aachen_000001_000019_gtFine_{message}"):
        SegmentationDataset("cityscapes", cityscapes_copy, CITY_TRAIN)[1]


def test_cityscapes_empty_split_folder_and_missing_root_show_the_layout(cityscapes_copy, tmp_path):
    for image in cityscapes_copy.glob("leftImg8bit/val/*/*.png"):
        image.unlink()
    with pytest.raises(UserError, match=r"leftImg8bit/val holds no <city>/\*_leftImg8bit.png files: expected ROOT/"):
        default_split_for("cityscapes", cityscapes_copy)
    with pytest.raises(UserError, match=r"nowhere does not exist: expected ROOT/leftImg8bit/.*_gtFine_labelIds.png"):
        SegmentationDataset("cityscapes", tmp_path / "nowhere", CITY_TRAIN)


def test_make_synthetic_and_check_on_the_command_line_for_both_layouts(tmp_path, capsys):
    for layout in DATASETS:
        root = tmp_path / layout
        data_preprocessing.main(["--make-synthetic", str(root), "--layout", layout, "--num", "3", "--num-val", "2",
                                 "--num-test", "1", "--size", "64", "96"])
        data_preprocessing.main(["--check", str(root), "--layout", layout])
    out = capsys.readouterr().out
    assert "kitti: 3 labelled pairs, 1 test images, kitti split 2/1, sizes [(64, 96)]: OK" in out
    assert "cityscapes: 5 labelled pairs, 1 test images, cityscapes split 3/2, sizes [(64, 96)]: OK" in out
    assert len(list((tmp_path / "cityscapes").glob("gtFine/*/*/*_gtFine_color.png"))) == 5


# --- cache within a memory budget ------------------------------------------------------------------------
def test_decoded_size_is_estimated_from_png_headers_without_decoding(cityscapes_root, tmp_path):
    files = sorted(cityscapes_root.glob("leftImg8bit/*/*/*.png"))
    expected = sum(cv2.imread(str(f)).shape[0] * cv2.imread(str(f)).shape[1] * 4 for f in files)
    assert estimate_decoded_bytes(files) == expected == 7 * 64 * 128 * 4
    (tmp_path / "fake.png").write_bytes(b"GIF89a" + bytes(40))
    with pytest.raises(UserError, match="fake.png: cannot be read as a PNG"):
        estimate_decoded_bytes([tmp_path / "fake.png"])


def test_cache_is_used_only_within_its_budget_and_returns_what_the_disk_holds(cityscapes_root):
    decoded_gb = 4 * 64 * 128 * 4 / 1e9
    within = SegmentationDataset("cityscapes", cityscapes_root, CITY_TRAIN, cache=decoded_gb * 1.01)
    over = SegmentationDataset("cityscapes", cityscapes_root, CITY_TRAIN, cache=decoded_gb * 0.99)
    off = SegmentationDataset("cityscapes", cityscapes_root, CITY_TRAIN, cache=False)
    assert within.cached and not over.cached and not off.cached
    assert within.decoded_gb == pytest.approx(decoded_gb) and off.decoded_gb is None
    for i in range(len(CITY_TRAIN)):
        assert all(torch.equal(a, b) for a, b in zip(within[i], over[i]))
        assert np.array_equal(within.load_label(i), over.load_label(i))


@pytest.mark.skipif(not Path("/proc/meminfo").is_file(), reason="reads Linux's /proc/meminfo")
def test_default_cache_budget_is_half_the_available_memory():
    available_kb = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                        if line.startswith("MemAvailable:"))
    assert default_cache_gb() == pytest.approx(available_kb * 1024 / 2 / 1e9, rel=0.1)  # other processes move it


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
                                         ("main.py", ["--no-pretrained", "--epochs", "2", "--data-root"])])
def test_command_line_reports_bad_data_root_in_one_line(tmp_path, script, args):
    result = subprocess.run([sys.executable, str(ROOT / script), *args, str(tmp_path / "missing")],
                            capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip().count("\n") == 0 and result.stderr.startswith("error: ")
    assert "missing" in result.stderr and "--download" in result.stderr
