import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from conftest import KITTI_SAMPLE

import data_preprocessing
import labels
from data_preprocessing import (
    ImageList,
    KittiSemantics,
    SegmentationDataset,
    check_tree,
    default_cache_gb,
    estimate_decoded_bytes,
)
from segmentation import UserError
from segmentation.augmentation import TrainAugmentation
from segmentation.layouts import (
    DATASETS,
    default_split,
    get_layout,
    list_labelled,
    resolve_split,
    write_split,
)
from segmentation.synthetic import KITTI_SIZES, make_scene, write_synthetic_cityscapes, write_synthetic_kitti

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
    assert resolve_split("kitti", synthetic_root, ("val",), tmp_path).names["val"] == split["val"]
    (tmp_path / "val.txt").write_text("000000_10\nnot_there\n")
    with pytest.raises(UserError, match="not_there"):
        resolve_split("kitti", synthetic_root, ("val",), tmp_path).names["val"]


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
    assert resolve_split("cityscapes", cityscapes_root, ("train", "val")).names == {"train": CITY_TRAIN, "val": CITY_VAL}
    assert resolve_split("cityscapes", cityscapes_root, ("val",)).names["val"] == CITY_VAL
    assert resolve_split("cityscapes", cityscapes_root, ("trainval",)).names["trainval"] == sorted(CITY_TRAIN + CITY_VAL)
    [(name, path)] = get_layout("cityscapes").test_images(cityscapes_root)
    assert name == "berlin/berlin_000000_000019"
    assert path == cityscapes_root / "leftImg8bit" / "test" / "berlin" / "berlin_000000_000019_leftImg8bit.png"
    assert ImageList(get_layout("cityscapes").test_images(cityscapes_root))[0].shape == (3, 64, 128)


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
    assert resolve_split("cityscapes", cityscapes_root, ("train",), tmp_path).names["train"] == CITY_VAL[:1]
    names = resolve_split("cityscapes", cityscapes_root, ("val",), tmp_path).names["val"]
    assert len(SegmentationDataset("cityscapes", cityscapes_root, names)) == 2
    (tmp_path / "val.txt").write_text("aachen_000000_000019\n")  # the city folder is part of the name
    with pytest.raises(UserError, match="aachen_000000_000019"):
        resolve_split("cityscapes", cityscapes_root, ("val",), tmp_path).names["val"]


def test_cityscapes_seeded_augmentation_with_a_non_square_crop(cityscapes_root):
    augment = TrainAugmentation((32, 64), base_size=None)
    dataset = SegmentationDataset("cityscapes", cityscapes_root, CITY_TRAIN, transform=augment)
    (image, label), (again, label_again) = dataset[(1, 7)], dataset[(1, 7)]
    assert image.shape == (3, 32, 64) and label.shape == (32, 64)
    assert torch.equal(image, again) and torch.equal(label, label_again)


def test_cityscapes_image_without_labelIds_names_the_missing_file(cityscapes_copy):
    gt(cityscapes_copy, "train", CITY_TRAIN[2]).unlink()
    gt(cityscapes_copy, "train", CITY_TRAIN[2], "color").unlink()
    gt(cityscapes_copy, "train", CITY_TRAIN[2], "instanceIds").unlink()
    with pytest.raises(UserError, match=r"bochum_000000_000019_gtFine_labelIds.png is missing: every leftImg8bit"):
        resolve_split("cityscapes", cityscapes_copy, ("train", "val")).names


def test_cityscapes_color_files_alone_are_refused_as_labels(cityscapes_copy):
    for label in cityscapes_copy.glob("gtFine/val/*/*_gtFine_labelIds.png"):
        label.unlink()
    with pytest.raises(UserError, match=r"labelIds.png is missing \(and 1 more\); found .*color.png \(colours\).*, not label ids"):
        resolve_split("cityscapes", cityscapes_copy, ("val",)).names["val"]


def test_cityscapes_instance_ids_are_refused_as_labels(cityscapes_copy):
    name = CITY_TRAIN[0]
    instances = cv2.imread(str(gt(cityscapes_copy, "train", name)), cv2.IMREAD_UNCHANGED).astype(np.uint16) * 1000
    cv2.imwrite(str(gt(cityscapes_copy, "train", name, "instanceIds")), instances)
    gt(cityscapes_copy, "train", name).rename(gt(cityscapes_copy, "train", name, "unused"))
    with pytest.raises(UserError, match=r"aachen_000000_000019_gtFine_labelIds.png is missing; found .*color.png "
                                        r"\(colours\) and .*instanceIds.png \(16-bit instance ids\), not label ids"):
        resolve_split("cityscapes", cityscapes_copy, ("train", "val")).names
    cv2.imwrite(str(gt(cityscapes_copy, "train", name)), instances)  # 16-bit values under the labelIds name
    with pytest.raises(UserError, match=r"aachen_000000_000019_gtFine_labelIds.png: .*8-bit.*uint16.*instanceIds"):
        SegmentationDataset("cityscapes", cityscapes_copy, [name])[0]


@pytest.mark.parametrize("damage,message", [
    (lambda label: label[:, :3].fill(40), r"labelIds.png: label values \[40\] are not in the Cityscapes table"),
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
        resolve_split("cityscapes", cityscapes_copy, ("train", "val")).names
    with pytest.raises(UserError, match=r"nowhere does not exist: expected ROOT/leftImg8bit/.*_gtFine_labelIds.png"):
        SegmentationDataset("cityscapes", tmp_path / "nowhere", CITY_TRAIN)


def test_make_synthetic_and_check_on_the_command_line_for_both_layouts(tmp_path, capsys):
    for layout in DATASETS:
        root = tmp_path / layout
        data_preprocessing.main(["--make-synthetic", str(root), "--layout", layout, "--num", "3", "--num-val", "2",
                                 "--num-test", "1", "--size", "64", "96"])
        data_preprocessing.main(["--check", str(root), "--layout", layout])
    out = capsys.readouterr().out
    table = "labels in the Cityscapes table (ids 0..33, 255 = ignore): OK"
    assert f"kitti: 3 labelled pairs, 1 test images, kitti split 2/1, sizes [(64, 96)], {table}" in out
    assert f"cityscapes: 5 labelled pairs, 1 test images, cityscapes split 3/2, sizes [(64, 96)], {table}" in out
    assert len(list((tmp_path / "cityscapes").glob("gtFine/*/*/*_gtFine_color.png"))) == 5


# --- cache within a memory budget ------------------------------------------------------------------------
def test_decoded_size_is_estimated_from_png_headers_without_decoding(cityscapes_root, tmp_path):
    files = sorted(cityscapes_root.glob("leftImg8bit/*/*/*.png"))
    expected = sum(cv2.imread(str(f)).shape[0] * cv2.imread(str(f)).shape[1] * 4 for f in files)
    assert estimate_decoded_bytes(files) == expected == 7 * 64 * 128 * 4
    (tmp_path / "fake.png").write_bytes(b"GIF89a" + bytes(40))
    with pytest.raises(UserError, match="fake.png: cannot be read as an image"):
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
    with pytest.raises(UserError, match=r"000004_10.png: label values \[40, 41\] are not in the Cityscapes table"):
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
