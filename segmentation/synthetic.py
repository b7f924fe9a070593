"""Procedurally drawn street scenes written in exactly the KITTI semantics layout, or Cityscapes' layout.

SYNTHETIC DATA: these are not KITTI or Cityscapes images. They let tests, the demo and new users run the whole pipeline
without the real archive. Each scene has sky, buildings, vegetation, terrain, road, sidewalk, cars, poles,
traffic signs, persons, a fence and some unlabelled clutter, drawn with texture and noise, with the same
Cityscapes label ids and image sizes as KITTI. A scene is a pure function of (seed, index).
"""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from labels import ID_TO_LABEL, LABELS, colorize
from segmentation import UserError

KITTI_SIZES = ((375, 1242), (370, 1224), (374, 1238), (376, 1241))
MIN_HEIGHT = 60  # below it the street under the horizon (at up to half the height) has no room for a car
CITYSCAPES_CITIES = {"train": ("aachen", "bochum"), "val": ("frankfurt",), "test": ("berlin",)}  # disjoint, as real
CITYSCAPES_SIZE = (512, 1024)  # half the real 1024 x 2048, so that a tree writes about as fast as a KITTI one
DEMO_SIZE = (188, 620)  # main.py --demo: half KITTI's frame, 4x fewer pixels to learn from and to validate on
_ID = {label.name: label.id for label in LABELS if label.id >= 0}


class _Canvas:
    """An RGB image and its label-id map, painted together so that they can never disagree."""

    def __init__(self, height: int, width: int, rng: np.random.Generator):
        self.rng = rng
        self.image = np.zeros((height, width, 3), np.float32)
        self.label = np.zeros((height, width), np.uint8)

    def _color(self, name: str, spread: float) -> tuple[float, ...]:
        base = np.array(ID_TO_LABEL[_ID[name]].color, np.float32)
        return tuple(np.clip(base + self.rng.normal(0, spread, 3), 0, 255).tolist())

    def polygon(self, name: str, points: np.ndarray, spread: float = 12.0) -> None:
        pts = [np.round(points).astype(np.int32)]
        cv2.fillPoly(self.image, pts, self._color(name, spread))
        cv2.fillPoly(self.label, pts, _ID[name])

    def rect(self, name: str, x0: float, y0: float, x1: float, y1: float, spread: float = 12.0) -> None:
        self.polygon(name, np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]]), spread)

    def ellipse(self, name: str, cx: float, cy: float, ax: float, ay: float, spread: float = 12.0) -> None:
        center, axes = (int(cx), int(cy)), (max(int(ax), 1), max(int(ay), 1))
        cv2.ellipse(self.image, center, axes, 0, 0, 360, self._color(name, spread), -1)
        cv2.ellipse(self.label, center, axes, 0, 0, 360, _ID[name], -1)

    def finish(self) -> np.ndarray:
        """Add lighting gradient, grain and a slight blur; return uint8 RGB."""
        h, w = self.label.shape
        light = 0.85 + 0.3 * np.linspace(0, 1, w, dtype=np.float32)[None, :, None] * self.rng.uniform(0.3, 1)
        grain = self.rng.normal(0, 9, (h, w, 1)).astype(np.float32)
        image = cv2.GaussianBlur(self.image * light + grain, (3, 3), 0)
        return np.clip(image, 0, 255).astype(np.uint8)


def _draw_background(c: _Canvas, h: int, w: int, horizon: int) -> None:
    rng = c.rng
    c.rect("sky", 0, 0, w, horizon + 5, spread=15)
    x = 0.0
    while x < w:  # a row of buildings with windows
        bw = rng.uniform(0.08, 0.25) * w
        top = rng.uniform(0.05, 0.8) * horizon
        c.rect("building", x, top, x + bw, horizon + 10, spread=25)
        for wy in np.arange(top + 10, horizon - 10, rng.uniform(18, 30)):
            for wx in np.arange(x + 8, x + bw - 12, rng.uniform(20, 35)):
                c.rect("building", wx, wy, wx + 8, wy + 10, spread=40)
        x += bw + rng.uniform(0, 0.1) * w
    for _ in range(rng.integers(2, 6)):
        c.ellipse("vegetation", rng.uniform(0, w), horizon - rng.uniform(0, 60),
                  rng.uniform(40, 140), rng.uniform(30, 80), spread=20)
    c.rect("terrain", 0, horizon, w, h, spread=15)


def _draw_street(c: _Canvas, h: int, w: int, horizon: int) -> None:
    rng = c.rng
    vx = rng.uniform(0.35, 0.65) * w
    left, right = rng.uniform(-0.3, 0.1) * w, rng.uniform(0.9, 1.3) * w
    c.polygon("sidewalk", np.array([[vx - 40, horizon], [vx + 40, horizon], [right + 0.25 * w, h],
                                    [left - 0.25 * w, h]]))
    c.polygon("road", np.array([[vx - 15, horizon], [vx + 15, horizon], [right, h], [left, h]]), spread=8)
    if rng.random() < 0.7:
        c.rect("fence", 0, horizon - 25, rng.uniform(0.1, 0.3) * w, horizon + 15)
    for _ in range(rng.integers(1, 5)):  # cars: body, windows, wheels
        y = rng.uniform(horizon + 10, h - 20)
        scale = (y - horizon) / (h - horizon) + 0.15
        cw, ch = 260 * scale, 110 * scale
        cx = rng.uniform(left + 0.3 * (vx - left), right - 0.3 * (right - vx)) - cw / 2
        c.rect("car", cx, y - ch, cx + cw, y, spread=60)
        c.rect("car", cx + 0.15 * cw, y - ch * 0.95, cx + 0.85 * cw, y - ch * 0.6, spread=20)
        for wheel in (0.2, 0.8):
            c.ellipse("car", cx + wheel * cw, y, 0.1 * cw, 0.12 * ch, spread=5)
    for _ in range(rng.integers(1, 4)):  # poles carrying a sign
        px = rng.uniform(0, w)
        c.rect("pole", px, rng.uniform(0.1, 0.5) * horizon, px + rng.uniform(4, 9), rng.uniform(horizon + 20, h))
        c.ellipse("traffic sign", px + 3, rng.uniform(0.3, 0.7) * horizon, 14, 14, spread=20)
    for _ in range(rng.integers(0, 4)):  # persons on the sidewalk
        px, py = rng.uniform(0, w), rng.uniform(horizon + 20, h - 5)
        ph = 90 * ((py - horizon) / (h - horizon) + 0.2)
        c.ellipse("person", px, py - ph * 0.45, ph * 0.13, ph * 0.4, spread=40)
        c.ellipse("person", px, py - ph * 0.92, ph * 0.09, ph * 0.09, spread=20)
    c.rect("static", rng.uniform(0, w), h - 25, rng.uniform(0, w), h, spread=30)


def make_scene(seed: int, index: int, size: tuple[int, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic scene: (H, W, 3) uint8 RGB image and (H, W) uint8 Cityscapes label ids."""
    rng = np.random.default_rng([seed, index])
    h, w = size or KITTI_SIZES[rng.integers(len(KITTI_SIZES))]
    if h < MIN_HEIGHT:
        raise UserError(f"synthetic scenes need at least {MIN_HEIGHT} rows, not {h}: the street is drawn in pixels")
    canvas = _Canvas(h, w, rng)
    horizon = int(rng.uniform(0.35, 0.5) * h)
    _draw_background(canvas, h, w, horizon)
    _draw_street(canvas, h, w, horizon)
    return canvas.finish(), canvas.label


def refuse_non_empty(root: Path) -> Path:
    """Synthetic scenes never land among a user's files (or a real dataset's, whose names they share)."""
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise UserError(f"{root} already holds files; write synthetic scenes into a new or empty folder")
    return root


def write_synthetic_kitti(root: str | Path, num_train: int, num_test: int = 0, seed: int = 0,
                          size: tuple[int, int] | None = None) -> Path:
    """Write ``num_train`` labelled and ``num_test`` unlabelled scenes in the KITTI layout under ``root``, which
    must be new or empty."""
    root = refuse_non_empty(Path(root))
    dirs = {d: root / d for d in ("training/image_2", "training/semantic", "training/semantic_rgb", "testing/image_2")}
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)
    for i in range(num_train):
        image, label = make_scene(seed, i, size)
        name = f"{i:06d}_10.png"
        cv2.imwrite(str(dirs["training/image_2"] / name), image[..., ::-1])
        cv2.imwrite(str(dirs["training/semantic"] / name), label)
        cv2.imwrite(str(dirs["training/semantic_rgb"] / name), colorize(label)[..., ::-1])
    for i in range(num_test):
        image, _ = make_scene(seed + 1, i, size)
        cv2.imwrite(str(dirs["testing/image_2"] / f"{i:06d}_10.png"), image[..., ::-1])
    return root


def write_synthetic_cityscapes(root: str | Path, num_train: int, num_val: int = 4, num_test: int = 0, seed: int = 0,
                               size: tuple[int, int] | None = None) -> Path:
    """Write scenes in the official Cityscapes layout under ``root``::

        leftImg8bit/<split>/<city>/<city>_<seq>_000019_leftImg8bit.png
        gtFine/<split>/<city>/<city>_<seq>_000019_gtFine_labelIds.png   (train and val)
        gtFine/<split>/<city>/<city>_<seq>_000019_gtFine_color.png      (a picture: readers must ignore it)
        gtFine/<split>/<city>/<city>_<seq>_000019_gtFine_instanceIds.png  (16-bit; every region a crowd region,
                                                                          as the scenes draw no instances)

    The instanceIds files are there because the official evaluation script reads them (for iIoU). ``size``
    defaults to ``CITYSCAPES_SIZE``. Every scene of a tree is distinct: scene ``index`` counts on across train, val
    and test. ``root`` must be new or empty.
    """
    root = refuse_non_empty(Path(root))
    first = 0
    for split, count in (("train", num_train), ("val", num_val), ("test", num_test)):
        cities = CITYSCAPES_CITIES[split]
        for i in range(count):
            city = cities[i % len(cities)]
            stem = f"{city}_{i // len(cities):06d}_000019"
            image, label = make_scene(seed, first + i, size or CITYSCAPES_SIZE)
            image_dir, label_dir = root / "leftImg8bit" / split / city, root / "gtFine" / split / city
            image_dir.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(image_dir / f"{stem}_leftImg8bit.png"), image[..., ::-1])
            if split != "test":
                label_dir.mkdir(parents=True, exist_ok=True)
                cv2.imwrite(str(label_dir / f"{stem}_gtFine_labelIds.png"), label)
                cv2.imwrite(str(label_dir / f"{stem}_gtFine_color.png"), colorize(label)[..., ::-1])
                cv2.imwrite(str(label_dir / f"{stem}_gtFine_instanceIds.png"), label.astype(np.uint16))
        first += count
    return root
