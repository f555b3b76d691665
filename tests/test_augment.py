"""Augmentation math of section 4.1 against direct computations; the fast CPU kernel
against `Augment.reference` (crop windows themselves: tests/test_crops.py)."""

from __future__ import annotations

import pytest
import torch

from alexnet import augment_cpu
from alexnet.augment import Augment, lighting_offsets

N = 64


def coordinate_images(n: int = N) -> torch.Tensor:
    """Images whose pixels say where they are: channel 0 = row, 1 = column, 2 = image."""
    rows = torch.arange(256)[:, None].expand(256, 256)
    cols = torch.arange(256)[None, :].expand(256, 256)
    return torch.stack([torch.stack([rows, cols, torch.full_like(rows, i)]) for i in range(n)])


def eigen():
    vectors = torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(1)))[0]
    return torch.tensor([4000.0, 400.0, 40.0]), vectors


def test_random_crops_are_224_windows_inside_the_image_and_vary():
    images = coordinate_images().float()
    augment = Augment(
        torch.zeros(3, 256, 256), *eigen(), flip=False, lighting=0, subtract_mean=False
    )
    out = augment(images, torch.Generator().manual_seed(0))
    assert out.shape == (N, 3, 224, 224)
    tops, lefts = out[:, 0, 0, 0], out[:, 1, 0, 0]
    for n in range(N):
        t, left = int(tops[n]), int(lefts[n])
        assert 0 <= t <= 32 and 0 <= left <= 32
        assert torch.equal(out[n], images[n, :, t : t + 224, left : left + 224])
    assert len(set(tops.tolist())) > 10 and len(set(lefts.tolist())) > 10


@pytest.mark.parametrize("crop", [224, 227])
def test_every_offset_of_a_crop_is_drawn_both_ends_included(crop):
    # 256 - 224 = 32: offsets 0..32, 33 of them (an off-by-one keeps inside 0..32 too)
    augment = Augment(torch.zeros(3, 256, 256), *eigen(), crop=crop)
    draws = augment.draw(4000, generator=torch.Generator().manual_seed(0))
    for offsets in (draws.tops, draws.lefts):
        assert set(offsets.tolist()) == set(range(256 - crop + 1))


def test_mean_subtraction_uses_the_same_window_and_flips_with_the_image():
    images = coordinate_images().float()
    mean = images[0].clone()  # mean pixel value = its own coordinates
    mean[2] = 0
    augment = Augment(mean, *eigen(), lighting=0)
    out = augment(images, torch.Generator().manual_seed(0))
    assert torch.count_nonzero(out[:, :2]) == 0  # row and column cancel exactly: same window


def test_flip_is_a_horizontal_mirror_about_half_the_time():
    images = torch.randint(0, 256, (200, 3, 256, 256), dtype=torch.uint8)
    augment = Augment(torch.zeros(3, 256, 256), *eigen(), random_crop=False, lighting=0)
    out = augment(images, torch.Generator().manual_seed(0))
    centre = images[:, :, 16:240, 16:240].float()
    same = (out == centre).flatten(1).all(1)
    mirrored = (out == centre.flip(-1)).flatten(1).all(1)
    assert torch.all(same | mirrored)
    assert 70 < int(mirrored.sum()) < 130


@pytest.mark.parametrize("scale", ["unit", "std255"])
def test_pca_lighting_offset_is_the_papers_formula(scale):
    eigvals, eigvecs = eigen()
    images = torch.randint(0, 256, (N, 3, 256, 256), dtype=torch.uint8)
    augment = Augment(
        torch.zeros(3, 256, 256),
        eigvals,
        eigvecs,
        random_crop=False,
        flip=False,
        lighting=0.1,
        lighting_scale=scale,
    )
    out = augment(images, torch.Generator().manual_seed(5))
    alphas = torch.randn(N, 3, generator=torch.Generator().manual_seed(5)) * 0.1
    offsets = out - images[:, :, 16:240, 16:240].float()
    for n in range(N):
        # [p1 p2 p3] [a1 l1, a2 l2, a3 l3]^T with the chosen eigenvalue convention.
        lam = eigvals / 255.0 if scale == "unit" else eigvals.sqrt()
        direct = sum(alphas[n, i] * lam[i] * eigvecs[:, i] for i in range(3))
        assert torch.allclose(offsets[n], direct[:, None, None].expand(3, 224, 224), atol=1e-3)


def test_lighting_scale_magnitudes_match_the_known_imagenet_figures():
    # fb.resnet.torch's published ImageNet PC1 eigenvalue, 0.2175, on the [0, 1] scale
    # (docs/paper.md: larger than ImageNet's own) -> ~5.5 levels at 0.1.
    eigvals = torch.tensor([0.2175 * 255**2, 0.0, 0.0])
    pc1 = torch.eye(3)
    unit = lighting_offsets(torch.tensor([[0.1, 0, 0]]), eigvals, pc1, "unit")
    std = lighting_offsets(torch.tensor([[0.1, 0, 0]]), eigvals, pc1, "std255")
    assert abs(unit[0, 0].item() - 5.546) < 0.01 and abs(std[0, 0].item() - 11.89) < 0.01


def test_same_generator_seed_same_batch():
    images = torch.randint(0, 256, (8, 3, 256, 256), dtype=torch.uint8)
    augment = Augment(torch.rand(3, 256, 256) * 255, *eigen())
    first = augment(images, torch.Generator().manual_seed(3))
    assert torch.equal(first, augment(images, torch.Generator().manual_seed(3)))
    assert not torch.equal(first, augment(images, torch.Generator().manual_seed(4)))


@pytest.mark.parametrize(
    ("channels_last", "kernels"), [(False, "fast"), (True, "fast"), (True, "reference")]
)
def test_whole_transform_equals_the_direct_order_per_image(channels_last, kernels):
    # crop, subtract the mean's same window, reflect, add the lighting offset: one image
    # at a time by slicing, against the batched transform (which reflects before
    # subtracting, from a reflected mean), bit for bit.
    images = torch.randint(0, 256, (16, 3, 256, 256), dtype=torch.uint8)
    if channels_last:  # as the trainer reads them: an NCHW view of HWC rows
        images = nhwc(images)
    mean = torch.rand(3, 256, 256) * 255
    augment = Augment(mean, *eigen(), kernels=kernels)
    draws = augment.draw(16, generator=torch.Generator().manual_seed(5))
    assert draws.flips.any() and not draws.flips.all()
    out = augment.apply(images, draws)
    offsets = lighting_offsets(draws.alphas, augment.eigvals, augment.eigvecs)
    for n in range(16):
        window = (
            ...,
            slice(draws.tops[n], draws.tops[n] + 224),
            slice(draws.lefts[n], draws.lefts[n] + 224),
        )
        expected = images[n][window].float() - mean[window]
        if draws.flips[n]:
            expected = expected.flip(-1)
        expected += offsets[n][:, None, None]
        assert torch.equal(out[n], expected), n


def nhwc(images: torch.Tensor) -> torch.Tensor:
    """The same images in the loader's memory layout: an NCHW view of HWC rows."""
    return images.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)


SWITCHES = [
    {},
    {"lighting": 0.0},
    {"subtract_mean": False},
    {"flip": False, "random_crop": False},
    {"lighting_scale": "std255"},
    {"crop": 227},
]


@pytest.mark.parametrize("switches", SWITCHES)
def test_cpu_kernel_equals_the_reference_bit_for_bit(switches, monkeypatch):
    # The loader's NHWC batches take alexnet.augment_cpu's one-pass kernel, other
    # batches the reference. The same draws must give the same bits, for each ablation.
    images = torch.randint(0, 256, (8, 3, 256, 256), dtype=torch.uint8)
    augment = Augment(torch.rand(3, 256, 256) * 255, *eigen(), **switches)
    draws = augment.draw(8, generator=torch.Generator().manual_seed(9))
    assert not augment.flip or (draws.flips.any() and not draws.flips.all())
    expected = augment.reference(images, draws)
    assert torch.equal(augment.reference(nhwc(images), draws), expected)
    used = []
    kernel = augment_cpu.crops
    monkeypatch.setattr(augment_cpu, "crops", lambda *a: used.append(1) or kernel(*a))
    assert torch.equal(augment.apply(images, draws), expected) and not used  # NCHW: reference
    fast = augment.apply(nhwc(images), draws)
    assert used == [1] and fast.dtype == expected.dtype and fast.shape == expected.shape
    assert torch.equal(fast, expected)


def test_reference_kernels_never_call_the_cpu_kernel(monkeypatch):
    def broken(*args):
        raise RuntimeError("fast kernel called")

    images = nhwc(torch.randint(0, 256, (4, 3, 256, 256), dtype=torch.uint8))
    mean = torch.rand(3, 256, 256) * 255
    fast, reference = Augment(mean, *eigen()), Augment(mean, *eigen(), kernels="reference")
    draws = fast.draw(4, generator=torch.Generator().manual_seed(2))
    expected = fast.apply(images, draws)
    monkeypatch.setattr(augment_cpu, "crops", broken)
    assert torch.equal(reference.apply(images, draws), expected)
    assert torch.equal(reference(images, torch.Generator().manual_seed(2)), expected)
    with pytest.raises(RuntimeError, match="fast kernel called"):
        fast.apply(images, draws)  # the patch is where the fast path goes


def test_cpu_kernel_refuses_windows_outside_the_image_and_a_mismatched_mean():
    from alexnet import augment_cpu

    images = torch.zeros(2, 256, 256, 3, dtype=torch.uint8).permute(0, 3, 1, 2)
    means = torch.zeros(2, 3, 256, 256)
    tops, lefts, flips = torch.tensor([0, 33]), torch.zeros(2, dtype=torch.long), torch.ones(2) > 0
    with pytest.raises(ValueError, match="outside 256x256"):
        augment_cpu.crops(images, tops, lefts, flips, means, torch.zeros(2, 3), 224)
    with pytest.raises(ValueError, match="do not match"):
        augment_cpu.crops(images, tops * 0, lefts, flips, means[:, :, :200], torch.zeros(2, 3), 8)
