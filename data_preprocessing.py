"""Files on disk -> (image, label) tensors for KITTI semantics and Cityscapes: reading, checks, the cache.
Where the files are and which form each split is in layouts.py; the training augmentation applied to the
tensors is in augmentation.py.

Datasets return ``uint8`` tensors: images (3, H, W) in RGB order, labels (H, W) holding class indices of the
chosen label set with 255 = ignore. Normalisation happens on the device (``normalize``), so a batch
crosses the bus as bytes, not floats.

Command line: ``--make-synthetic DIR --num N [--layout cityscapes]`` writes a synthetic tree, ``--download ROOT``
fetches KITTI, ``--check ROOT [--layout cityscapes] [--label-set TABLE]`` reads every file of a tree and reports its
problems, ``--colour-labels COLOURS LABELS --label-set TABLE`` turns colour label images into label PNGs.

KITTI publishes no checksum for its archive, so ``download_kitti`` checks it twice: every member's CRC-32 inside
the zip (a truncated download has no central directory and fails to open), then the file counts of the
extracted layout; a half archive is never left looking complete.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import urllib.error
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterable
from urllib.parse import urlparse

import cv2
import numpy as np
import PIL.Image
import torch
from torch.utils.data import Dataset
from torchvision.datasets.utils import download_url, extract_archive

from labels import IGNORE_INDEX, LabelSet, get_label_set
from segmentation import MAX_SIDE, UserError, error_line, require
from segmentation.layouts import DATASETS, get_layout, resolve_split

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# a joint augmentation: (image, label, generator or None[, zoom]) -> (image, label), e.g.
# augmentation.TrainAugmentation; zoom (a resolution stage's scale) is passed only when it is not 1
Transform = Callable[..., tuple[torch.Tensor, torch.Tensor]]
KITTI_URL = "https://s3.eu-central-1.amazonaws.com/avg-kitti/data_semantics.zip"
KITTI_COUNTS = {"training/image_2": 200, "training/semantic": 200, "testing/image_2": 200}


# --- reading one file --------------------------------------------------------------------------------------
def read_image(path: Path) -> np.ndarray:
    """(H, W, 3) uint8 RGB. OpenCV decodes to BGR, so the channels are reversed here, once."""
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise UserError(f"{path}: cannot be read as an image; replace or delete the file")
    return np.ascontiguousarray(image[..., ::-1])


def read_label(path: Path, label_set: LabelSet, hint: str) -> np.ndarray:
    """(H, W) uint8 label values, read unchanged (never converted from colour) and checked against
    ``label_set``'s table. ``hint`` names the right files of the layout when a colour or 16-bit (instance id) PNG
    is offered instead."""
    label = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if label is None:
        raise UserError(f"{path}: cannot be read as a label PNG; replace or delete the file")
    if label.ndim != 2 or label.dtype != np.uint8:
        raise UserError(f"{path}: label must be a single-channel 8-bit PNG of label ids (shape {label.shape}, "
                        f"{label.dtype}); {hint}")
    bad = np.unique(label[~label_set.known[label]])
    if bad.size:
        raise UserError(f"{path}: label values {bad.tolist()} are not in {label_set.source}; add them to the "
                        "table (or mark them void), or remap the labels")
    return label


def image_size(path: Path) -> tuple[int, int]:
    """(height, width) of a PNG or JPEG file from its header, without decoding the image (Pillow reads the header
    on open and the pixels only when asked)."""
    try:
        with PIL.Image.open(path) as image:
            (width, height), kind = image.size, image.format
    except OSError as error:  # Pillow's UnidentifiedImageError is an OSError too
        raise UserError(f"{path}: cannot be read as an image ({error}); replace or delete the file") from None
    if kind not in ("PNG", "JPEG") or not width * height:
        raise UserError(f"{path}: cannot be read as an image (a {kind} file of {width}x{height}, not a PNG or JPEG); "
                        "replace or delete the file")
    return height, width


def estimate_decoded_bytes(files: Iterable[Path], bytes_per_pixel: int = 4) -> int:
    """Bytes that decoding ``files`` would take, from their headers. The default 4 bytes a pixel is what
    the cache holds for an image: 3 for RGB plus 1 for its 8-bit label of the same size."""
    return sum(height * width * bytes_per_pixel for height, width in map(image_size, files))


def default_cache_gb() -> float:
    """Half the memory the OS reports as available now: the other half is left to the DataLoader workers,
    CUDA and pinned buffers. 0 where the OS does not say (no cache rather than a guess)."""
    try:
        found = re.search(r"^MemAvailable:\s+(\d+) kB", Path("/proc/meminfo").read_text(), re.M)
    except OSError:
        found = None
    if found:
        return int(found.group(1)) * 1024 / 2 / 1e9
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2 / 1e9
    except (ValueError, AttributeError, OSError):
        return 0.0


# --- datasets ----------------------------------------------------------------------------------------------
class SegmentationDataset(Dataset):
    """Labelled images of ``dataset`` as ``(uint8 image (3, H, W), uint8 label (H, W))``, labels in ``label_set``
    classes, ``transform`` (e.g. ``TrainAugmentation``) applied to both (``__getitem__``).

    ``cache`` is a memory budget in GB (True: ``default_cache_gb()``, False: off): when the decoded files fit it
    (``decoded_gb``, estimated from the PNG headers), every file is decoded once, up front, in the constructing
    process, and DataLoader workers share the arrays; otherwise the workers decode on every access. ``cached`` says
    which happened.
    """

    def __init__(self, dataset: str, root: str | Path, names: list[str], label_set: LabelSet | str = "train",
                 transform: Transform | None = None, cache: bool | float = False):
        self.layout = get_layout(dataset)
        self.root = Path(root)
        self.names = list(names)
        self.paths = self.layout.pair_paths(self.root, self.names)
        self.label_set = get_label_set(label_set) if isinstance(label_set, str) else label_set
        self.transform = transform
        if isinstance(cache, bool):
            cache = default_cache_gb() if cache else 0.0
        self.cache_budget_gb = float(cache)
        self.decoded_gb, self._cache = None, None
        if self.cache_budget_gb:
            self.decoded_gb = estimate_decoded_bytes(image for image, _ in self.paths) / 1e9
            if self.decoded_gb <= self.cache_budget_gb:
                with ThreadPoolExecutor(4) as pool:  # cv2 releases the GIL while decoding
                    self._cache = list(pool.map(self._load, range(len(self.names))))

    @property
    def cached(self) -> bool:
        return self._cache is not None

    def __len__(self) -> int:
        return len(self.names)

    def _load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        image_path, label_path = self.paths[index]
        image, label = read_image(image_path), read_label(label_path, self.label_set, self.layout.label_hint)
        if image.shape[:2] != label.shape:
            raise UserError(f"{label_path}: label size {label.shape} differs from its image's {image.shape[:2]}; "
                            "the pair must have the same height and width")
        return image, self.label_set.id_to_class[label]

    def load_label(self, index: int) -> np.ndarray:
        """(H, W) uint8 class indices of one image: from the cache, or from its label PNG alone (the image is
        not decoded), for statistics such as class pixel counts."""
        if self._cache is not None:
            return self._cache[index][1]
        return self.label_set.id_to_class[read_label(self.paths[index][1], self.label_set, self.layout.label_hint)]

    def __getitem__(self, key: int | tuple) -> tuple[torch.Tensor, torch.Tensor]:
        """``(uint8 image (3, H, W), uint8 label (H, W))``, transformed. With a ``seed`` (``key = (index, seed)``)
        the transform draws from a generator seeded with it, so a sample is augmented the same way in whichever
        worker makes it; without one, from the global generator. ``key = (index, seed, zoom)`` also passes the
        resolution stage's scale to the transform."""
        index, seed, zoom = (*key, 1.0)[:3] if isinstance(key, tuple) else (key, None, 1.0)
        image, label = self._cache[index] if self._cache is not None else self._load(index)
        image, label = torch.from_numpy(image).permute(2, 0, 1), torch.from_numpy(label)
        if self.transform is not None:
            generator = None if seed is None else torch.Generator().manual_seed(seed)
            image, label = self.transform(image, label, generator, *([zoom] if zoom != 1 else []))
        return image.contiguous(), label.contiguous()


class KittiSemantics(SegmentationDataset):
    """``SegmentationDataset("kitti", ...)``: labelled KITTI images, under the name the scripts have used."""

    def __init__(self, root: str | Path, names: list[str], label_set: LabelSet | str = "train",
                 transform: Transform | None = None, cache: bool | float = False):
        super().__init__("kitti", root, names, label_set, transform, cache)


class ImageList(Dataset):
    """Unlabelled images from ``(name, path)`` pairs (e.g. a layout's ``test_images``) as ``uint8 (3, H, W)`` RGB."""

    def __init__(self, items: list[tuple[str, Path]]):
        self.names = [name for name, _ in items]
        self.paths = [Path(path) for _, path in items]

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.from_numpy(read_image(self.paths[index])).permute(2, 0, 1).contiguous()


def normalize(images: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) uint8 RGB on any device -> float32, ImageNet-normalised, as the ResNet18 trunk expects."""
    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(1, 3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD, device=images.device).view(1, 3, 1, 1) * 255
    return (images.float() - mean) / std


def _count_png(root: Path, counts: dict[str, int]) -> dict[str, int]:
    return {sub: len(list((root / sub).glob("*.png"))) for sub in counts}


def verify_zip(path: Path) -> None:
    """Raise UserError (and delete the file) unless it is a complete zip whose every member passes its CRC."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad_member = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as error:
        bad_member = f"({error})"
    if bad_member is not None:
        path.unlink(missing_ok=True)
        raise UserError(f"{path}: download is truncated or corrupt at {bad_member}; it was deleted, run --download "
                        "again")


def download_kitti(root: str | Path, url: str = KITTI_URL, expected_counts: dict[str, int] = KITTI_COUNTS) -> Path:
    """Download (atomically: ``.part`` then rename after verification), extract into ``root``, check the layout."""
    root = Path(root)
    if _count_png(root, expected_counts) == expected_counts:
        return root
    archive = root / Path(urlparse(url).path).name
    if archive.is_file():
        verify_zip(archive)
    else:
        part = archive.with_name(archive.name + ".part")
        part.unlink(missing_ok=True)  # torchvision would take any existing file as complete
        try:
            download_url(url, str(root), part.name)
        except (urllib.error.URLError, OSError, RuntimeError) as error:
            part.unlink(missing_ok=True)
            raise UserError(f"downloading {url} failed ({error}); check the connection, or download the file "
                            f"by hand to {archive} and run again") from None
        verify_zip(part)
        os.replace(part, archive)
    extract_archive(str(archive), str(root))
    found = _count_png(root, expected_counts)
    if found != expected_counts:
        raise UserError(f"{archive} extracted to {root} with {found} PNG files, expected {expected_counts}; "
                        f"delete {archive} and run --download again")
    return root


# --- the command line ---------------------------------------------------------------------------------------
def check_tree(root: Path, dataset: str = "kitti", label_set: LabelSet | str = "full") -> str:
    """Read every labelled pair under ``root``, its labels checked against ``label_set``'s table, and summarise the
    tree; the problems found, file by file, are raised together."""
    root = Path(root)
    split = resolve_split(dataset, root, ("train", "val")).names
    names = get_layout(dataset).labelled(root)
    pairs = SegmentationDataset(dataset, root, names, label_set)
    sizes, problems = set(), []
    for index in range(len(pairs)):
        try:
            sizes.add(tuple(pairs[index][1].shape))
        except UserError as error:
            problems.append(str(error))
    if problems:
        raise UserError(f"{root}: {len(problems)} of {len(names)} labelled pairs have problems: "
                        + " | ".join(problems[:5]) + (" | ..." if len(problems) > 5 else ""))
    num_test = len(get_layout(dataset).test_images(root)) if get_layout(dataset).test_dir(root).is_dir() else 0
    return (f"{root}: {len(names)} labelled pairs, {num_test} test images, {dataset} split "
            f"{len(split['train'])}/{len(split['val'])}, sizes {sorted(sizes)}, labels in {pairs.label_set.source}: OK")


def colour_labels_to_values(source: Path, dest: Path, label_set: LabelSet) -> str:
    """Turn every colour label image (PNG) in ``source`` into a single-channel label PNG of the same name in
    ``dest`` (new or empty), each pixel the table value of its colour. A colour that no row of the table has
    becomes 255 (ignored); each file with such pixels is named, with their count. Where two rows share a
    colour, the smaller value is written (a table keeps no row order)."""
    files = sorted(p for p in Path(source).glob("*.png") if p.is_file())
    if not files:
        raise UserError(f"{source} holds no PNG files; pass the folder of colour label images")
    if Path(dest).exists() and any(Path(dest).iterdir()):
        raise UserError(f"{dest} already holds files; give a new or empty folder, so that nothing is overwritten")
    values = np.flatnonzero(label_set.known[:255])[::-1]  # reversed: the smaller value of a shared colour wins
    codes = {int(r) << 16 | int(g) << 8 | int(b): value
             for value, (r, g, b) in zip(values, label_set.value_colors[values])}
    Path(dest).mkdir(parents=True, exist_ok=True)
    unknown = []
    for path in files:
        rgb = read_image(path).astype(np.uint32)
        pixel_codes, inverse = np.unique(rgb[..., 0] << 16 | rgb[..., 1] << 8 | rgb[..., 2], return_inverse=True)
        lookup = np.array([codes.get(int(code), IGNORE_INDEX) for code in pixel_codes], np.uint8)
        label = lookup[inverse.reshape(rgb.shape[:2])]
        if not cv2.imwrite(str(Path(dest) / path.name), label):
            raise UserError(f"{Path(dest) / path.name}: could not be written; check the folder and free space")
        if (lookup == IGNORE_INDEX).any():
            unknown.append(f"{path.name} ({int((label == IGNORE_INDEX).sum())} pixels)")
    line = f"wrote {len(files)} label PNGs to {dest} from the colours of {label_set.source}"
    if unknown:
        line += (f"; colours not in the table, written as 255 (ignored), in {len(unknown)} file(s): "
                 + ", ".join(unknown[:10]) + (" ..." if len(unknown) > 10 else ""))
    return line


def make_synthetic(args: argparse.Namespace) -> str:
    """Write the synthetic tree that ``--make-synthetic`` asks for; return the line to print."""
    from segmentation.synthetic import MIN_HEIGHT, write_synthetic_cityscapes, write_synthetic_kitti
    require(args.num >= 1, "--num", args.num, "1 or more labelled images")
    require(args.num_val >= 1, "--num-val", args.num_val, "1 or more validation images")
    require(args.num_test >= 0, "--num-test", args.num_test, "0 or more")
    require(args.seed >= 0, "--seed", args.seed, "0 or more")
    require(args.size is None or all(MIN_HEIGHT <= side <= MAX_SIDE for side in args.size), "--size", args.size,
            f"H W, each {MIN_HEIGHT} to {MAX_SIDE} pixels")
    size = tuple(args.size) if args.size else None
    if args.layout == "cityscapes":
        write_synthetic_cityscapes(args.make_synthetic, args.num, args.num_val, args.num_test, args.seed, size)
        counts = f"{args.num} train + {args.num_val} val + {args.num_test} test"
    else:
        write_synthetic_kitti(args.make_synthetic, args.num, args.num_test, args.seed, size)
        counts = f"{args.num} labelled + {args.num_test} test"
    return f"wrote {counts} SYNTHETIC {args.layout} scenes to {args.make_synthetic}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layout", "--dataset", dest="layout", default="kitti", choices=DATASETS,
                        help="on-disk layout for --make-synthetic and --check (default %(default)s)")
    parser.add_argument("--make-synthetic", type=Path, metavar="DIR", help="write a synthetic tree")
    parser.add_argument("--num", type=int, default=200,
                        help="labelled (Cityscapes: train) synthetic images (default 200)")
    parser.add_argument("--num-val", type=int, default=4, help="Cityscapes only: val images (default 4)")
    parser.add_argument("--num-test", type=int, default=0, help="unlabelled synthetic images (default 0)")
    parser.add_argument("--size", type=int, nargs=2, metavar=("H", "W"),
                        help="synthetic image size (default: KITTI's four sizes; Cityscapes 512 1024, half the real)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--download", type=Path, metavar="ROOT", help="download and extract KITTI into ROOT")
    parser.add_argument("--check", type=Path, metavar="ROOT", help="read every file of a tree and report")
    parser.add_argument("--colour-labels", type=Path, nargs=2, metavar=("COLOURS", "LABELS"),
                        help="turn the colour label PNGs in folder COLOURS into label PNGs in the new folder LABELS")
    parser.add_argument("--label-set", default="full", help="the table that --check and --colour-labels use: train, "
                        "full (Cityscapes ids) or a class table CSV (default %(default)s)")
    args = parser.parse_args(argv)
    try:
        if args.make_synthetic:
            print(make_synthetic(args))
        if args.download:
            print(f"KITTI semantics ready in {download_kitti(args.download)}")
        if args.colour_labels:
            print(colour_labels_to_values(*args.colour_labels, get_label_set(args.label_set)))
        if args.check:
            print(check_tree(args.check, args.layout, get_label_set(args.label_set)))
        if not (args.make_synthetic or args.download or args.check or args.colour_labels):
            parser.print_help()
    except (UserError, OSError) as error:
        sys.exit(error_line(error))


if __name__ == "__main__":
    main()
