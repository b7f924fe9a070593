"""engine: the training loss equals PyTorch's cross-entropy; score_batch's banded loss and class map equal the
whole-image cross-entropy and argmax."""
import pytest
import torch
import torch.nn.functional as F

from segmentation.engine import BAND_ROWS, score_batch, segmentation_loss


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_banded_scoring_equals_cross_entropy_and_argmax_over_the_whole_image(memory_format):
    generator = torch.Generator().manual_seed(0)
    height = 2 * BAND_ROWS + 11  # two full bands and a partial one
    scores = (4 * torch.randn(2, 19, height, 50, generator=generator)).contiguous(memory_format=memory_format)
    target = torch.randint(0, 19, (2, height, 50), generator=generator)
    target[0, BAND_ROWS - 3: BAND_ROWS + 3] = 255  # ignored pixels across a band boundary
    scores[1, :, 5, 7] = 0.0  # a tie over every class: the first one wins, as with argmax
    scores[1, 3, 9, 9] = float("-inf")  # a class whose averaged TTA probability underflowed
    target[1, 9, 9] = 4
    loss, class_map = score_batch(scores, target)
    expected = F.cross_entropy(scores, target, ignore_index=255, reduction="sum")
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=0)
    assert torch.equal(class_map, scores.argmax(1))
    assert class_map[1, 5, 7] == 0


@pytest.mark.parametrize("weighted", [False, True])
def test_training_loss_is_pytorchs_mean_cross_entropy_over_the_valid_pixels(weighted):
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 19, 12, 20, generator=generator)
    target = torch.randint(0, 19, (2, 12, 20), generator=generator)
    target[0, :5] = 255  # ignored: neither in the sum nor in the divisor
    weights = torch.rand(19, generator=generator) + 0.1 if weighted else None
    expected = F.cross_entropy(logits, target, weight=weights, ignore_index=255)
    torch.testing.assert_close(segmentation_loss(logits, target, weights), expected, rtol=1e-6, atol=0)
