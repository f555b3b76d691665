"""The network of section 3: parameter counts, shapes, the LRN formula, init, ablations."""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from alexnet.model import LRN, AlexNet, local_response_norm, parameter_count

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


def lrn_direct(a: torch.Tensor, n=5, alpha=1e-4, beta=0.75, k=2.0, groups=1) -> torch.Tensor:
    """The paper's formula, literally: a loop over maps, sums over existing neighbours."""
    a = a.double()
    out = torch.empty_like(a)
    per = a.shape[1] // groups
    for g in range(groups):
        for i in range(per):
            lo, hi = max(0, i - n // 2), min(per - 1, i + (n - 1) // 2)  # even n: torch's
            s = (a[:, g * per + lo : g * per + hi + 1] ** 2).sum(1)
            out[:, g * per + i] = a[:, g * per + i] / (k + alpha * s) ** beta
    return out


@pytest.mark.parametrize("groups", [1, 2])
def test_lrn_is_the_papers_formula_within_each_column(groups):
    x = torch.randn(2, 12, 5, 4) * 30  # large activations, where LRN matters
    ours = local_response_norm(x, groups=groups)
    assert torch.allclose(ours.double(), lrn_direct(x, groups=groups), rtol=1e-6, atol=1e-6)


def test_lrn_equals_torch_reference_with_alpha_times_n():
    x = torch.relu(torch.randn(3, 96, 27, 27)) * 50
    reference = F.local_response_norm(x, size=5, alpha=5 * 1e-4, beta=0.75, k=2.0)
    assert torch.allclose(local_response_norm(x), reference, rtol=1e-6, atol=1e-6)
    # torch's alpha is divided by n: passing the paper's 1e-4 to it is another function.
    assert not torch.allclose(F.local_response_norm(x, 5, 1e-4, 0.75, 2.0), reference, rtol=1e-3)


@pytest.mark.parametrize(("size", "groups"), [(5, 2), (5, 1), (4, 1), (3, 2)])
def test_cpu_kernels_equal_the_formula_and_its_gradient(size, groups):
    # float32 on a CPU with the paper's beta runs alexnet.lrn_cpu's kernels; 23x27 pixels
    # span two of their 512-pixel tiles
    from alexnet import lrn_cpu

    torch.manual_seed(size)
    x = torch.relu(torch.randn(3, 8, 23, 27)) * 30
    grad = torch.randn_like(x)
    assert lrn_cpu.applies(x, 0.75) and not lrn_cpu.applies(x.double(), 0.75)
    out = lrn_cpu.forward(x, size, 1e-3, 2.0, groups)
    direct = lrn_direct(x, n=size, alpha=1e-3, groups=groups)
    assert torch.allclose(out.double(), direct, rtol=1e-6, atol=1e-7)
    x64 = x.double().requires_grad_()
    lrn64 = local_response_norm(x64, size=size, alpha=1e-3, groups=groups)  # eager, float64
    (expected,) = torch.autograd.grad(lrn64, x64, grad.double())
    error = (lrn_cpu.backward(grad, x, size, 1e-3, 2.0, groups).double() - expected).abs()
    assert error.max() <= 1e-6 * expected.abs().max()


def test_float32_lrn_takes_the_kernels_and_any_thread_count_gives_the_same_bits(monkeypatch):
    from alexnet import lrn_cpu

    used = []
    for name in ("forward", "backward"):
        kernel = getattr(lrn_cpu, name)
        monkeypatch.setattr(lrn_cpu, name, lambda *a, k=kernel, n=name: used.append(n) or k(*a))
    x = (torch.relu(torch.randn(5, 12, 9, 9)) * 30).requires_grad_()
    grad = torch.randn_like(x)
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 3):
            torch.set_num_threads(count)
            out = local_response_norm(x, groups=2)
            results.append((out, *torch.autograd.grad(out, x, grad)))
    finally:
        torch.set_num_threads(threads)
    assert used == ["forward", "backward"] * 2
    assert all(torch.equal(a, b) for a, b in zip(*results, strict=True))


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
    assert not any(isinstance(m, LRN) for m in AlexNet(lrn=False).features)
    pools = [m for m in AlexNet(overlap_pool=False).features if isinstance(m, nn.MaxPool2d)]
    assert all(p.kernel_size == 2 and p.stride == 2 for p in pools)
    assert AlexNet(num_classes=7, overlap_pool=False)(torch.zeros(1, 3, 224, 224)).shape == (1, 7)
    drops = [m.p for m in AlexNet(dropout=0.3).classifier if isinstance(m, nn.Dropout)]
    assert drops == [0.3, 0.3]
    # Dropout acts in training only (inverted dropout: same expectation at test time).
    model = AlexNet(num_classes=5, dropout=0.5)
    x = torch.randn(2, 3, 224, 224)
    model.eval()
    assert torch.equal(model(x), model(x))


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
        low = model(x)
    assert low.dtype == torch.bfloat16 and torch.isfinite(low).all()
    assert torch.allclose(low.float(), reference, rtol=0.1, atol=0.1 * reference.abs().max().item())


@pytest.mark.parametrize(("size", "groups"), [(5, 1), (5, 2), (4, 1), (3, 2)])
def test_lrn_backward_matches_numerical_gradient(size, groups):
    x = (torch.randn(2, 8, 3, 3, dtype=torch.float64) * 20).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda t: local_response_norm(t, size=size, alpha=1e-3, groups=groups), (x,)
    )
    ours = local_response_norm(x.detach(), size=size, alpha=1e-3, groups=groups)
    assert torch.allclose(
        ours, lrn_direct(x.detach(), n=size, alpha=1e-3, groups=groups), rtol=1e-12
    )


def test_torch_compile_forward_and_backward_on_cpu():
    # Inductor on CPU (C++ codegen): the compiled model gives the same outputs and trains.
    torch.manual_seed(0)
    model = AlexNet(num_classes=5, init="caffe", dropout=0.0)
    compiled = torch.compile(model)
    x = torch.randn(2, 3, 224, 224) * 40
    out = compiled(x)
    assert torch.allclose(out, model(x), rtol=1e-3, atol=1e-4)
    F.cross_entropy(out, torch.tensor([1, 4])).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("groups", [1, 2])
def test_fused_lrn_path_computes_the_same_forward_and_gradient(groups):
    # The CUDA path (compiled there) recomputes d in the backward; its math, run eagerly
    # here, must equal the formula and the saved-tensor backward.
    from alexnet.model import _fused_backward, _fused_forward

    x = (torch.randn(2, 8, 4, 3, dtype=torch.float64) * 20).requires_grad_()
    grad = torch.randn(2, 8, 4, 3, dtype=torch.float64)
    out = _fused_forward(x.detach(), 5, 1e-3, 0.75, 2.0, groups)
    assert torch.allclose(out, lrn_direct(x.detach(), alpha=1e-3, groups=groups), rtol=1e-12)
    (expected,) = torch.autograd.grad(local_response_norm(x, alpha=1e-3, groups=groups), x, grad)
    fused = _fused_backward(grad, x.detach(), 5, 1e-3, 0.75, 2.0, groups)
    assert torch.allclose(fused, expected, rtol=1e-10, atol=1e-12)


def test_fused_lrn_falls_back_to_eager_when_compilation_fails(monkeypatch):
    from alexnet import model as module

    def broken(function, dynamic=None):
        def fails(*args):
            raise RuntimeError("no Triton here")

        return fails

    monkeypatch.setattr(module, "_FUSED", {})
    monkeypatch.setattr(module.torch, "compile", broken)
    x = torch.randn(2, 8, 3, 3) * 20
    with pytest.warns(UserWarning, match="torch.compile failed"):
        out = module._fused("forward")(x, 5, 1e-4, 0.75, 2.0, 1)
    assert torch.allclose(out, local_response_norm(x), rtol=1e-6)
    assert module._FUSED["forward"] is module._fused_forward


@pytest.mark.parametrize(("size", "groups"), [(5, 2), (4, 1), (3, 2)])
def test_window_sum_band_matrix_and_shifted_slices_agree_with_a_direct_sum(size, groups):
    from alexnet.model import _window_sum

    t = torch.randn(2, 8, 3, 4, dtype=torch.float64)
    per, half = 8 // groups, size // 2
    for transpose in (False, True):
        # direct: map i sums maps j of its group with i - half <= j <= i + size-1-half
        # (transposed: the maps j whose window holds i)
        lo, hi = (size - 1 - half, half) if transpose else (half, size - 1 - half)
        expected = torch.zeros_like(t)
        for i in range(8):
            first, last = i // per * per, i // per * per + per - 1
            for j in range(max(first, i - lo), min(last, i + hi) + 1):
                expected[:, i] += t[:, j]
        for slices in (False, True):
            got = _window_sum(t, size, groups, transpose, alpha=0.5, k=2.0, slices=slices)
            assert torch.allclose(got, 2.0 + 0.5 * expected, rtol=1e-12), (transpose, slices)


def test_setup_compiles_every_numba_kernel():
    # `make setup` calls this so later processes load the kernels from numba's cache.
    from alexnet import augment_cpu, lrn_cpu, stats
    from alexnet.doctor import compile_kernels

    compile_kernels()
    kernels = (lrn_cpu._forward, lrn_cpu._backward, augment_cpu._crops, stats._accumulate)
    assert all(kernel.signatures for kernel in kernels)
