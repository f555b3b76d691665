"""The network of section 3: parameter counts, shapes, init, ablations, dropout (the LRN's
formula and kernels: tests/test_lrn.py)."""

from __future__ import annotations

import io
import sys
from pathlib import Path
from typing import get_args

import pytest
import torch
from torch import nn

from alexnet.lrn import LRN
from alexnet.model import AlexNet, parameter_count
from alexnet.params import Width
from tests.helpers import REPO, run_python

PAPER_LAYERS = {
    "conv1": 34_944,
    "conv2": 307_456,
    "conv3": 885_120,
    "conv4": 663_936,
    "conv5": 442_624,
    "fc6": 37_752_832,
    "fc7": 16_781_312,
    "fc8": 4_097_000,
}


def test_parameter_count_is_the_papers():
    model = AlexNet()
    assert parameter_count(model) == 60_965_224
    counts = {name: parameter_count(layer) for name, layer in model.layers().items()}
    assert counts == PAPER_LAYERS


def test_a_narrower_net_has_each_layer_of_the_papers_times_its_width():
    # model.width: conv1-5's kernels and fc6-7's units scaled alike, each column's half
    # and each layer's inputs following; fc8 keeps a unit a class.
    def outputs(model: AlexNet) -> dict[str, int]:
        return {name: layer.weight.shape[0] for name, layer in model.layers().items()}

    paper = {columns: outputs(AlexNet(num_classes=10, columns=columns)) for columns in (1, 2)}
    for width in get_args(Width)[1:]:
        for columns in (1, 2):
            model = AlexNet(num_classes=10, columns=columns, width=width).eval()
            layers = model.layers()
            expected = {
                name: n if name == "fc8" else n * width for name, n in paper[columns].items()
            }
            assert outputs(model) == expected, (width, columns)
            assert layers["fc6"].in_features == layers["conv5"].out_channels * 6 * 6
            with torch.no_grad():
                x = torch.randn(2, 3, 224, 224)
                assert model(x).shape == (2, 10)
                assert model.hidden(x).shape == (2, 4096 * width)
    with pytest.raises(ValueError, match="width must be one of"):
        AlexNet(width=0.3)


@pytest.mark.parametrize("input_size", [224, 227])
def test_feature_map_sizes(input_size):
    model = AlexNet(num_classes=10, input_size=input_size).eval()
    sizes = []
    x = torch.zeros(2, 3, input_size, input_size)
    for module in model.features:
        x = module(x)
        if isinstance(module, (nn.Conv2d, nn.MaxPool2d)):
            sizes.append(x.shape[-1])
    assert sizes == [55, 27, 27, 13, 13, 13, 13, 6]
    assert model(torch.zeros(2, 3, input_size, input_size)).shape == (2, 10)


def test_conv2_is_connected_within_a_column_only():
    model = AlexNet(num_classes=10)
    conv2 = model.layers()["conv2"]
    x = torch.randn(1, 96, 27, 27)
    out = conv2(x)
    y = x.clone()
    y[:, 48:] = torch.randn(1, 48, 27, 27)  # change only column 1's input maps
    changed = conv2(y)
    assert torch.equal(out[:, :128], changed[:, :128])  # column 0's outputs unaffected
    assert not torch.allclose(out[:, 128:], changed[:, 128:])


def test_paper_init():
    torch.manual_seed(0)
    layers = AlexNet().layers()
    for name, layer in layers.items():
        expected = 1.0 if name in ("conv2", "conv4", "conv5", "fc6", "fc7") else 0.0
        assert torch.all(layer.bias == expected), name
        assert abs(layer.weight.std().item() - 0.01) < 0.0005, name
        assert abs(layer.weight.mean().item()) < 0.001, name


@pytest.mark.parametrize("init", ["paper", "caffe", "kaiming"])
def test_every_parameter_is_drawn_by_the_init_not_left_unset(monkeypatch, init):
    # torch's own initialisation of each layer is skipped (the layers are made on the
    # meta device, then given memory): `initialise` must set every weight and bias. The
    # memory is filled with NaN here, as unset memory may hold anything.
    empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *a, **k: empty(*a, **k).fill_(float("nan")))
    for columns in (1, 2):
        model = AlexNet(num_classes=10, columns=columns, init=init)
        for name, weight in model.named_parameters():
            assert weight.device.type == "cpu" and weight.requires_grad, name
            assert torch.isfinite(weight).all(), f"{name} left unset"


def test_a_model_made_on_the_meta_device_draws_nothing():
    # (what a model file is loaded into: alexnet/modelfile.py)
    before = torch.random.get_rng_state()
    with torch.device("meta"):
        model = AlexNet(num_classes=10)
    assert {weight.device.type for weight in model.parameters()} == {"meta"}
    assert torch.equal(torch.random.get_rng_state(), before)


def test_caffe_and_kaiming_init():
    torch.manual_seed(0)
    caffe = AlexNet(num_classes=10, init="caffe").layers()
    assert torch.all(caffe["fc6"].bias == 0.1) and torch.all(caffe["conv1"].bias == 0)
    assert abs(caffe["fc7"].weight.std().item() - 0.005) < 0.0003
    assert abs(caffe["conv2"].weight.std().item() - 0.01) < 0.0005
    kaiming = AlexNet(num_classes=10, init="kaiming").layers()
    fan_in = 3 * 11 * 11
    assert abs(kaiming["conv1"].weight.std().item() - (2 / fan_in) ** 0.5) < 0.005
    assert all(torch.all(layer.bias == 0) for layer in kaiming.values())
    for layers in (caffe, kaiming):  # the classifier's output layer: N(0, 0.01) in both
        assert abs(layers["fc8"].weight.std().item() - 0.01) < 0.0005


def test_one_column_net_halves_conv_kernels_but_not_conv5():
    model = AlexNet(columns=1)
    convs = [layer for name, layer in model.layers().items() if name.startswith("conv")]
    assert [c.out_channels for c in convs] == [48, 128, 192, 192, 256]
    assert all(c.groups == 1 for c in convs)
    lrns = [m for m in model.features if isinstance(m, LRN)]
    assert [m.groups for m in lrns] == [1, 1]
    convs = [(3 * 121, 48), (48 * 25, 128), (128 * 9, 192), (192 * 9, 192), (192 * 9, 256)]
    expected = sum(k * n + n for k, n in convs) + 37_752_832 + 16_781_312 + 4_097_000
    assert parameter_count(model) == expected


def test_ablation_switches():
    # section 3.4's overlapping pooling by default (2x2 windows give the same map sizes)
    pools = [m for m in AlexNet().features if isinstance(m, nn.MaxPool2d)]
    assert len(pools) == 3 and all(p.kernel_size == 3 and p.stride == 2 for p in pools)
    assert not any(isinstance(m, LRN) for m in AlexNet(lrn=False).features)
    pools = [m for m in AlexNet(overlap_pool=False).features if isinstance(m, nn.MaxPool2d)]
    assert all(p.kernel_size == 2 and p.stride == 2 for p in pools)
    assert AlexNet(num_classes=7, overlap_pool=False)(torch.zeros(1, 3, 224, 224)).shape == (1, 7)
    drops = [m.p for m in AlexNet(dropout=0.3).classifier if isinstance(m, nn.Dropout)]
    assert drops == [0.3, 0.3]


def test_hidden_is_the_last_hidden_layer_fc8_reads():
    # section 6.1 compares images by "the feature activations induced at the last,
    # 4096-dimensional hidden layer": fc7 after its ReLU, what fc8 reads (not fc6, nor
    # fc7 before the ReLU, both 4096 wide too)
    torch.manual_seed(0)
    model = AlexNet(num_classes=5, init="kaiming").eval()
    x = torch.randn(2, 3, 224, 224) * 40
    with torch.no_grad():
        hidden = model.hidden(x)
        assert hidden.shape == (2, 4096) and (hidden >= 0).all() and (hidden == 0).any()
        assert torch.equal(model.classifier[-1](hidden), model(x))
        fc6 = model.classifier[:3](torch.flatten(model.features(x), 1))
        assert not torch.equal(hidden, fc6)


def dropout_traffic(model: AlexNet, x: torch.Tensor) -> tuple[torch.Tensor, list]:
    """The logits, and (input, output) of each dropout layer of the classifier."""
    seen = []
    hooks = [
        module.register_forward_hook(lambda m, i, o: seen.append((i[0].clone(), o.clone())))
        for module in model.classifier
        if isinstance(module, nn.Dropout)
    ]
    try:
        with torch.no_grad():
            logits = model(x)
    finally:
        for hook in hooks:
            hook.remove()
    return logits, seen


@pytest.mark.parametrize("p", [0.5, 0.3])
def test_dropout_zeroes_fc6_and_fc7_units_and_keeps_the_expectation(p):
    # Section 4.2: each hidden unit of fc6 and fc7 is set to zero with probability p in
    # training; inverted dropout scales the kept ones by 1/(1-p), so the expected input
    # of the next layer is the test-time one, where dropout does nothing.
    torch.manual_seed(0)
    model = AlexNet(num_classes=10, init="caffe", dropout=p)
    fc6, fc7 = model.layers()["fc6"], model.layers()["fc7"]
    positions = [i for i, m in enumerate(model.classifier) if isinstance(m, nn.Dropout)]
    assert [model.classifier[i - 2] for i in positions] == [fc6, fc7]  # after their ReLUs
    x = torch.randn(8, 3, 224, 224) * 40

    _, seen = dropout_traffic(model.train(), x)
    assert len(seen) == 2
    for layer, (before, after) in zip(("fc6", "fc7"), seen, strict=True):
        active = before > 0  # ReLU outputs; a unit at 0 stays 0 whether dropped or not
        assert active.sum() > 8 * 4096 // 2, layer  # enough units to count on
        dropped = active & (after == 0)
        share = dropped.sum().item() / active.sum().item()
        assert abs(share - p) < 0.02, (layer, share)  # ~6 standard deviations
        kept = active & ~dropped
        assert torch.allclose(after[kept], before[kept] / (1 - p), rtol=1e-6), layer
        assert torch.all(after[~active] == 0), layer
        assert abs(after.mean() / before.mean() - 1) < 0.03, layer  # inverted scaling
    _, again = dropout_traffic(model, x)
    assert not torch.equal(again[0][1] == 0, seen[0][1] == 0)  # a new mask each pass

    # Test time: dropout is the identity, so the net is the one without dropout.
    logits, seen = dropout_traffic(model.eval(), x)
    assert all(torch.equal(before, after) for before, after in seen)
    plain = AlexNet(num_classes=10, dropout=0.0).eval()
    plain.load_state_dict(model.state_dict())
    assert torch.equal(logits, dropout_traffic(plain, x)[0])
    assert torch.equal(logits, dropout_traffic(model, x)[0])


def test_state_dict_round_trip_with_weights_only():
    model = AlexNet(num_classes=10)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    other = AlexNet(num_classes=10, init="kaiming")
    other.load_state_dict(torch.load(buffer, weights_only=True))
    x = torch.randn(2, 3, 224, 224)
    assert torch.equal(model.eval()(x), other.eval()(x))


def test_channels_last_and_bf16_autocast_on_cpu():
    torch.manual_seed(0)
    model = AlexNet(num_classes=10, init="caffe").eval()
    x = torch.randn(2, 3, 224, 224) * 50
    reference = model(x)
    fast = model.to(memory_format=torch.channels_last)(x.to(memory_format=torch.channels_last))
    assert torch.allclose(fast, reference, rtol=1e-4, atol=1e-4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low, hidden = model(x), model.hidden(x)
    assert hidden.dtype == torch.bfloat16 and torch.isfinite(low).all()
    assert torch.allclose(low, reference, rtol=0.1, atol=0.1 * reference.abs().max().item())
    # fc8 in float32 (bf16 logits tie classes, and a tie counts as an error): its own
    # product of the bf16 hidden vector, which a bf16 fc8 rounds to 8 significant bits.
    fc8 = model.classifier[-1]
    assert low.dtype == torch.float32
    assert torch.equal(low, hidden.float() @ fc8.weight.T + fc8.bias)


def test_the_two_column_models_logits_are_float32_under_autocast():
    from alexnet.placement import place

    torch.manual_seed(0)
    columns = place(AlexNet(num_classes=10, init="caffe"), ["cpu", "cpu"]).eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert columns(torch.randn(2, 3, 224, 224) * 50).dtype == torch.float32


def numba_kernels() -> list:
    """Every numba kernel of the library (entry points and the ones they call)."""
    from alexnet import augment_cpu, lrn_cpu, stats

    return [
        lrn_cpu._forward,
        lrn_cpu._backward,
        lrn_cpu._terms,
        lrn_cpu._squares,
        augment_cpu._crops,
        stats._accumulate,
    ]


ENTRIES = ("_forward", "_backward", "_crops", "_accumulate")  # what compile_kernels calls


def cache_files(kernel) -> tuple[Path, list[Path]]:
    """numba's cache of `kernel` in its module's __pycache__: the index
    `<module>.<function>-<line>.py<XY>.nbi` and its data files `....<n>.nbc`."""
    code = kernel.py_func.__code__
    source = Path(code.co_filename)
    stem = f"{source.stem}.{kernel.py_func.__qualname__}-{code.co_firstlineno}"
    tag = f"py{sys.version_info.major}{sys.version_info.minor}"
    folder = source.parent / "__pycache__"
    return folder / f"{stem}.{tag}.nbi", sorted(folder.glob(f"{stem}.{tag}.*.nbc"))


def test_setup_compiles_every_numba_kernel_into_the_on_disk_cache():
    # `make setup` calls compile_kernels so that later processes (stages, DataLoader
    # workers, tests in parallel) load the kernels from numba's cache, not compile them.
    from alexnet.doctor import compile_kernels

    compile_kernels()
    kernels = numba_kernels()
    # the entry kernels run (the ones they call are compiled into them, and cached too)
    assert all(kernel.signatures for kernel in kernels if kernel.py_func.__name__ in ENTRIES)
    for kernel in kernels:
        index, data = cache_files(kernel)
        assert index.parent == REPO / "alexnet" / "__pycache__"
        assert index.is_file() and data, f"no cache for {kernel.py_func.__qualname__}: {index}"
        # written for this source: numba rewrites the index when the source changes
        source = Path(kernel.py_func.__code__.co_filename)
        assert index.stat().st_mtime >= source.stat().st_mtime, index

    # A new process loads every kernel compile_kernels runs from there: no compilation.
    code = (
        "from alexnet import augment_cpu, lrn_cpu, stats\n"
        "from alexnet.doctor import compile_kernels\n"
        "compile_kernels()\n"
        "for k in (lrn_cpu._forward, lrn_cpu._backward, augment_cpu._crops, stats._accumulate):\n"
        "    print(k.py_func.__name__, sum(k.stats.cache_hits.values()),"
        " sum(k.stats.cache_misses.values()))\n"
    )
    done = run_python(code)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [line.split() for line in done.stdout.splitlines()]
    counts = {name: (int(hits), int(misses)) for name, hits, misses in rows}
    assert counts == {name: (1, 0) for name in ENTRIES}
