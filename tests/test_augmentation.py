"""augmentation.py: labels resized by centre sampling like their image, the scale range, crops, seeds."""
import numpy as np
import torch
from torch.utils.data import DataLoader
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from data_preprocessing import KittiSemantics
from segmentation.augmentation import RandomScaleCrop, TrainAugmentation
from segmentation.layouts import get_layout, list_labelled
from segmentation.loading import SeededTrainSampler

# Non-contiguous label values: a bilinear (or any averaging) resize of the mask makes values between them.
LABEL_VALUES = np.array([3, 7, 11, 17, 26], np.uint8)
PALETTE = np.zeros((256, 3), np.uint8)
PALETTE[LABEL_VALUES] = [(255, 255, 255), (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]


def colour_coded_pair(rng, size=(120, 400), block=20):
    """An image of coloured blocks and a label that is the block's value: alignment is checkable."""
    values = rng.choice(LABEL_VALUES, (size[0] // block, size[1] // block))
    label = np.kron(values, np.ones((block, block), np.int64)).astype(np.uint8)
    return torch.from_numpy(PALETTE[label]).permute(2, 0, 1), torch.from_numpy(label)


def centre_sampled(label: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """Nearest-neighbour resize that samples output pixel centres, in exact integer arithmetic: output j takes
    input floor((j + 1/2) * n_in / n_out). (cv2's INTER_NEAREST_EXACT rounds some of these ties differently.)"""
    rows = (2 * np.arange(out_h) + 1) * label.shape[0] // (2 * out_h)
    cols = (2 * np.arange(out_w) + 1) * label.shape[1] // (2 * out_w)
    return label[rows][:, cols]


def test_scale_crop_resizes_labels_by_nearest_centre_sampling_of_the_chosen_window():
    crop = RandomScaleCrop((72, 136), base_size=120, scale_range=(0.5, 2.0))
    rng, compared = np.random.default_rng(0), 0
    for seed in range(60):
        image, label = colour_coded_pair(rng)
        torch.manual_seed(seed)
        params = crop.make_params([tv_tensors.Image(image), tv_tensors.Mask(label)])
        out = crop.transform(tv_tensors.Mask(label), params).numpy()
        assert out.shape == (72, 136) and set(np.unique(out)) <= {*LABEL_VALUES.tolist(), 255}
        top, left, height, width = params["top"], params["left"], params["height"], params["width"]
        inside = top >= 0 and left >= 0 and top + height <= 120 and left + width <= 400
        if inside and height % 2 and width % 2:  # odd windows: no exact ties (j + 1/2) * n_in / n_out
            window = label.numpy()[top:top + height, left:left + width]
            assert np.array_equal(out, centre_sampled(window, 72, 136))
            compared += 1
    assert compared >= 5


def half_plane_edge_offsets(crop: RandomScaleCrop, windows) -> np.ndarray:
    """Mask edge minus image edge, in output pixels, for a vertical half-plane seen through each window.

    The image is 0 left of column 50 and 255 from it; the mask 0 and 1. The image's edge is where its bilinear
    ramp crosses 50%, i.e. the sum of (1 - value / 255) along a row; the mask's edge is its count of zeros.
    """
    image = torch.zeros(3, 40, 100, dtype=torch.uint8)
    image[..., 50:] = 255
    mask = (image[0] > 0).to(torch.uint8)
    offsets = []
    for top, left, height, width in windows:
        params = {"top": top, "left": left, "height": height, "width": width}
        out_image = crop.transform(tv_tensors.Image(image), params)[0, 0].float()
        out_mask = crop.transform(tv_tensors.Mask(mask), params)[0]
        offsets.append((out_mask == 0).sum().item() - (1 - out_image / 255).sum().item())
    return np.array(offsets)


def test_label_edges_stay_within_half_an_output_pixel_of_the_image_edges():
    crop = RandomScaleCrop((8, 64), base_size=40, scale_range=(0.5, 2.0))
    windows = [(0, left, 8, width) for width in range(14, 90, 3)  # inside the image, edge inside the window
               for left in range(max(0, 52 - width), min(48, 100 - width) + 1, 3)]
    offsets = half_plane_edge_offsets(crop, windows)
    # centre sampling rounds the edge to the nearest output pixel: |offset| <= 1/2, zero on average.
    # Floor sampling (plain NEAREST) lags by 1/2 on average and up to a whole pixel.
    assert np.abs(offsets).max() <= 0.5 + 1e-3 and abs(offsets.mean()) < 0.1


def test_augmentation_keeps_image_and_label_aligned_and_pads_label_with_255():
    geometric = TrainAugmentation(crop_size=256, base_size=120, jitter=0)  # no colour jitter
    rng = np.random.default_rng(0)
    for seed in range(8):
        image, label = colour_coded_pair(rng)
        out_image, out_label = geometric(image, label, torch.Generator().manual_seed(seed))
        assert out_image.shape == (3, 256, 256) and out_label.shape == (256, 256)
        pixels, target = out_image.permute(1, 2, 0).reshape(-1, 3).numpy(), out_label.reshape(-1).numpy()
        padded = target == 255
        assert (pixels[padded] == 0).all()
        distance = np.abs(pixels[:, None, :].astype(int) - PALETTE[None, LABEL_VALUES].astype(int)).sum(-1)
        assert (LABEL_VALUES[distance.argmin(1)][~padded] == target[~padded]).mean() > 0.95
    assert padded.any()  # base 120 scaled by <= 2.0 is smaller than the 256 crop: padding happened


def test_train_augmentation_equals_torchvisions_transforms_given_the_same_draws():
    """TrainAugmentation against RandomScaleCrop, v2's flip and v2.ColorJitter fed its own draws: a swapped
    colour factor, a wrong order or a flip of only one of the pair fails this."""
    augment = TrainAugmentation(64, base_size=96)
    jitter = v2.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2)
    image, label = colour_coded_pair(np.random.default_rng(0))
    flips = set()
    for seed in range(40):
        draws = torch.Generator().manual_seed(seed)
        params = augment.scale_crop.draw(*image.shape[-2:], generator=draws)
        flip = bool(torch.rand((), generator=draws) < 0.5)
        factors = torch.empty(3).uniform_(0.8, 1.2, generator=draws).tolist()
        order = torch.randperm(3, generator=draws)
        expected_image = augment.scale_crop.transform(tv_tensors.Image(image), params)
        expected_label = augment.scale_crop.transform(tv_tensors.Mask(label), params)
        if flip:
            expected_image, expected_label = TF.horizontal_flip(expected_image), TF.horizontal_flip(expected_label)
        expected_image = jitter.transform(expected_image, dict(fn_idx=order, brightness_factor=factors[0],
                                                               contrast_factor=factors[1],
                                                               saturation_factor=factors[2], hue_factor=None))
        out_image, out_label = augment(image, label, torch.Generator().manual_seed(seed))
        assert torch.equal(out_image, expected_image.as_subclass(torch.Tensor))
        assert torch.equal(out_label, expected_label.as_subclass(torch.Tensor))
        flips.add(flip)
    assert flips == {False, True}


def short_sides(crop: RandomScaleCrop, height: int, width: int, seeds: int = 300) -> set[int]:
    image = tv_tensors.Image(torch.zeros(3, height, width, dtype=torch.uint8))
    drawn = set()
    for seed in range(seeds):
        torch.manual_seed(seed)
        drawn.add(crop.make_params([image])["short_side"])
    return drawn


def test_random_scale_draws_every_short_side_from_half_to_twice_the_base_both_included():
    assert short_sides(RandomScaleCrop(16, base_size=10, scale_range=(0.5, 2.0)), 30, 50) == set(range(5, 21))
    assert short_sides(RandomScaleCrop(16, base_size=10, scale_range=(2.0, 2.0)), 30, 50, seeds=3) == {20}
    # base_size=None scales each image's own shorter side (here 30: 15..60)
    assert short_sides(RandomScaleCrop(16, base_size=None, scale_range=(0.5, 2.0)), 30, 50) == set(range(15, 61))


def test_non_square_crop_comes_out_height_by_width():
    augment = TrainAugmentation((48, 96), base_size=None)
    image, label = augment(torch.zeros(3, 60, 200, dtype=torch.uint8), torch.zeros(60, 200, dtype=torch.uint8),
                           torch.Generator().manual_seed(0))
    assert image.shape == (3, 48, 96) and label.shape == (48, 96)
    assert get_layout("cityscapes").crop_size == (512, 1024)


def test_seeded_augmentation_is_reproducible_and_varies_with_the_seed(synthetic_root):
    augment = TrainAugmentation(64, base_size=96)
    dataset = KittiSemantics(synthetic_root, list_labelled(synthetic_root), transform=augment)
    first, again, other = dataset[(0, 123)], dataset[(0, 123)], dataset[(0, 124)]
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert not torch.equal(first[0], other[0])
    before = torch.get_rng_state()
    dataset[(0, 125)]
    assert torch.equal(torch.get_rng_state(), before)  # a seeded sample leaves the global generator alone


def test_unseeded_samples_draw_new_augmentations(synthetic_root):
    dataset = KittiSemantics(synthetic_root, list_labelled(synthetic_root), transform=TrainAugmentation(64, 96))
    torch.manual_seed(0)
    draws = [dataset[0][0] for _ in range(4)]
    assert not all(torch.equal(draws[0], other) for other in draws[1:])


def test_batches_do_not_depend_on_the_number_of_workers(synthetic_root):
    augment = TrainAugmentation(64, base_size=96)
    dataset = KittiSemantics(synthetic_root, list_labelled(synthetic_root), transform=augment)

    def batches(workers):
        sampler = SeededTrainSampler(len(dataset), seed=3)
        sampler.set_epoch(2)
        return list(DataLoader(dataset, 4, sampler=sampler, num_workers=workers))
    for (a_img, a_lbl), (b_img, b_lbl) in zip(batches(0), batches(2)):
        assert torch.equal(a_img, b_img) and torch.equal(a_lbl, b_lbl)

