"""KITTI semantics on disk -> (image, label) tensors: reading, checks, splits, augmentation, cache.

Layout (as in KITTI's ``data_semantics.zip``)::

    ROOT/training/image_2/000000_10.png   RGB images
    ROOT/training/semantic/000000_10.png  single-channel Cityscapes label ids (0..33)
    ROOT/testing/image_2/000000_10.png    unlabelled test images

Datasets return ``uint8`` tensors: images (3, H, W) in RGB order, labels (H, W) holding class indices of the
chosen label set with 255 = ignore. Normalisation happens on the device (``normalize``), so a batch
crosses the bus as bytes, not floats.

Command line: ``--make-synthetic DIR --num N`` writes a synthetic tree, ``--download ROOT`` fetches KITTI,
``--check ROOT`` reads every file of a tree and reports problems.
"""
from __future__ import annotations

import argparse
import random
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from errors import UserError
from labels import IGNORE_INDEX, VALID_IDS, LabelSet, get_label_set

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
LAYOUT_HELP = ("expected ROOT/training/image_2/*.png, ROOT/training/semantic/*.png and ROOT/testing/image_2/*.png "
               "(KITTI data_semantics layout); pass --download to fetch KITTI, or --data-root PATH")
LABELLED_SPLITS = ("train", "val", "trainval")
_ALLOWED_IDS = np.zeros(256, bool)
_ALLOWED_IDS[VALID_IDS] = True
_ALLOWED_IDS[IGNORE_INDEX] = True


def read_image(path: Path) -> np.ndarray:
    """(H, W, 3) uint8 RGB. OpenCV decodes to BGR, so the channels are reversed here, once."""
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise UserError(f"{path}: cannot be read as an image; replace or delete the file")
    return np.ascontiguousarray(image[..., ::-1])


def read_label(path: Path) -> np.ndarray:
    """(H, W) uint8 Cityscapes label ids, read unchanged (never converted from colour)."""
    label = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if label is None:
        raise UserError(f"{path}: cannot be read as a label PNG; replace or delete the file")
    if label.ndim != 2 or label.dtype != np.uint8:
        raise UserError(f"{path}: label must be a single-channel 8-bit PNG of label ids (shape {label.shape}, "
                        f"{label.dtype}); use training/semantic, not training/semantic_rgb")
    bad = np.unique(label[~_ALLOWED_IDS[label]])
    if bad.size:
        raise UserError(f"{path}: label ids {bad.tolist()} are not in the Cityscapes table (0..33, 255 = ignore); "
                        "remap them with labels.py's table")
    return label


def list_png(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise UserError(f"{folder} is missing: {LAYOUT_HELP}")
    files = sorted(folder.glob("*.png"))
    if not files:
        raise UserError(f"{folder} holds no .png files: {LAYOUT_HELP}")
    return files


def list_labelled(root: Path) -> list[str]:
    """Names (file stems) of the labelled training images, after checking that every image has a label."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"data root {root} does not exist: {LAYOUT_HELP}")
    images = {p.stem for p in list_png(root / "training" / "image_2")}
    labels = {p.stem for p in list_png(root / "training" / "semantic")}
    for missing, where in ((images - labels, "training/semantic"), (labels - images, "training/image_2")):
        if missing:
            shown = ", ".join(sorted(missing)[:5]) + (" ..." if len(missing) > 5 else "")
            raise UserError(f"{root / where}: no file for {len(missing)} name(s): {shown}; "
                            "every image needs a label of the same name")
    return sorted(images)


def default_split(names: list[str], val_fraction: float = 0.2, seed: int = 0) -> dict[str, list[str]]:
    """Deterministic train/val split: 200 KITTI images -> 160/40. Same names and seed, same split."""
    shuffled = sorted(names)
    random.Random(seed).shuffle(shuffled)
    num_val = max(1, round(len(names) * val_fraction))
    return {"train": sorted(shuffled[num_val:]), "val": sorted(shuffled[:num_val])}


def write_split(split: dict[str, list[str]], folder: Path) -> None:
    """Write ``train.txt`` and ``val.txt`` (one name a line) that ``--split-dir`` can read back."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, names in split.items():
        (folder / f"{name}.txt").write_text("".join(f"{n}\n" for n in names))


def resolve_split(root: Path, split: str, split_dir: Path | None = None) -> list[str]:
    """Names in a split: ``split_dir/<split>.txt`` if given, else the default 80/20 split of the labelled set."""
    if split not in LABELLED_SPLITS:
        raise UserError(f"unknown labelled split {split!r}; choose one of {', '.join(LABELLED_SPLITS)}")
    labelled = list_labelled(root)
    if split == "trainval":
        return labelled
    if split_dir is None:
        return default_split(labelled)[split]
    path = Path(split_dir) / f"{split}.txt"
    if not path.is_file():
        raise UserError(f"{path} is missing: a split folder needs train.txt and val.txt, one image name a line")
    names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    unknown = sorted(set(names) - set(labelled))
    if unknown:
        raise UserError(f"{path}: names not found in {root}/training: {', '.join(unknown[:5])}")
    return names


class RandomScaleCrop(v2.Transform):
    """``RandomResize`` (shorter side to a random length in scale_range x base_size) then a ``size`` x ``size``
    ``RandomCrop`` with padding, done the cheap way round: the crop window is chosen in the original image and
    only its part inside the image is resized, then padded. Resizing the whole KITTI image by up to 2x first
    cost 6.4 ms a sample against 3.1 ms this way (one core, one run), and on a GPU the loader was the
    bottleneck. Padding is 0 for images and 255 (ignore) for masks; masks are resized with nearest neighbour
    by ``v2.functional.resize``.
    """

    def __init__(self, size: int, base_size: int, scale_range: tuple[float, float]):
        super().__init__()
        self.size = size
        self.short_side_range = (int(scale_range[0] * base_size), int(scale_range[1] * base_size))

    def make_params(self, flat_inputs: list) -> dict:
        height, width = TF.get_size(next(x for x in flat_inputs if isinstance(x, tv_tensors.Image)))
        scale = int(torch.randint(*self.short_side_range, ())) / min(height, width)
        window = max(1, round(self.size / scale))  # the crop's extent in original pixels
        top = int(torch.randint(min(0, height - window), max(0, height - window) + 1, ()))
        left = int(torch.randint(min(0, width - window), max(0, width - window) + 1, ()))
        return {"top": top, "left": left, "window": window}

    def transform(self, inpt: torch.Tensor, params: dict) -> torch.Tensor:
        """Resize the part of the window inside the image, then pad it to ``size`` in output pixels."""
        top, left, window = params["top"], params["left"], params["window"]
        height, width = TF.get_size(inpt)
        y0, x0, y1, x1 = max(top, 0), max(left, 0), min(top + window, height), min(left + window, width)
        zoom = self.size / window
        pad_top, pad_left = round((y0 - top) * zoom), round((x0 - left) * zoom)
        out_h = min(max(1, round((y1 - y0) * zoom)), self.size - pad_top)
        out_w = min(max(1, round((x1 - x0) * zoom)), self.size - pad_left)
        out = TF.resize(TF.crop(inpt, y0, x0, y1 - y0, x1 - x0), [out_h, out_w])
        padding = [pad_left, pad_top, self.size - out_w - pad_left, self.size - out_h - pad_top]
        if any(padding):
            out = TF.pad(out, padding, fill=IGNORE_INDEX if isinstance(out, tv_tensors.Mask) else 0)
        return out


def train_augmentation(crop_size: int, base_size: int = 375, scale_range: tuple[float, float] = (0.5, 2.0)) -> v2.Compose:
    """Joint image/mask augmentation: random scale (shorter side scale_range x base_size) and crop with padding
    (image 0, label 255), horizontal flip, mild colour jitter (image only)."""
    return v2.Compose([
        RandomScaleCrop(crop_size, base_size, scale_range),
        v2.RandomHorizontalFlip(),
        v2.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2),
    ])


class KittiSemantics(Dataset):
    """Labelled KITTI images as ``(uint8 image (3, H, W), uint8 label (H, W))``, labels in ``label_set`` classes.

    ``transform`` (e.g. ``train_augmentation``) is applied jointly; an index may come as ``(index, seed)``
    from ``SeededTrainSampler`` to make the augmentation reproducible. ``cache=True`` decodes every file
    once, up front, in the constructing process: DataLoader workers then share the decoded arrays.
    """

    def __init__(self, root: str | Path, names: list[str], label_set: LabelSet | str = "train",
                 transform: v2.Transform | None = None, cache: bool = False):
        self.root = Path(root)
        self.names = list(names)
        self.label_set = get_label_set(label_set) if isinstance(label_set, str) else label_set
        self.transform = transform
        self._cache = None
        if cache:
            with ThreadPoolExecutor(4) as pool:  # cv2 releases the GIL while decoding
                self._cache = list(pool.map(self._load, range(len(self.names))))

    def __len__(self) -> int:
        return len(self.names)

    def _load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        name = self.names[index]
        image = read_image(self.root / "training" / "image_2" / f"{name}.png")
        label_path = self.root / "training" / "semantic" / f"{name}.png"
        label = read_label(label_path)
        if image.shape[:2] != label.shape:
            raise UserError(f"{label_path}: label size {label.shape} differs from its image's {image.shape[:2]}; "
                            "the pair must have the same height and width")
        return image, self.label_set.id_to_class[label]

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        index, seed = key if isinstance(key, tuple) else (key, None)
        image, label = self._cache[index] if self._cache is not None else self._load(index)
        image = torch.from_numpy(image).permute(2, 0, 1)
        label = torch.from_numpy(label)
        if self.transform is not None:
            with torch.random.fork_rng(devices=[]):
                if seed is not None:
                    torch.manual_seed(seed)
                image, label = self.transform(tv_tensors.Image(image), tv_tensors.Mask(label))
        return image.as_subclass(torch.Tensor).contiguous(), label.as_subclass(torch.Tensor).contiguous()


class ImageFolder(Dataset):
    """Unlabelled images (KITTI ``testing/image_2`` or any folder) as ``uint8 (3, H, W)`` RGB tensors."""

    def __init__(self, folder: str | Path):
        self.paths = list_png(Path(folder))
        self.names = [p.stem for p in self.paths]

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.from_numpy(read_image(self.paths[index])).permute(2, 0, 1).contiguous()


def normalize(images: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) uint8 RGB on any device -> float32, ImageNet-normalised, as the ResNet18 trunk expects."""
    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(1, 3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD, device=images.device).view(1, 3, 1, 1) * 255
    return (images.float() - mean) / std


def check_tree(root: Path) -> str:
    """Read every labelled pair under ``root`` (raising on the first problem) and summarise the tree."""
    names = list_labelled(root)
    dataset = KittiSemantics(root, names, "full")
    sizes = {tuple(dataset[i][1].shape) for i in range(len(dataset))}
    num_test = len(list_png(root / "testing" / "image_2")) if (root / "testing" / "image_2").is_dir() else 0
    return f"{root}: {len(names)} labelled pairs, {num_test} test images, sizes {sorted(sizes)}: OK"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--make-synthetic", type=Path, metavar="DIR", help="write a synthetic KITTI tree")
    parser.add_argument("--num", type=int, default=200, help="labelled synthetic images (default 200)")
    parser.add_argument("--num-test", type=int, default=0, help="unlabelled synthetic images (default 0)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--download", type=Path, metavar="ROOT", help="download and extract KITTI into ROOT")
    parser.add_argument("--check", type=Path, metavar="ROOT", help="read every file of a tree and report")
    args = parser.parse_args(argv)
    try:
        if args.make_synthetic:
            from synthetic_kitti import write_synthetic_kitti
            write_synthetic_kitti(args.make_synthetic, args.num, args.num_test, args.seed)
            print(f"wrote {args.num} labelled + {args.num_test} test SYNTHETIC scenes to {args.make_synthetic}")
        if args.download:
            from kitti_download import download_kitti
            print(f"KITTI semantics ready in {download_kitti(args.download)}")
        if args.check:
            print(check_tree(args.check))
        if not (args.make_synthetic or args.download or args.check):
            parser.print_help()
    except UserError as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    main()
