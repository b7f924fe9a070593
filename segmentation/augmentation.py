"""Joint image/label augmentation for training: random scale, crop with padding, flip, colour jitter.

Each dataset scales relative to its own frame (its layout's ``base_size`` and ``crop_size``, layouts.py). Labels
stay aligned with their image: the image is resized bilinearly with centred pixels and the label with
``NEAREST_EXACT``, which samples the same centres, and crop padding is 0 in the image and 255 (ignore) in the label.
"""
from __future__ import annotations

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from labels import IGNORE_INDEX


class RandomScaleCrop(v2.Transform):
    """``RandomResize`` (shorter side to a random length in scale_range x base_size, both ends included)
    then an (H, W) ``RandomCrop`` with padding, done the cheap way round: the crop window is chosen in the
    original image and only its part inside the image is resized, then padded: up to 4x fewer pixels are
    resized than by scaling the whole image first (timed in docs/results.md). ``base_size=None`` scales each
    image's own shorter side. Masks are resized by ``NEAREST_EXACT`` (module docstring) because plain ``NEAREST``
    floors ``x * in / out`` and lags the image by half an output pixel (up to a whole one: see the test). It is a
    transforms-v2 ``Transform``; ``TrainAugmentation`` calls its ``draw`` and ``crop`` directly.
    """

    def __init__(self, size: int | tuple[int, int], base_size: int | None, scale_range: tuple[float, float]):
        super().__init__()
        self.size = (size, size) if isinstance(size, int) else tuple(size)
        self.base_size, self.scale_range = base_size, scale_range

    def draw(self, height: int, width: int, generator: torch.Generator | None = None, zoom: float = 1.0) -> dict:
        """The window in original pixels (and the shorter side it scales to) for an image of this size. ``zoom``
        (a resolution stage's scale, e.g. 0.5) multiplies the base and crop sizes: the sample is the one the
        image resized by ``zoom`` would give at the zoomed sizes, made without resizing the whole image."""
        base = (self.base_size or min(height, width)) * zoom
        size = self.size if zoom == 1 else tuple(max(1, round(s * zoom)) for s in self.size)
        low, high = int(self.scale_range[0] * base), int(self.scale_range[1] * base)
        short_side = int(torch.randint(low, high + 1, (), generator=generator))  # randint excludes its upper bound
        scale = short_side / min(height, width)
        window_h, window_w = (max(1, round(s / scale)) for s in size)  # the crop's extent in original pixels
        top = int(torch.randint(min(0, height - window_h), max(0, height - window_h) + 1, (), generator=generator))
        left = int(torch.randint(min(0, width - window_w), max(0, width - window_w) + 1, (), generator=generator))
        return {"top": top, "left": left, "height": window_h, "width": window_w, "short_side": short_side, "size": size}

    def crop(self, inpt: torch.Tensor, params: dict, is_mask: bool) -> torch.Tensor:
        """Resize the part of the window inside the (C, H, W) image or (H, W) mask, then pad it to ``size``."""
        top, left, window_h, window_w = params["top"], params["left"], params["height"], params["width"]
        height, width = inpt.shape[-2:]
        y0, x0, y1, x1 = max(top, 0), max(left, 0), min(top + window_h, height), min(left + window_w, width)
        size_h, size_w = params.get("size", self.size)
        zoom_y, zoom_x = size_h / window_h, size_w / window_w
        pad_top, pad_left = round((y0 - top) * zoom_y), round((x0 - left) * zoom_x)
        out_h = min(max(1, round((y1 - y0) * zoom_y)), size_h - pad_top)
        out_w = min(max(1, round((x1 - x0) * zoom_x)), size_w - pad_left)
        window = inpt[..., y0:y1, x0:x1]
        # a mask too goes through resize_image, as a one-channel image: older torchvision's resize_mask used NEAREST
        mode = InterpolationMode.NEAREST_EXACT if is_mask else InterpolationMode.BILINEAR
        out = TF.resize_image(window[None] if is_mask else window, [out_h, out_w], mode)
        padding = [pad_left, pad_top, size_w - out_w - pad_left, size_h - out_h - pad_top]
        if any(padding):
            out = TF.pad_image(out, padding, fill=IGNORE_INDEX if is_mask else 0)
        return out[0] if is_mask else out

    def make_params(self, flat_inputs: list) -> dict:
        height, width = TF.get_size(next(x for x in flat_inputs if isinstance(x, tv_tensors.Image)))
        return self.draw(height, width)

    def transform(self, inpt: torch.Tensor, params: dict) -> torch.Tensor:
        return self.crop(inpt, params, is_mask=isinstance(inpt, tv_tensors.Mask))


PHOTOMETRIC = (TF.adjust_brightness_image, TF.adjust_contrast_image, TF.adjust_saturation_image)


class TrainAugmentation:
    """Joint image/label augmentation: ``RandomScaleCrop``, a horizontal flip (probability 1/2), and colour
    jitter of the image (brightness, contrast and saturation factors each from 1 +- ``jitter``, applied in a
    random order, as ``v2.ColorJitter`` does).

    Called as ``augment(image (3, H, W), label (H, W), generator, zoom)`` on tensors on any device; ``zoom`` is
    the resolution stage's scale (``RandomScaleCrop.draw``). Every random number comes from ``generator`` (the
    global one if None) and is drawn on the CPU before any pixel is touched, so a seeded generator gives the same
    sample whichever process makes it. It calls the functional kernels directly rather than through transforms-v2
    ``Transform`` objects, whose Python dispatch costs more than the kernels on small crops (docs/results.md).
    """

    def __init__(self, crop_size: int | tuple[int, int], base_size: int | None = 375,
                 scale_range: tuple[float, float] = (0.5, 2.0), jitter: float = 0.2):
        if not 0 <= jitter < 1:
            raise ValueError(f"jitter {jitter} must be in [0, 1): colour factors are drawn from 1 +- jitter")
        self.scale_crop = RandomScaleCrop(crop_size, base_size, scale_range)
        self.jitter = jitter

    def __call__(self, image: torch.Tensor, label: torch.Tensor, generator: torch.Generator | None = None,
                 zoom: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        params = self.scale_crop.draw(*image.shape[-2:], generator=generator, zoom=zoom)
        flip = bool(torch.rand((), generator=generator) < 0.5)
        factors = torch.empty(3).uniform_(1 - self.jitter, 1 + self.jitter, generator=generator).tolist()
        order = torch.randperm(3, generator=generator).tolist()
        image, label = self.scale_crop.crop(image, params, is_mask=False), self.scale_crop.crop(label, params, True)
        if flip:
            image, label = image.flip(-1), label.flip(-1)
        for index in order if self.jitter else ():
            image = PHOTOMETRIC[index](image, factors[index])
        return image, label


def zoomed(images: torch.Tensor, labels: torch.Tensor, zoom: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, 3, H, W) uint8 images and (N, H, W) labels resized by ``zoom``, as a resolution stage validates:
    images by area averaging (OpenCV's INTER_AREA, as a resized copy of the data would be), labels by
    ``NEAREST_EXACT``."""
    if zoom == 1:
        return images, labels
    size = [max(1, round(side * zoom)) for side in images.shape[-2:]]
    averaged = torch.nn.functional.interpolate(images.float(), size, mode="area").round_().to(torch.uint8)
    return averaged, TF.resize_image(labels[:, None], size, InterpolationMode.NEAREST_EXACT)[:, 0]
