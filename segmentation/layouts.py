"""Where each dataset's files are, and which images form its splits. One small reader ("layout") per on-disk
layout, chosen in one place (``get_layout``) from a dataset name; data_preprocessing.py reads the files.
``list_images`` lists a plain folder of images (test.py --images). Label ids are Cityscapes ids in both
datasets, so ``labels.py`` stays the only table::

    kitti        ROOT/training/image_2/000000_10.png     RGB images
                 ROOT/training/semantic/000000_10.png    single-channel label ids (0..33)
                 ROOT/testing/image_2/000000_10.png      unlabelled test images
    cityscapes   ROOT/leftImg8bit/{train,val,test}/<city>/<city>_<seq>_<frame>_leftImg8bit.png
                 ROOT/gtFine/{train,val,test}/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png

Image names are KITTI's file stems (``000000_10``) and Cityscapes' ``<city>/<city>_<seq>_<frame>``.
Splits are FIXED, independent of main.py's ``--seed``, so that runs with different seeds are compared on
the same validation images; ``resolve_split`` says where they come from.
"""
from __future__ import annotations

import itertools
import logging
import random
from pathlib import Path
from typing import NamedTuple

from segmentation import UserError

LAYOUT_HELP = ("expected ROOT/training/image_2/*.png (or .jpg), ROOT/training/semantic/*.png and "
               "ROOT/testing/image_2/*.png (KITTI data_semantics layout); pass --download to fetch KITTI, or "
               "--data-root PATH")
CITYSCAPES_HELP = ("expected ROOT/leftImg8bit/{train,val,test}/<city>/<city>_<seq>_<frame>_leftImg8bit.png and "
                   "ROOT/gtFine/{train,val,test}/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png (Cityscapes "
                   "leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip); pass --data-root PATH")
CITYSCAPES_IMAGE, CITYSCAPES_LABEL = "_leftImg8bit.png", "_gtFine_labelIds.png"
ROOT_SPLITS = "splits"  # ROOT/splits/{train,val,test}.txt: a data root's own split, used when no --split-dir is given
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def list_files(folder: Path, suffixes: tuple[str, ...] = IMAGE_SUFFIXES, fix: str = LAYOUT_HELP) -> dict[str, Path]:
    """{stem: path} of the files in ``folder`` with one of ``suffixes``. Other files are named in a warning, never
    dropped in silence; two files of one stem (a.png and a.jpg) are refused. ``fix`` ends each error line."""
    if not folder.is_dir():
        raise UserError(f"{folder} is missing: {fix}")
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    kept = [p for p in files if p.suffix.lower() in suffixes]
    skipped = [p.name for p in files if p.suffix.lower() not in suffixes]
    if skipped:
        logging.getLogger(__name__).warning(f"warning: {folder}: skipped {len(skipped)} file(s) that are not "
                                            f"{'/'.join(suffixes)}: {', '.join(skipped[:5])}")
    if not kept:
        raise UserError(f"{folder} holds no {'/'.join(suffixes)} files: {fix}")
    stems = [p.stem for p in kept]
    clashing = sorted({p.name for p in kept if stems.count(p.stem) > 1})
    if clashing:
        raise UserError(f"{folder}: {', '.join(clashing[:4])} share a name; keep one file a name: {fix}")
    return {p.stem: p for p in kept}


def list_labelled(root: Path) -> list[str]:
    """Names (file stems) of the labelled KITTI training images, after checking that every image has a label."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"data root {root} does not exist: {LAYOUT_HELP}")
    images = set(list_files(root / "training" / "image_2"))
    labels = set(list_files(root / "training" / "semantic", (".png",)))
    for missing, where in ((images - labels, "training/semantic"), (labels - images, "training/image_2")):
        if missing:
            shown = ", ".join(sorted(missing)[:5]) + (" ..." if len(missing) > 5 else "")
            raise UserError(f"{root / where}: no file for {len(missing)} name(s): {shown}; "
                            "every image needs a label of the same name (labels are PNG files)")
    return sorted(images)


def default_split(names: list[str], val_fraction: float = 0.2, seed: int = 0) -> dict[str, list[str]]:
    """Fixed train/val split: 200 KITTI images -> 160/40. Same names, same split, whatever the order or
    main.py's ``--seed``: the seed here is a constant so that every run is validated on the same images."""
    shuffled = sorted(names)
    random.Random(seed).shuffle(shuffled)
    num_val = max(1, round(len(names) * val_fraction))
    return {"train": sorted(shuffled[num_val:]), "val": sorted(shuffled[:num_val])}


class KittiLayout:
    """KITTI data_semantics: no official validation set, so ``default_split`` is the fixed 80/20 split.

    A layout is the one registration of a dataset (``LAYOUTS``): where its files are, its splits, and its
    training scale: the shorter side is drawn from 0.5-2.0 x ``base_size``, then a ``crop_size`` (H, W) crop.
    KITTI frames are 375 pixels high."""

    base_size, crop_size = 375, (320, 320)
    help = LAYOUT_HELP
    label_hint = "use training/semantic, not training/semantic_rgb"
    default_source = "the fixed 80/20 split of the labelled images"

    def labelled(self, root: Path) -> list[str]:
        return list_labelled(root)

    def default_split(self, root: Path, held_out: set[str] = frozenset()) -> dict[str, list[str]]:
        return default_split([name for name in list_labelled(root) if name not in held_out])

    def pair_paths(self, root: Path, names: list[str]) -> list[tuple[Path, Path]]:
        images = list_files(root / "training" / "image_2")
        unknown = [n for n in names if n not in images]
        if unknown:
            raise UserError(f"{root / 'training' / 'image_2'}: no image {unknown[0]!r} ({len(unknown)} unknown "
                            "name(s)); names are the images' file stems")
        return [(images[n], root / "training" / "semantic" / f"{n}.png") for n in names]

    def test_dir(self, root: Path) -> Path:
        return root / "testing" / "image_2"

    def test_images(self, root: Path) -> list[tuple[str, Path]]:
        return sorted(list_files(self.test_dir(root)).items())


class CityscapesLayout:
    """Cityscapes fine annotations: the official train/val/test folders are the splits; only the
    ``*_gtFine_labelIds.png`` files are labels (``_color`` is a picture, ``_instanceIds`` holds id x 1000 +
    instance in 16 bits). Any image size is accepted."""

    base_size, crop_size = 1024, (512, 1024)  # frames 1024 high; mmsegmentation's Cityscapes recipe crops 512 x 1024
    help = CITYSCAPES_HELP
    label_hint = ("use *_gtFine_labelIds.png, not *_gtFine_color.png (colours) or *_gtFine_instanceIds.png "
                  "(16-bit id x 1000 + instance)")
    default_source = "the official train/ and val/ folders"

    def _images(self, root: Path, split: str) -> dict[str, Path]:
        if not root.is_dir():
            raise UserError(f"data root {root} does not exist: {self.help}")
        folder = root / "leftImg8bit" / split
        if not folder.is_dir():
            raise UserError(f"{folder} is missing: {self.help}")
        files = sorted(folder.glob(f"*/*{CITYSCAPES_IMAGE}"))
        if not files:
            raise UserError(f"{folder} holds no <city>/*{CITYSCAPES_IMAGE} files: {self.help}")
        return {f"{p.parent.name}/{p.name[:-len(CITYSCAPES_IMAGE)]}": p for p in files}

    def _pairs(self, root: Path, split: str) -> dict[str, tuple[Path, Path]]:
        pairs = {name: (image, root / "gtFine" / split / f"{name}{CITYSCAPES_LABEL}")
                 for name, image in self._images(root, split).items()}
        missing = [label for _, label in pairs.values() if not label.is_file()]
        if missing:
            raise UserError(_missing_labels_message(missing))
        return pairs

    def _labelled(self, root: Path) -> dict[str, tuple[Path, Path]]:
        train, val = self._pairs(root, "train"), self._pairs(root, "val")
        both = sorted(train.keys() & val.keys())
        if both:
            raise UserError(f"{root / 'leftImg8bit'}: {both[0]} is in both train/ and val/; "
                            "a name must be in one split")
        return {**train, **val}

    def labelled(self, root: Path) -> list[str]:
        return sorted(self._labelled(root))

    def default_split(self, root: Path, held_out: set[str] = frozenset()) -> dict[str, list[str]]:
        return {split: sorted(set(self._pairs(root, split)) - held_out) for split in ("train", "val")}

    def pair_paths(self, root: Path, names: list[str]) -> list[tuple[Path, Path]]:
        labelled = self._labelled(root)
        unknown = [n for n in names if n not in labelled]
        if unknown:
            raise UserError(f"{root}: no labelled image {unknown[0]!r} in leftImg8bit/{{train,val}} "
                            f"({len(unknown)} unknown name(s)); names look like aachen/aachen_000000_000019")
        return [labelled[n] for n in names]

    def test_dir(self, root: Path) -> Path:
        return root / "leftImg8bit" / "test"

    def test_images(self, root: Path) -> list[tuple[str, Path]]:
        return sorted(self._images(root, "test").items())


def _missing_labels_message(missing: list[Path]) -> str:
    """One line for images without ``*_gtFine_labelIds.png``, saying which wrong label files are there."""
    first, more = missing[0], f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
    stem = str(first)[:-len(CITYSCAPES_LABEL)]
    found = [f"{Path(stem + suffix).name} ({what})" for suffix, what in
             (("_gtFine_color.png", "colours"), ("_gtFine_instanceIds.png", "16-bit instance ids"))
             if Path(stem + suffix).is_file()]
    if found:
        return (f"{first} is missing{more}; found {' and '.join(found)}, not label ids: "
                "extract the *_gtFine_labelIds.png files of gtFine_trainvaltest.zip")
    return (f"{first} is missing{more}: every leftImg8bit image needs its *_gtFine_labelIds.png "
            "(gtFine_trainvaltest.zip)")


LAYOUTS = {"kitti": KittiLayout(), "cityscapes": CityscapesLayout()}
DATASETS = tuple(LAYOUTS)


def get_layout(dataset: str) -> KittiLayout | CityscapesLayout:
    """The one place where a dataset name picks its on-disk reader."""
    if dataset not in LAYOUTS:
        raise UserError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
    return LAYOUTS[dataset]


class Split(NamedTuple):
    """The names of each split asked for (None: a split without labels, e.g. KITTI's test), and where they came
    from, for a run's start line."""
    names: dict[str, list[str] | None]
    source: str


def resolve_split(dataset: str, root: Path, wanted: tuple[str, ...], given: Path | None = None,
                  found: tuple[Path | str | None, ...] = ()) -> Split:
    """The one place that decides which images train, validate and test. ``wanted`` names splits: train, val, test,
    or trainval (train + val). The first of these that applies decides them all:

    1. ``given`` (--split-dir): its <split>.txt files, which must be there;
    2. ``found``, in order (a resumed run: its own folder; test.py: the run folder, then the run's --split-dir):
       the first folder that holds every wanted file;
    3. the data root's own ``ROOT/splits`` folder, if it holds every wanted file (as scripts/prepare_camvid.py
       writes it): a dataset that ships its split is trained on that split with no flag;
    4. the dataset's fixed split (KITTI's 80/20 of the labelled images, ``default_split``; Cityscapes' official
       folders), less the names of ``ROOT/splits/test.txt``: a test image enters training only where a split
       file the user gives names it. Its test split has no labels.

    A folder's files (test.txt included) are read against one listing of the labelled images: each name a
    labelled image, listed once, and in one file only."""
    files = sorted({name for split in wanted for name in (("train", "val") if split == "trainval" else (split,))})
    own, root = Path(root) / ROOT_SPLITS, Path(root)
    if given is not None:
        folder, source = Path(given), f"split from {given}"
        missing = [folder / f"{name}.txt" for name in files if not (folder / f"{name}.txt").is_file()]
        if missing:
            raise UserError(f"{missing[0]} is missing: a split folder needs train.txt and val.txt, one image name a "
                            "line")
    else:
        folder = next((Path(f) for f in (*found, own) if f and all((Path(f) / f"{n}.txt").is_file() for n in files)),
                      None)
        source = f"split from {folder}" + (" (the data root's own)" if folder == own else "")
    if folder is None:
        held_out = set(read_names(own / "test.txt")) if (own / "test.txt").is_file() else set()
        split = {**get_layout(dataset).default_split(root, held_out), "test": None}
        source = f"split: {get_layout(dataset).default_source}" + (
            f", less the {len(held_out)} test names of {own / 'test.txt'}" if held_out else "")
    else:
        labelled = set(get_layout(dataset).labelled(root))  # listed once for all the folder's files
        split = {name: split_file_names(folder / f"{name}.txt", root, labelled) for name in ("train", "val", "test")
                 if (folder / f"{name}.txt").is_file()}
        check_disjoint(split, folder)
    if "trainval" in wanted:
        split["trainval"] = sorted(split["train"] + split["val"])
    return Split({name: split[name] for name in wanted}, source)


def check_disjoint(split: dict[str, list[str]], folder: Path) -> None:
    """Refuse a name in two of a folder's split files: validation would score training images, or a test image
    would be trained on."""
    for first, second in itertools.combinations(sorted(split), 2):
        shared = sorted(set(split[first]) & set(split[second]))
        if shared:
            raise UserError(f"{folder}: {', '.join(shared[:5])} in both {first}.txt and {second}.txt; keep each "
                            "name in one file")


def read_names(path: Path) -> list[str]:
    return [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]


def split_file_names(path: Path, root: Path, labelled: set[str]) -> list[str]:
    """The names in a split file, each once and each one of ``labelled`` (the labelled images of ``root``)."""
    names = read_names(path)
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:  # a repeated val name would be scored twice
        raise UserError(f"{path}: {', '.join(repeated[:5])} listed more than once; keep each name once")
    unknown = sorted(set(names) - labelled)
    if unknown:
        raise UserError(f"{path}: names not among the labelled images of {root}: {', '.join(unknown[:5])}")
    return names


def write_split(split: dict[str, list[str]], folder: Path) -> None:
    """Write ``train.txt`` and ``val.txt`` (one name a line) that ``--split-dir`` can read back."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, names in split.items():
        (folder / f"{name}.txt").write_text("".join(f"{n}\n" for n in names))


def list_images(folder: Path) -> list[tuple[str, Path]]:
    """``(stem, path)`` of every PNG or JPEG directly in ``folder``, sorted by name."""
    if not folder.is_dir():
        raise UserError(f"{folder} is not a folder of images or a video file; pass --images with a folder of "
                        "PNG/JPEG files or a video")
    # files of one stem are refused: their predictions would be written to the same <stem>.png
    return sorted(list_files(folder, fix="pass --images with a folder of PNG/JPEG images or a video").items())
