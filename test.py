"""Evaluate a checkpoint: per-class IoU and mIoU over a split, predictions as label-id PNGs, pictures.

    python test.py --checkpoint runs/x/best.pt                     # the run's validation split
    python test.py --checkpoint runs/x/best.pt --split test        # KITTI benchmark submission PNGs
    python test.py --checkpoint runs/x/best.pt --images my_photos/  # any folder of PNG/JPEG images
    python test.py --checkpoint runs/x/best.pt --images drive.mp4   # a video: an overlay video and frames/s

Files written to --out (default: a folder beside the checkpoint): metrics.json, metrics.csv, confusion.png,
pred_labelIds/ (Cityscapes label ids at each image's size: the official evaluation and KITTI's submission
format read these), pred_color/ and overlay/ (for --num-visuals images, or all with --save-all).
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import shutil
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import cv2
import numpy as np
import torch

from data_preprocessing import ImageList, SegmentationDataset
from labels import LabelSet, colorize
from segmentation import UserError, error_line, require, runtime
from segmentation.checkpoint import load_model
from segmentation.engine import ProgressLine, class_map, evaluate, predict
from segmentation.layouts import get_layout, list_images, resolve_split
from segmentation.metrics import evaluation_report
from segmentation.records import check_writable, overlay, plot_confusion
from segmentation.runtime import pick_device

VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, required=True, help="best.pt or last.pt written by main.py")
    p.add_argument("--data-root", type=Path, help="dataset folder (default: the one the run trained on)")
    p.add_argument("--split", default="val", choices=("val", "train", "trainval", "test"),
                   help="test: a labelled split where the split folder has test.txt (CamVid), else the unlabelled test "
                   "images, for a benchmark submission (default %(default)s)")
    p.add_argument("--split-dir", type=Path, help="folder with train.txt/val.txt (default: the run's own; for "
                   "--split test, a test.txt beside the run's split or in the data root's splits/)")
    p.add_argument("--images", type=Path, help="predict a folder of PNG/JPEG images, or a video, instead of a split")
    p.add_argument("--out", type=Path, help="output folder (default: beside the checkpoint)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default %(default)s)")
    p.add_argument("--flip", action="store_true", help="test-time augmentation: average with the mirrored image")
    p.add_argument("--scales", type=float, nargs="+", default=[1.0], help="test-time scales, e.g. 0.75 1 1.25")
    p.add_argument("--num-visuals", type=int, default=8, help="images to save in pred_color/ and overlay/")
    p.add_argument("--save-all", action="store_true", help="save pred_color/ and overlay/ for every image")
    p.add_argument("--workers", type=int, default=2)
    return p.parse_args(argv)


MAX_SCALE = 4.0  # test-time scales beyond this are typing slips (75 for 0.75) that would allocate gigabytes


def validate_args(args: argparse.Namespace) -> None:
    """Refuse meaningless values up front, each with one line naming the flag and the fix."""
    require(args.workers >= 0, "--workers", args.workers, "0 or more")
    require(args.num_visuals >= 0, "--num-visuals", args.num_visuals, "0 or more")
    require(all(0 < scale <= MAX_SCALE for scale in args.scales), "--scales", args.scales,
            f"factors in (0, {MAX_SCALE:g}], e.g. 0.75 1 1.25 (fractions of the image size, not percentages)")


class PredictionWriter:
    """Saves label-id PNGs for every image, colour and overlay pictures for the first few."""

    def __init__(self, out: Path, label_set: LabelSet, num_visuals: int):
        self.out, self.label_set, self.num_visuals = out, label_set, num_visuals
        for sub in ("pred_labelIds", "pred_color", "overlay"):
            (out / sub).mkdir(parents=True, exist_ok=True)

    def __call__(self, index: int, name: str, classes: np.ndarray, image: torch.Tensor,
                 truth: np.ndarray | None = None) -> None:
        """Files are named by the image name's last part: a Cityscapes name 'city/city_seq_frame' gives
        'city_seq_frame.png', the pattern by which the official script finds predictions."""
        name = Path(name).name
        cv2.imwrite(str(self.out / "pred_labelIds" / f"{name}.png"), self.label_set.class_to_id[classes])
        if index >= self.num_visuals:
            return
        color = colorize(classes, self.label_set)
        cv2.imwrite(str(self.out / "pred_color" / f"{name}.png"), color[..., ::-1])
        panels = [image.permute(1, 2, 0).numpy(), color]
        if truth is not None:
            panels.append(colorize(truth, self.label_set))
        present = np.unique(np.concatenate([p.ravel() for p in (classes, truth) if p is not None]))
        panels.append(legend(self.label_set, present[present < self.label_set.num_classes], color.shape[1]))
        cv2.imwrite(str(self.out / "overlay" / f"{name}.png"), np.vstack(panels)[..., ::-1])


def legend(label_set: LabelSet, classes: np.ndarray, width: int, row: int = 22) -> np.ndarray:
    """(H, width, 3) RGB strip: a colour swatch and the name of each of ``classes``, left to right in rows."""
    cells, column = [], 0
    for index in classes:
        name = label_set.class_names[index]
        cell = 26 + cv2.getTextSize(name, cv2.FONT_HERSHEY_SIMPLEX, 0.45, 1)[0][0] + 12
        if column + cell > width and column:
            column = 0
        cells.append((index, name, column, len(cells) and column == 0))
        column += cell
    rows = 1 + sum(new_row for *_, new_row in cells)
    strip, y = np.full((rows * row + 4, width, 3), 255, np.uint8), -row
    for index, name, x, _ in cells:
        y += row if x == 0 else 0
        cv2.rectangle(strip, (x + 4, y + 6), (x + 20, y + 20), label_set.colors[index].tolist(), -1)
        cv2.putText(strip, name, (x + 26, y + 18), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
    return strip


def format_table(report: dict) -> str:
    def pct(value: float) -> str:
        return "n/a" if math.isnan(value) else f"{100 * value:.2f}"
    width = max(len(n) for n in report["class_names"]) + 2
    lines = [f"{'class':<{width}}{'IoU':>8}{'acc':>8}{'pixels':>12}"]
    for name, iou, acc, pixels in zip(report["class_names"], report["iou"], report["acc"], report["pixels"]):
        lines.append(f"{name:<{width}}{pct(iou):>8}{pct(acc):>8}{pixels:>12}")
    lines.append(f"mIoU {pct(report['mIoU'])}  pixel acc {pct(report['pixel_acc'])}  mean acc {pct(report['mean_acc'])}"
                 f"  fwIoU {pct(report['fwIoU'])}")
    if report["category_iou"]:  # the Cityscapes label sets: their benchmark is the 19 train classes
        lines[-1] += f"  (19-class benchmark mIoU {pct(report['benchmark_mIoU'])})"
        lines.append("category IoU: " + "  ".join(f"{k} {pct(v)}" for k, v in report["category_iou"].items()))
    return "\n".join(lines)


def write_report(report: dict, out: Path, extra: dict) -> None:
    def number(value: float) -> float | None:
        return None if math.isnan(value) else float(value)
    summary = {key: number(report[key]) for key in ("mIoU", "pixel_acc", "mean_acc", "fwIoU", "benchmark_mIoU",
                                                    "benchmark_pixel_acc")}
    summary["class_iou"] = {n: number(v) for n, v in zip(report["class_names"], report["iou"])}
    summary["category_iou"] = {n: number(v) for n, v in report["category_iou"].items()}
    (out / "metrics.json").write_text(json.dumps({**summary, **extra}, indent=2))
    with open(out / "metrics.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["class", "iou", "acc", "pixels"])
        for row in zip(report["class_names"], report["iou"], report["acc"], report["pixels"]):
            writer.writerow([row[0], *(("" if math.isnan(v) else f"{v:.6f}") for v in row[1:3]), row[3]])


def evaluate_split(args, model, state, dataset: SegmentationDataset, device, amp_dtype, writer) -> dict:
    names, label_set, dataset_name = dataset.names, dataset.label_set, state.get("config", {}).get("dataset", "kitti")
    loader = runtime.StopSafeLoader(dataset, 1, num_workers=args.workers, pin_memory=device.type == "cuda")

    def save(index: int, prediction: torch.Tensor) -> None:
        image, truth = dataset[index] if index < writer.num_visuals else (None, None)
        writer(index, names[index], prediction[0].to(torch.uint8).cpu().numpy(), image,
               None if truth is None else truth.numpy())

    # the run's own validation: its precision (see run), its loss weights
    weights = state.get("class_weights")
    start = time.perf_counter()
    confusion, loss = evaluate(model, loader, label_set.num_classes, device, amp_dtype, on_prediction=save,
                               class_weights=None if weights is None else weights.to(device),
                               flip=args.flip, scales=tuple(args.scales))
    seconds = time.perf_counter() - start
    report = evaluation_report(confusion.matrix, label_set)
    print(format_table(report))
    precision = runtime.precision_name(amp_dtype)
    weighted = " weighted by the run's class weights" if weights is not None else ""
    print(f"precision: {precision} (the run's --amp setting on {device}); loss: cross-entropy{weighted} {loss:.4f}")
    extra = {"num_images": len(dataset), "checkpoint": str(args.checkpoint), "dataset": dataset_name,
             "split": args.split, "label_set": label_set.name, "arch": state["arch"], "loss": loss,
             "precision": precision, "images_per_second": len(dataset) / seconds}
    write_report(report, writer.out, extra)
    plot_confusion(confusion.matrix, label_set.class_names, writer.out / "confusion.png")
    return extra


@torch.no_grad()
def predict_images(args, model, dataset: ImageList, device, amp_dtype, writer) -> dict:
    """Label-id PNGs (and pictures) for unlabelled images: a test split or a folder."""
    loader = runtime.StopSafeLoader(dataset, 1, num_workers=args.workers)
    line, start = ProgressLine(len(dataset), "predict"), time.perf_counter()
    for index, image in enumerate(loader):
        prediction = class_map(predict(model, image, device, amp_dtype, flip=args.flip, scales=tuple(args.scales)))
        writer(index, dataset.names[index], prediction[0].to(torch.uint8).cpu().numpy(), image[0])
        line.update()
    line.close()
    return {"num_images": len(dataset), "images_per_second": len(dataset) / (time.perf_counter() - start),
            "precision": runtime.precision_name(amp_dtype)}


class VideoFrames:
    """The frames of a video file as ``uint8 (3, H, W)`` RGB tensors, its frame rate and its (width, height)."""

    def __init__(self, path: Path):
        self.path = path
        capture = cv2.VideoCapture(str(path))
        readable, first = capture.read() if capture.isOpened() else (False, None)
        self.fps = capture.get(cv2.CAP_PROP_FPS) or 25.0
        capture.release()
        if not readable:
            raise UserError(f"{path}: cannot be decoded as a video; check the file, or convert it to MP4 (H.264)")
        self.size = first.shape[1], first.shape[0]

    def __iter__(self) -> Iterator[torch.Tensor]:
        capture = cv2.VideoCapture(str(self.path))
        try:
            while True:
                ok, frame = capture.read()
                if not ok:
                    return
                yield torch.from_numpy(np.ascontiguousarray(frame[..., ::-1])).permute(2, 0, 1)
        finally:
            capture.release()


@torch.no_grad()
def predict_video(frames: VideoFrames, path: Path, args, model, label_set: LabelSet, device, amp_dtype) -> dict:
    """An overlay video (the frame blended with its colour-coded prediction) at the input's frame rate, written
    with OpenCV's mp4v codec, which every OpenCV build has."""
    video = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), frames.fps, frames.size)
    if not video.isOpened():
        raise UserError(f"{path}: cannot be written as an MP4 video; pass another --out")
    count, start = 0, time.perf_counter()
    try:
        for frame in frames:
            prediction = class_map(predict(model, frame[None], device, amp_dtype, flip=args.flip,
                                           scales=tuple(args.scales)))
            blended = overlay(frame, prediction[0].to(torch.uint8), label_set)
            video.write(np.ascontiguousarray(blended[..., ::-1]))  # OpenCV writes BGR
            count += 1
    finally:
        video.release()
    return {"num_images": count, "images_per_second": count / (time.perf_counter() - start),
            "precision": runtime.precision_name(amp_dtype), "video": str(args.out / path.name)}


OUTPUTS = ("pred_labelIds", "pred_color", "overlay", "confusion.png", "metrics.csv", "metrics.json")  # metrics last


@contextmanager
def staged(out: Path) -> Iterator[Path]:
    """A fresh folder beside ``out`` for this run's outputs, moved into ``out`` once the run has finished: test.py's
    outputs already there (a previous run's) are removed first, so ``out`` never mixes the figures of two runs, and
    metrics.json comes last, so its presence means the rest is complete. An interrupted or failed run leaves ``out``
    as it was. Other files in ``out`` are left alone."""
    staging = out.parent / f".{out.name}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    out.mkdir(exist_ok=True)
    previous = [p for p in out.iterdir() if p.name in OUTPUTS or p.name.endswith("_overlay.mp4")]
    for path in previous:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    made = {p.name: p for p in staging.iterdir()}
    for name in sorted(made, key=lambda name: OUTPUTS.index(name) if name in OUTPUTS else -1):
        made[name].rename(out / name)
    staging.rmdir()
    if previous:
        print(f"replaced the outputs of the previous run in {out}")


def run(args: argparse.Namespace) -> dict:
    """Evaluate a labelled split, or predict a test split, a folder or a video; returns a summary."""
    validate_args(args)
    device = pick_device(args.device)
    model, state, label_set = load_model(args.checkpoint, device)
    config = state.get("config", {})  # a weights-only checkpoint has none: KITTI unless --data-root says otherwise
    dataset_name = config.get("dataset", "kitti")
    root = args.data_root or Path(config.get("data_root", "data/data_semantics"))
    args.out = args.out or args.checkpoint.parent / f"test_{args.images.stem if args.images else args.split}"
    if (args.out / "last.pt").is_file() or (args.out / "best.pt").is_file():
        raise UserError(f"--out {args.out} is a training run's folder, whose metrics.csv this evaluation would "
                        f"replace; give another folder, e.g. {args.out / 'test'}")
    check_writable(args.out)
    # every input at the run's precision (autocast on CUDA unless it trained with --no-amp), as its validation was
    amp_dtype = runtime.amp_dtype_for(device, config.get("amp", True))
    if args.images is not None and args.images.is_file() and args.images.suffix.lower() in VIDEO_SUFFIXES:
        frames = VideoFrames(args.images)
        with staged(args.out) as staging:
            return predict_video(frames, staging / f"{args.images.stem}_overlay.mp4", args, model, label_set, device,
                                 amp_dtype)
    names = None if args.images is not None else resolve_split(  # the run's own split files first (layouts.py)
        dataset_name, root, (args.split,), args.split_dir, (args.checkpoint.parent, config.get("split_dir"))
    ).names[args.split]
    if names is None:  # a folder, or a test split without public labels (KITTI's, Cityscapes'): predictions only
        items = list_images(args.images) if args.images is not None else get_layout(dataset_name).test_images(root)
        with staged(args.out) as staging:
            return predict_images(args, model, ImageList(items), device, amp_dtype,
                                  prediction_writer(args, staging, label_set))
    dataset = SegmentationDataset(dataset_name, root, names, label_set)
    with staged(args.out) as staging:
        return evaluate_split(args, model, state, dataset, device, amp_dtype,
                              prediction_writer(args, staging, label_set))


def prediction_writer(args: argparse.Namespace, out: Path, label_set: LabelSet) -> PredictionWriter:
    """Made once the input is known to be readable, so that a refused evaluation writes nothing."""
    return PredictionWriter(out, label_set, sys.maxsize if args.save_all else args.num_visuals)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        with runtime.interrupts_end_in_one_line("the output folder keeps what it held before: this run's outputs "
                                                "are moved in only when it finishes"):
            result = run(args)
        unit = "frames" if "video" in result else "images"
        print(f"{result['num_images']} {unit} at {result['images_per_second']:.1f} {unit}/s ({result['precision']}); "
              f"outputs in {args.out}")
    except (UserError, OSError) as error:
        sys.exit(error_line(error))


if __name__ == "__main__":
    main()
