"""The CUDA paths, where CUDA is (skipped elsewhere, with the reason): the compiled LRN
against the reference, the augmentation on the GPU against the CPU kernel, a bf16
autocast training step, and the paper's two-device placement across a GPU and the CPU.

Run them alone with `pytest -m gpu -n 0`."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from alexnet import lrn
from alexnet.augment import Augment, Draws
from alexnet.lrn import local_response_norm, local_response_norm_reference
from alexnet.model import AlexNet
from alexnet.placement import TwoColumnAlexNet, place
from tests.helpers import within

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

CUDA = torch.device("cuda:0")


@pytest.fixture
def exact_float32():
    """TF32 off (cuDNN's convolutions use it by default: 10-bit mantissas), so a float32
    result on the GPU can be held to the CPU's within float32 rounding."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def output_and_gradient(x, grad, kernels: str, groups: int):
    leaf = x.detach().clone().requires_grad_()
    out = local_response_norm(leaf, alpha=1e-3, groups=groups, kernels=kernels)
    return out.detach(), *torch.autograd.grad(out, leaf, grad)


# float32: the compiled kernels round differently from the reference (d^-beta as
# exp(-beta log d), sums in another order): 1e-5 of the largest value. bfloat16: both
# compute in float32 and round the result to bf16 (8 significant bits): two bf16 steps
# of the largest value.
TOLERANCES = [(torch.float32, 1e-5), (torch.bfloat16, 2**-6)]


@pytest.mark.parametrize(("dtype", "rtol"), TOLERANCES)
@pytest.mark.parametrize("groups", [1, 2])
def test_compiled_cuda_lrn_equals_the_reference(dtype, rtol, groups, monkeypatch):
    monkeypatch.setattr(lrn, "_FUSED", {})  # compiled in this test, not reused
    generator = torch.Generator().manual_seed(groups)
    x = (torch.relu(torch.randn(4, 16, 27, 27, generator=generator)) * 30).to(CUDA, dtype)
    grad = torch.randn(x.shape, generator=generator).to(CUDA, dtype)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fast, fast_grad = output_and_gradient(x, grad, "fast", groups)
    failed = [str(w.message) for w in caught if "torch.compile failed" in str(w.message)]
    assert not failed, failed  # the compiled kernels ran, not the eager fallback
    assert set(lrn._FUSED) == {"forward", "backward"}
    assert lrn._FUSED["forward"] is not lrn._fused_forward
    assert lrn._FUSED["backward"] is not lrn._fused_backward
    reference, reference_grad = output_and_gradient(x, grad, "reference", groups)
    assert fast.is_cuda and fast.dtype == fast_grad.dtype == reference.dtype == dtype
    assert within(fast, reference, rtol) and within(fast_grad, reference_grad, rtol)
    # and the CUDA reference is the formula computed in float64 on the CPU
    formula = local_response_norm_reference(x.cpu().double(), alpha=1e-3, groups=groups)
    assert within(reference, formula, rtol)


def eigen():
    vectors = torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(1)))[0]
    return torch.tensor([4000.0, 400.0, 40.0]), vectors


@pytest.mark.parametrize(
    "switches", [{}, {"lighting": 0.0}, {"subtract_mean": False}, {"flip": False, "crop": 227}]
)
def test_cuda_augmentation_equals_the_cpu_kernel(switches):
    # The same draws through Augment.apply on the GPU (the reference in torch ops) and on
    # the CPU (alexnet.augment_cpu's numba kernel, on the loader's NHWC batch): the same
    # float32 operations in the same order, so the same bits, once both add the same
    # lighting offsets (each device computes its own with a 3x3 product: within 1e-4 of
    # the 0-255 scale).
    images = torch.randint(0, 256, (16, 3, 256, 256), dtype=torch.uint8)
    nhwc = images.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
    mean = torch.rand(3, 256, 256) * 255
    cpu = Augment(mean, *eigen(), **switches)
    gpu = Augment(mean, *eigen(), **switches).to(CUDA)
    draws = cpu.draw(16, generator=torch.Generator().manual_seed(4))
    on_gpu = Draws(*(t.to(CUDA) for t in draws))
    got = gpu.apply(nhwc.to(CUDA), on_gpu)
    assert got.is_cuda and got.dtype == torch.float32
    assert torch.equal(gpu.apply(images.to(CUDA), on_gpu), got)  # layout does not matter
    expected = cpu.apply(nhwc, draws)
    assert got.shape == expected.shape
    assert (got.cpu() - expected).abs().max() <= 1e-4
    offsets = gpu._offsets(on_gpu).cpu()
    cpu._offsets = lambda _: offsets  # the CPU kernel with the GPU's lighting offsets
    assert torch.equal(got.cpu(), cpu.apply(nhwc, draws))


def test_bf16_autocast_training_step_on_cuda():
    torch.manual_seed(0)
    model = AlexNet(num_classes=10, init="caffe").to(CUDA)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    x = torch.randn(8, 3, 224, 224, device=CUDA) * 40
    target = torch.randint(0, 10, (8,), device=CUDA)
    before = [p.detach().clone() for p in model.parameters()]
    model.train()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits = model(x)
        loss = F.cross_entropy(logits, target)
    assert logits.dtype == torch.bfloat16
    assert torch.isfinite(loss) and abs(loss.item() - math.log(10)) < 0.5  # small init logits
    optimizer.zero_grad()
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.dtype == torch.float32, name
        assert torch.isfinite(p.grad).all(), name
    assert all(p.grad.abs().sum() > 0 for p in model.parameters())
    optimizer.step()
    after = list(model.parameters())
    assert all(torch.isfinite(p).all() for p in after)
    assert all(not torch.equal(a, b) for a, b in zip(before, after, strict=True))


def test_two_column_placement_on_a_gpu_and_the_cpu_equals_one_device(exact_float32):
    # Section 3.2: column 0 on the GPU, column 1 on the CPU; the logits come back to the
    # first device and equal the one-device grouped network's within float32 rounding.
    torch.manual_seed(0)
    model = AlexNet(num_classes=7, init="caffe", dropout=0.0).eval()
    x = torch.randn(3, 3, 224, 224) * 40
    placed = place(model, [CUDA, "cpu"])
    assert isinstance(placed, TwoColumnAlexNet)
    assert {p.device for p in placed.column0.parameters()} == {CUDA}
    assert {p.device for p in placed.column1.parameters()} == {torch.device("cpu")}
    two = placed(x)
    assert two.device == CUDA and two.shape == (3, 7)
    with torch.no_grad():
        on_cpu = model(x)
        on_gpu = copy.deepcopy(model).to(CUDA)(x.to(CUDA))
    assert within(two, on_cpu, 1e-5) and within(two, on_gpu, 1e-5)
    # and it trains: gradients reach both columns, on their own devices
    F.cross_entropy(two, torch.tensor([0, 3, 6], device=CUDA)).backward()
    for column, device in ((placed.column0, CUDA), (placed.column1, torch.device("cpu"))):
        for p in column.parameters():
            assert p.grad is not None and p.grad.device == device
            assert torch.isfinite(p.grad).all()
