"""Two-device placement: the same function as the one-device grouped network."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from alexnet.model import AlexNet
from alexnet.placement import TwoColumnAlexNet

DEVICES = ["cpu", "cpu"]  # two "devices" on CPU exercise the split path (CUDA: see issue note)


def test_columns_communicate_only_at_conv3_and_fc_layers():
    placed = AlexNet(num_classes=10).place(DEVICES)
    assert isinstance(placed, TwoColumnAlexNet)
    crossing = [
        type(m).__name__
        for m, reads in zip(placed.column0, placed.reads, strict=True)
        if reads == "both"
    ]
    assert crossing == ["Conv2d", "Linear", "Linear", "Linear"]  # conv3, fc6, fc7, fc8
    assert placed.column0[8].in_channels == 256 and placed.column0[4].in_channels == 48


def test_merged_weights_are_the_original_layout():
    model = AlexNet(num_classes=11)
    placed = model.place(DEVICES)
    merged = placed.merged_state_dict()
    original = model.state_dict()
    assert merged.keys() == original.keys()
    assert all(torch.equal(merged[k], original[k]) for k in original)


def test_same_function_forward_and_backward():
    torch.manual_seed(0)
    model = AlexNet(num_classes=7, init="caffe", dropout=0.0)
    placed = model.place(DEVICES)  # from the same weights
    x = torch.randn(3, 3, 224, 224) * 40
    target = torch.tensor([0, 3, 6])
    one, two = model(x), placed(x)
    assert torch.allclose(one, two, rtol=1e-4, atol=1e-5)

    for net, out in ((model, one), (placed, two)):
        F.cross_entropy(out, target).backward()
        with torch.no_grad():
            for p in net.parameters():
                p -= 0.01 * p.grad
    after = placed.merged_state_dict()
    for name, value in model.state_dict().items():
        assert torch.allclose(after[name], value, rtol=1e-4, atol=1e-6), name


def test_one_device_is_the_model_itself():
    model = AlexNet(num_classes=3)
    assert model.place(["cpu"]) is model
