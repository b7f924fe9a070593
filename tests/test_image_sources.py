"""test.py --images on a folder of PNG and JPEG files, and on a video."""
import cv2
import numpy as np
import torch
from conftest import write_video

import test as evaluation
from segmentation.layouts import list_images
from test import VideoFrames


def test_a_folder_of_png_and_jpeg_files_is_listed_by_name_and_other_files_are_skipped(tmp_path):
    image = np.zeros((8, 8, 3), np.uint8)
    for name in ("b.png", "a.JPG", "c.jpeg"):
        cv2.imwrite(str(tmp_path / name), image)
    (tmp_path / "notes.txt").write_text("not an image")
    assert [name for name, _ in list_images(tmp_path)] == ["a", "b", "c"]


def test_video_frames_come_back_in_rgb_order_at_the_file_frame_rate(tmp_path):
    frame = np.zeros((64, 96, 3), np.uint8)
    frame[..., 2] = 200  # red, as OpenCV stores it
    write_video(tmp_path / "red.mp4", [frame] * 3, fps=12.0)
    video = VideoFrames(tmp_path / "red.mp4")
    frames = list(video)
    assert len(frames) == 3 and video.fps == 12.0 and frames[0].shape == (3, 64, 96)
    red, green, blue = frames[0].float().mean(dim=(1, 2)).tolist()
    assert red > 150 and green < 50 and blue < 50  # lossy codec: approximately (200, 0, 0)


def test_images_option_on_a_video_writes_an_overlay_video_of_every_frame(trained_run, synthetic_root, tmp_path):
    frames = [cv2.imread(str(p)) for p in sorted((synthetic_root / "testing" / "image_2").glob("*.png"))]
    write_video(tmp_path / "drive.mp4", frames * 2)
    evaluation.main(["--checkpoint", str(trained_run / "last.pt"), "--images", str(tmp_path / "drive.mp4"),
                     "--out", str(tmp_path / "out"), "--device", "cpu"])
    overlay = cv2.VideoCapture(str(tmp_path / "out" / "drive_overlay.mp4"))
    assert int(overlay.get(cv2.CAP_PROP_FRAME_COUNT)) == 4
    ok, first = overlay.read()
    assert ok and first.shape == frames[0].shape


def test_images_option_on_a_jpeg_folder_predicts_every_image(trained_run, synthetic_root, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for path in (synthetic_root / "testing" / "image_2").glob("*.png"):
        cv2.imwrite(str(folder / f"{path.stem}.jpg"), cv2.imread(str(path)))
    evaluation.main(["--checkpoint", str(trained_run / "last.pt"), "--images", str(folder), "--out",
                     str(tmp_path / "out"), "--device", "cpu", "--workers", "0"])
    predictions = sorted((tmp_path / "out" / "pred_labelIds").glob("*.png"))
    assert [p.stem for p in predictions] == ["000000_10", "000001_10"]
    assert cv2.imread(str(predictions[0]), cv2.IMREAD_UNCHANGED).shape == (96, 320)
    assert torch.from_numpy(cv2.imread(str(predictions[0]), cv2.IMREAD_UNCHANGED)).max() <= 33
