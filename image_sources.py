"""Images to predict that are not a labelled split: any folder of PNG/JPEG files, or the frames of a video.

Both give ``uint8 (3, H, W)`` RGB tensors, like the datasets; OpenCV decodes to BGR, which is reversed once
(in ``data_preprocessing.read_image`` for files, in ``VideoFrames`` for video).
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import cv2
import numpy as np
import torch

from errors import UserError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v")


def list_images(folder: Path) -> list[tuple[str, Path]]:
    """``(stem, path)`` of every PNG or JPEG directly in ``folder``, sorted by name."""
    if not folder.is_dir():
        raise UserError(f"{folder} is not a folder of images or a video file ({', '.join(VIDEO_SUFFIXES)}); "
                        "pass --images with a folder of PNG/JPEG files or a video")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise UserError(f"{folder} holds no PNG or JPEG files; pass --images with a folder of images or a video")
    stems = [p.stem for p in files]
    clashing = sorted({p.name for p in files if stems.count(p.stem) > 1})
    if clashing:  # their predictions would be written to the same <stem>.png
        raise UserError(f"{folder}: {', '.join(clashing[:4])} share a name; rename or move one of each")
    return [(p.stem, p) for p in files]


def is_video(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in VIDEO_SUFFIXES


class VideoFrames:
    """The frames of a video file as ``uint8 (3, H, W)`` RGB tensors, and its frame rate."""

    def __init__(self, path: Path):
        self.path = path
        capture = cv2.VideoCapture(str(path))
        readable = capture.isOpened() and capture.read()[0]
        self.fps = capture.get(cv2.CAP_PROP_FPS) or 25.0
        capture.release()
        if not readable:
            raise UserError(f"{path}: cannot be decoded as a video; check the file, or convert it to MP4 (H.264)")

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


class VideoWriter:
    """Writes RGB frames to an MP4 file (OpenCV's mp4v codec, which every OpenCV build has)."""

    def __init__(self, path: Path, fps: float):
        self.path, self.fps, self.writer = path, fps, None

    def write(self, rgb: np.ndarray) -> None:
        if self.writer is None:
            height, width = rgb.shape[:2]
            self.writer = cv2.VideoWriter(str(self.path), cv2.VideoWriter_fourcc(*"mp4v"), self.fps, (width, height))
            if not self.writer.isOpened():
                raise UserError(f"{self.path}: cannot be written as an MP4 video; pass another --out")
        self.writer.write(np.ascontiguousarray(rgb[..., ::-1]))

    def close(self) -> None:
        if self.writer is not None:
            self.writer.release()
