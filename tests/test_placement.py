"""Two-device placement: the same function as the one-device grouped network."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from alexnet.model import AlexNet
from alexnet.placement import DeviceError, TwoColumnAlexNet, place, resolve_devices
from tests.helpers import REPO, assert_updates_within, within

DEVICES = ["cpu", "cpu"]  # two "devices" on CPU exercise the split path (CUDA: see issue note)


def test_columns_communicate_only_at_conv3_and_fc_layers():
    placed = place(AlexNet(num_classes=10), DEVICES)
    assert isinstance(placed, TwoColumnAlexNet)
    crossing = [
        type(m).__name__
        for m, reads in zip(placed.column0, placed.reads, strict=True)
        if reads == "both"
    ]
    assert crossing == ["Conv2d", "Linear", "Linear", "Logits"]  # conv3, fc6, fc7, fc8
    assert placed.column0[8].in_channels == 256 and placed.column0[4].in_channels == 48


def test_merged_weights_are_the_original_layout():
    model = AlexNet(num_classes=11)
    placed = place(model, DEVICES)
    merged = placed.merged_state_dict()
    original = model.state_dict()
    assert merged.keys() == original.keys()
    assert all(torch.equal(merged[k], original[k]) for k in original)


def test_same_function_forward_and_backward():
    # In float64: in float32 the two ways of summing round apart, and a ReLU or a
    # pooling window's maximum can then flip on a near tie and route a gradient elsewhere
    # (2% of conv1's update, for one seed's weights). In float64 they agree to ~1e-13.
    torch.manual_seed(0)
    model = AlexNet(num_classes=7, init="caffe", dropout=0.0)
    drawn = torch.random.get_rng_state()
    placed = place(model, DEVICES).double()  # from the same weights, exactly widened
    # and nothing drawn: the random numbers after it (dropout's) are a one-device run's
    assert torch.equal(torch.random.get_rng_state(), drawn)
    model.double()
    start = {name: value.clone() for name, value in model.state_dict().items()}
    x = torch.randn(3, 3, 224, 224, dtype=torch.float64) * 40
    target = torch.tensor([0, 3, 6])
    one, two = model(x), placed(x)
    assert within(two, one, 1e-10)

    for net, out in ((model, one), (placed, two)):
        F.cross_entropy(out, target).backward()
        with torch.no_grad():
            for p in net.parameters():
                p -= 0.01 * p.grad
    # the updates (not the weights: most steps are below a weight's tolerance), each
    # tensor's within 1e-9 of its largest
    assert_updates_within(placed.merged_state_dict(), model.state_dict(), start, rtol=1e-9)


def test_one_device_is_the_model_itself():
    model = AlexNet(num_classes=3)
    assert place(model, ["cpu"]) is model


def test_the_halves_keep_the_kernels_choice():
    from alexnet.lrn import LRN

    for kernels in ("fast", "reference"):
        placed = place(AlexNet(num_classes=3, kernels=kernels), DEVICES)
        lrns = [m for m in [*placed.column0, *placed.column1] if isinstance(m, LRN)]
        assert len(lrns) == 4 and {(m.kernels, m.groups) for m in lrns} == {(kernels, 1)}


def test_placement_refuses_what_it_cannot_split():
    with pytest.raises(ValueError, match="one or two devices"):
        place(AlexNet(num_classes=3), ["cpu"] * 3)
    with pytest.raises(DeviceError, match="two-column network"):  # one line, not a traceback
        place(AlexNet(num_classes=3, columns=1), DEVICES)


def test_resolve_devices_checks_the_names_a_run_asks_for():
    assert resolve_devices(["cpu"]) == [torch.device("cpu")]
    assert resolve_devices(("cpu", "cpu")) == [torch.device("cpu")] * 2
    with pytest.raises(DeviceError, match="one, or two"):
        resolve_devices(["cpu"] * 3)
    with pytest.raises(DeviceError, match="one, or two"):
        resolve_devices([])
    with pytest.raises(DeviceError, match=r"^device 'gpu': not a device name \(cpu, cuda"):
        resolve_devices(["gpu"])  # torch's own error: a list of every backend, many lines
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count:
        with pytest.raises(DeviceError, match=f"has {count} CUDA device"):
            resolve_devices([f"cuda:{count}"])
    else:
        with pytest.raises(DeviceError, match="CUDA is not available"):
            resolve_devices(["cuda:0"])


def test_the_model_does_not_import_the_placement():
    # placement builds on the model, not the other way round (no import cycle)
    from alexnet.imports import imported_modules

    assert "alexnet.placement" not in imported_modules(REPO, REPO / "alexnet" / "model.py")
    assert "alexnet.model" in imported_modules(REPO, REPO / "alexnet" / "placement.py")
