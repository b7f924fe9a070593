"""Draw docs/images/kitti_pipeline.png from a real KITTI frame in tests/data: the image, its colorized ground
truth, and one augmented training crop of the pair (so a reader sees that image and label stay aligned).

    python scripts/readme_figure.py
"""
import sys
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from data_preprocessing import KittiSemantics  # noqa: E402
from labels import colorize, get_label_set  # noqa: E402
from segmentation.augmentation import TrainAugmentation  # noqa: E402
from segmentation.layouts import list_labelled  # noqa: E402

SAMPLE = ROOT / "tests" / "data" / "kitti-sample"


def main() -> None:
    label_set = get_label_set("train")
    names = list_labelled(SAMPLE)
    image, label = KittiSemantics(SAMPLE, names[:1], label_set)[0]
    crop_image, crop_label = KittiSemantics(SAMPLE, names[:1], label_set, TrainAugmentation(320))[(0, 7)]
    top = np.vstack([image.permute(1, 2, 0).numpy(), colorize(label.numpy(), label_set)])
    crop = np.hstack([crop_image.permute(1, 2, 0).numpy(), colorize(crop_label.numpy(), label_set)])
    canvas = np.full((top.shape[0] + crop.shape[0] + 10, top.shape[1], 3), 255, np.uint8)
    canvas[: top.shape[0]] = top
    canvas[top.shape[0] + 10:, : crop.shape[1]] = crop
    out = ROOT / "docs" / "images" / "kitti_pipeline.png"
    cv2.imwrite(str(out), canvas[..., ::-1])
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
