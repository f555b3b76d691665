"""Crop windows (section 4.1): the one rule for "central" is torchvision's, and every
centre (validation, the ten test patches, training without random crops) is that rule."""

from __future__ import annotations

import pytest
import torch
from torchvision.transforms.v2 import functional as TF

from alexnet.augment import Augment
from alexnet.crops import (
    CENTRE,
    centre_crop,
    centre_offset,
    crop_windows,
    ten_crop_windows,
    ten_crops,
)

SIZES = [(256, 224), (256, 227), (255, 224), (257, 224)]  # even and odd margins


def coordinates(height: int, width: int, n: int = 1) -> torch.Tensor:
    """(n, 3, H, W) float images whose pixels say where they are: channel 0 = row,
    1 = column, 2 = image."""
    rows = torch.arange(height)[:, None].expand(height, width)
    cols = torch.arange(width)[None, :].expand(height, width)
    return torch.stack(
        [torch.stack([rows, cols, torch.full_like(rows, i)]) for i in range(n)]
    ).float()


def torchvision_corner(height: int, width: int, crop: int) -> tuple[int, int]:
    """Where torchvision's center_crop puts its window: read off a coordinate image."""
    window = TF.center_crop(coordinates(height, width)[0], [crop, crop])
    assert window.shape[-2:] == (crop, crop)
    return int(window[0, 0, 0]), int(window[1, 0, 0])


@pytest.mark.parametrize(("size", "crop"), SIZES)
def test_centre_offset_is_torchvisions_centre(size, crop):
    assert torchvision_corner(size, size, crop) == (centre_offset(size, crop),) * 2
    # and each side on its own (255/224 and 257/224 round differently: 15.5 -> 16, 16.5 -> 16)
    top, left = torchvision_corner(size, 256, crop)
    assert (top, left) == (centre_offset(size, crop), centre_offset(256, crop))


def test_centre_offset_values():
    # round((size - crop) / 2), halves to even as torchvision rounds them
    assert [centre_offset(s, c) for s, c in SIZES] == [16, 14, 16, 16]
    assert centre_offset(224, 224) == 0


@pytest.mark.parametrize(("size", "crop"), SIZES)
def test_centre_crop_takes_centre_offsets_window_and_its_mean_window(size, crop):
    images = coordinates(size, size + 1, n=2)
    mean = torch.rand(3, size, size + 1) * 255
    top, left = centre_offset(size, crop), centre_offset(size + 1, crop)
    window = (..., slice(top, top + crop), slice(left, left + crop))
    out = centre_crop(images, None, crop)
    assert out.shape == (2, 3, crop, crop) and out.dtype == torch.float32
    assert torch.equal(out, images[window])
    assert torch.equal(out, TF.center_crop(images, [crop, crop]))
    assert torch.equal(centre_crop(images, mean, crop), images[window] - mean[window])
    # uint8 batches in the loader's channels-last layout give the same floats
    pixels = torch.randint(0, 256, (2, size, size + 1, 3), dtype=torch.uint8).permute(0, 3, 1, 2)
    assert torch.equal(centre_crop(pixels, mean, crop), pixels[window].float() - mean[window])
    # float32 images of the crop's size: the result is a copy, the caller's images kept
    whole = torch.rand(2, 3, crop, crop) * 255
    kept = whole.clone()
    assert torch.equal(centre_crop(whole, mean[window], crop), kept - mean[window])
    assert torch.equal(whole, kept)


@pytest.mark.parametrize(
    ("height", "width", "crop"),
    [(256, 256, 224), (256, 256, 227), (255, 257, 224), (40, 50, 24), (41, 40, 24)],
)
def test_ten_crops_are_torchvisions_in_position_and_order(height, width, crop):
    images = torch.randint(0, 256, (3, 3, height, width), dtype=torch.uint8)
    mean = torch.rand(3, height, width) * 255
    ours, centred = ten_crops(images, None, crop), ten_crops(images, mean, crop)
    assert ours.shape == (3, 10, 3, crop, crop)
    for n in range(3):
        expected = TF.ten_crop(images[n].float(), [crop, crop])
        assert len(expected) == 10
        for i, patch in enumerate(expected):
            assert torch.equal(ours[n, i], patch), (n, i)
        # each patch loses its own window of the mean (reflected with the patch)
        for i, patch in enumerate(TF.ten_crop(images[n].float() - mean, [crop, crop])):
            assert torch.allclose(centred[n, i], patch), (n, i)


@pytest.mark.parametrize(("size", "crop"), SIZES)
def test_every_centre_is_centre_offsets(size, crop):
    images = torch.randint(0, 256, (2, 3, size, size), dtype=torch.uint8)
    mean = torch.rand(3, size, size) * 255
    offset = centre_offset(size, crop)
    tops, lefts, flips = ten_crop_windows(size, size, crop)
    assert (tops[CENTRE], lefts[CENTRE], flips[CENTRE]) == (offset, offset, False)
    assert torch.allclose(ten_crops(images, mean, crop)[:, CENTRE], centre_crop(images, mean, crop))
    # training without random crops takes the same window
    augment = Augment(mean, torch.ones(3), torch.eye(3), crop=crop, random_crop=False)
    draws = augment.draw(5, size, size)
    assert draws.tops.tolist() == draws.lefts.tolist() == [offset] * 5


def test_ten_crop_windows_reflect_the_five_patches():
    tops, lefts, flips = ten_crop_windows(40, 50, 24)
    assert tops == [0, 0, 16, 16, 8] * 2
    assert lefts == [0, 26, 0, 26, 13, 26, 0, 26, 0, 13]  # a reflection's left is W-crop-L
    assert flips == [False] * 5 + [True] * 5


def test_crop_windows_gather_equals_slicing():
    images = torch.randint(0, 256, (5, 3, 40, 50), dtype=torch.uint8)
    tops, lefts = torch.tensor([0, 3, 16, 8, 1]), torch.tensor([0, 26, 5, 13, 9])
    crops = crop_windows(images, tops, lefts, 24)
    for n in range(5):
        t, left = int(tops[n]), int(lefts[n])
        assert torch.equal(crops[n], images[n, :, t : t + 24, left : left + 24])
    # window n from image sources[n]
    sources = torch.tensor([4, 4, 0, 1, 2])
    crops = crop_windows(images, tops, lefts, 24, sources)
    for n in range(5):
        t, left, s = int(tops[n]), int(lefts[n]), int(sources[n])
        assert torch.equal(crops[n], images[s, :, t : t + 24, left : left + 24])
