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
from tests.helpers import assert_updates_within, within

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
def test_cuda_lrn_equals_the_reference(dtype, rtol, groups, monkeypatch):
    monkeypatch.setattr(lrn, "_FUSED", {})  # compiled in this test, not reused
    monkeypatch.setattr(lrn, "_NO_TRITON", set())
    generator = torch.Generator().manual_seed(groups)
    x = (torch.relu(torch.randn(4, 16, 27, 27, generator=generator)) * 30).to(CUDA, dtype)
    grad = torch.randn(x.shape, generator=generator).to(CUDA, dtype)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fast, fast_grad = output_and_gradient(x, grad, "fast", groups)
    failed = [str(w.message) for w in caught if "failed" in str(w.message)]
    assert not failed, failed  # the Triton kernels ran, both ways
    assert not lrn._FUSED and not lrn._NO_TRITON  # no fallback to the compiled ops
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
    assert logits.dtype == torch.float32  # fc8 in float32: bf16 logits tie classes
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
    # and it trains: gradients reach both columns, on their own devices, and make the
    # one-device network's update (a crossing that cut the gradient would still leave
    # column 1 some, through its own conv3 half)
    start = {name: value.clone() for name, value in model.state_dict().items()}
    target = torch.tensor([0, 3, 6])
    for net, out, labels in ((model, model(x), target), (placed, two, target.to(CUDA))):
        F.cross_entropy(out, labels).backward()
        with torch.no_grad():
            for p in net.parameters():
                p -= 0.01 * p.grad
    for column, device in ((placed.column0, CUDA), (placed.column1, torch.device("cpu"))):
        for p in column.parameters():
            assert p.grad is not None and p.grad.device == device
            assert torch.isfinite(p.grad).all()
    merged = {name: value.cpu() for name, value in placed.merged_state_dict().items()}
    assert_updates_within(merged, model.state_dict(), start, rtol=1e-3)


@pytest.mark.parametrize(("dtype", "rtol"), TOLERANCES)
@pytest.mark.parametrize("shape", [(8, 96, 55, 55), (8, 256, 27, 27)])
@pytest.mark.parametrize("groups", [1, 2])
def test_triton_lrn_kernels_on_conv1_and_conv2_maps(dtype, rtol, shape, groups):
    # The one-pass kernels at the model's own sizes (96 and 256 maps, one or two columns),
    # against the formula in float64 and its autograd gradient.
    from alexnet import lrn_triton

    generator = torch.Generator().manual_seed(7)
    x = (torch.relu(torch.randn(shape, generator=generator)) * 30).to(dtype)
    grad = torch.randn(shape, generator=generator).to(dtype)
    leaf = x.double().requires_grad_()
    reference = local_response_norm_reference(leaf, groups=groups)
    (expected,) = torch.autograd.grad(reference, leaf, grad.double())
    out = lrn_triton.forward(x.to(CUDA), 5, 1e-4, 0.75, 2.0, groups)
    got = lrn_triton.backward(grad.to(CUDA), x.to(CUDA), 5, 1e-4, 0.75, 2.0, groups)
    assert out.is_cuda and got.is_cuda and out.dtype == got.dtype == dtype
    assert within(out, reference.detach(), rtol) and within(got, expected, rtol)


# nvJPEG's IDCT and chroma upsampling are not libjpeg-turbo's: a pixel may differ by a few
# levels at a sharp colour edge, the image on average by well under one level. DALI's GPU
# decode is nvJPEG too (its CUDA or its hardware backend), held to the same bound.
NVJPEG_MEAN, NVJPEG_MAX = 1.0, 24


def jpeg_split(folder, count: int):
    """The training store of `jpeg_training_data`: `count` photo-like 256x256 JPEGs."""
    from alexnet.reader import LmdbSplit
    from tests.helpers import jpeg_training_data

    return LmdbSplit(jpeg_training_data(folder, count) / "lmdb" / "train")


@pytest.mark.parametrize("decoder", ["torchvision", "dali"])
def test_the_gpu_batch_decode_equals_the_cpu_decode_within_decoder_differences(tmp_path, decoder):
    from alexnet.jpeg import decode_on, usable

    assert usable(decoder) == decoder  # DALI is installed (the [dali] extra), not replaced
    split = jpeg_split(tmp_path, 12)
    on_cpu, _ = split.read_batch(range(12))
    on_gpu = decode_on(split.read_encoded(range(12)), CUDA, split.shape, decoder)
    assert on_gpu.is_cuda and on_gpu.shape == on_cpu.shape and on_gpu.dtype == torch.uint8
    difference = (on_gpu.cpu().int() - on_cpu.int()).abs()
    assert difference.float().mean() <= NVJPEG_MEAN and difference.max() <= NVJPEG_MAX


@pytest.mark.parametrize("decoder", ["torchvision", "cpu", "dali"])
def test_a_ranks_empty_share_of_a_jpeg_batch_decodes_to_no_images_on_cuda(tmp_path, decoder):
    # torchrun: a short last batch leaves a rank no rows; the batched decoders take no
    # empty list (torchvision raised ValueError and the training stopped)
    from alexnet.jpeg import decode_on

    split = jpeg_split(tmp_path, 4)
    images = decode_on(split.read_encoded([]), CUDA, split.shape, decoder)
    assert images.is_cuda and images.shape == (0, *split.shape) and images.dtype == torch.uint8


def test_the_neighbour_queries_are_the_pixels_the_gpu_decoded(tmp_path, exact_float32):
    # The candidates (and the scores) come from nvJPEG's pixels on CUDA; the queries came
    # from the host's libjpeg, so one image was not at distance 0 from itself.
    from alexnet.jpeg import decode_on
    from alexnet.neighbours import hidden_vectors, query_vectors

    split = jpeg_split(tmp_path, 4)
    model = AlexNet(num_classes=2).to(CUDA).eval()
    mean = torch.full((3, 256, 256), 100.0)
    with torch.no_grad():
        got = query_vectors(model, split, [0, 1, 2, 3], mean, 224, CUDA)
        decoded = decode_on(split.read_encoded(range(4)), CUDA, split.shape)
        assert torch.equal(got, hidden_vectors(model, decoded, mean.to(CUDA), 224))
        on_host, _ = split.read_batch(range(4))
        if not torch.equal(decoded.cpu(), on_host):  # (nvJPEG's pixels differ here)
            assert not torch.equal(got, hidden_vectors(model, on_host.to(CUDA), mean.to(CUDA), 224))


def test_cuda_however_spelled_is_one_device_to_the_decoder(tmp_path):
    # torchvision makes its nvJPEG decoder again (leaking the last) whenever the device
    # it is asked for compares unequal: "cuda" and "cuda:0" are one device
    from alexnet.jpeg import _decode_stream, decode_on

    split = jpeg_split(tmp_path, 4)
    _decode_stream.cache_clear()
    first = decode_on(split.read_encoded(range(4)), torch.device("cuda"), split.shape)
    second = decode_on(split.read_encoded(range(4)), CUDA, split.shape)
    assert _decode_stream.cache_info().currsize == 1 and torch.equal(first, second)


def test_a_gpu_decode_does_not_overwrite_memory_queued_kernels_still_read(tmp_path):
    # torchvision's CUDA decoder writes its outputs from a stream that does not wait for
    # the caller's (pytorch/vision#9606): freed blocks that queued kernels still read were
    # overwritten, and a training step's loss became NaN. As upstream's reproduction:
    # blocks of the decoder's output size, freed while sums of them wait behind a long
    # kernel, then a decode: every sum must still be exact.
    from alexnet.jpeg import decode_on

    split = jpeg_split(tmp_path, 8)
    elements = 3 * 256 * 256 // 4  # float32s in one decoded image's bytes
    for _ in range(20):
        victims = [torch.ones(elements, device=CUDA) for _ in range(8)]
        torch.cuda.synchronize()
        torch.cuda._sleep(20_000_000)  # ~10 ms of one kernel: the sums below wait
        sums = [victim.sum() for victim in victims]
        del victims  # freed while the sums still wait to read them
        decode_on(split.read_encoded(range(8)), CUDA, split.shape, "torchvision")
        assert [float(total) for total in sums] == [float(elements)] * 8


def test_deterministic_mode_does_not_fill_the_gpu_decoders_outputs(tmp_path, monkeypatch):
    # Deterministic mode (train.deterministic) fills each new tensor on the current
    # stream; torchvision's decoder writes its outputs from a stream that does not wait
    # for that fill, which, run late, would overwrite pixels: the fill is off for it.
    from alexnet import jpeg

    split = jpeg_split(tmp_path, 8)
    expected = jpeg.decode_on(split.read_encoded(range(8)), CUDA, split.shape).cpu()
    real, filling = jpeg.rgb, []

    def spy(payloads, **options):
        filling.append(torch.utils.deterministic.fill_uninitialized_memory)
        return real(payloads, **options)

    monkeypatch.setattr(jpeg, "rgb", spy)
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        images = jpeg.decode_on(split.read_encoded(range(8)), CUDA, split.shape, "torchvision")
    finally:
        torch.use_deterministic_algorithms(was)
    assert filling == [False] and torch.utils.deterministic.fill_uninitialized_memory
    assert torch.equal(images.cpu(), expected)


def test_a_gpu_decode_overlaps_the_callers_queued_work(tmp_path):
    # Issue 18's "no host sync in the step": decoding the next batch must not wait for
    # the step queued before it, and the batch must still reach that stream's later work
    # whole.
    from alexnet.jpeg import decode_on

    split = jpeg_split(tmp_path, 8)
    expected = decode_on(split.read_encoded(range(8)), CUDA, split.shape).cpu()  # warm
    torch.cuda.synchronize()
    torch.cuda._sleep(10_000_000_000)  # ~5 s of one kernel on the caller's stream
    queued = torch.cuda.Event()
    queued.record()
    images = decode_on(split.read_encoded(range(8)), CUDA, split.shape)
    assert not queued.query()  # back before the long kernel ended: no wait for it
    assert torch.equal(images.cpu(), expected)


def test_the_evaluation_in_bf16_and_channels_last_on_cuda_is_float32_up_to_rounding():
    # params evaluate.amp and evaluate.channels_last, where they are for: a GPU.
    from alexnet.evaluate import crop_log_probabilities, speed_switches

    torch.manual_seed(0)
    model = AlexNet(num_classes=10).to(CUDA).eval()
    images = torch.randint(0, 256, (4, 3, 256, 256), dtype=torch.uint8, device=CUDA)
    mean = torch.full((3, 256, 256), 110.0, device=CUDA)
    exact = crop_log_probabilities(model, images, mean, 224).exp()
    with speed_switches(model, CUDA, amp=True, channels_last=True):
        fast = crop_log_probabilities(model, images, mean, 224).exp()
    assert fast.dtype == torch.float32 and fast.is_cuda
    torch.testing.assert_close(fast, exact, atol=0.02, rtol=0)


def test_an_evaluation_batch_is_queued_without_waiting_for_the_device():
    # The 10-crop evaluation and the neighbour search read and decode the next batch
    # while the device runs this one's forward: nothing in a batch's work may wait for
    # the device (a list index, a copy from unpinned memory; each waited for the forward
    # queued before). Their per-batch functions, with the loops' pinned labels; first
    # calls outside: cuDNN's and the index tensors' set-up.
    from alexnet.evaluate import crop_average, crop_log_probabilities
    from alexnet.metrics import label_ranks
    from alexnet.neighbours import Neighbours, candidates, keep_nearest

    model = AlexNet(num_classes=10).to(CUDA).eval()
    images = torch.randint(0, 256, (4, 3, 256, 256), dtype=torch.uint8, device=CUDA)
    mean = torch.full((3, 256, 256), 110.0, device=CUDA)
    labels = torch.arange(4).pin_memory()
    queries = torch.randn(3, 10, device=CUDA)
    none = torch.empty(3, 0, dtype=torch.long, device=CUDA)
    best = Neighbours(none, none, torch.empty(3, 0, device=CUDA))

    def batch(best: Neighbours) -> Neighbours:
        average = crop_average(crop_log_probabilities(model, images, mean, 224))
        label_ranks(average, labels.to(CUDA, non_blocking=True))
        return keep_nearest(best, candidates(range(4), labels, queries, average), 2)

    best = batch(best)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        best = batch(best)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert best.indices.shape == (3, 2)


DEFERRED_CHECK = """
import sys, torch
from pathlib import Path
from alexnet.train import Trainer
from tests.helpers import EPOCH_ENDS, tiny_training_data, train_run
torch.use_deterministic_algorithms(True, warn_only=True)
torch.backends.cudnn.benchmark = False
data = tiny_training_data(Path(sys.argv[1]))
runs = []
for every in (1, 3):
    run = train_run(
        data, Path(sys.argv[1]) / str(every), {"overlap_pool": False}, epochs=2, batch_size=2,
        sync_every=every,
        checkpoint_minutes=EPOCH_ENDS["checkpoint_minutes"],
        device=["cuda"], amp=True, channels_last=True, loader_workers=2,
    )
    t = Trainer(run)
    while not t.finished():
        t.run_epoch()
    runs.append(t)
a, b = runs
assert [r["train_loss"] for r in a.history] == [r["train_loss"] for r in b.history]
for (name, x), y in zip(a.model.state_dict().items(), b.model.state_dict().values()):
    assert torch.equal(x, y), name
print("same")
"""


def test_deferred_loss_reads_give_the_same_run_on_cuda_bit_for_bit(tmp_path):
    # The configuration in which a deferred read once ended in a NaN at step 2: bf16,
    # channels-last, pinned batches from loader workers. Deterministic kernels in a
    # fresh process (cuBLAS reads its workspace setting when it starts), and pooling
    # windows that do not overlap: overlapping max-pool's CUDA backward adds with
    # atomics, in an order that differs from run to run.
    assert_prints_same(DEFERRED_CHECK, tmp_path)


def assert_prints_same(script: str, folder) -> None:
    """Run a check script, its folder as `sys.argv[1]`, in a fresh process with cuBLAS's
    deterministic workspace (read when cuBLAS starts), and see it print "same"."""
    import os

    from tests.helpers import run_python

    env = {**os.environ, "CUBLAS_WORKSPACE_CONFIG": ":4096:8"}
    done = run_python(script.replace("sys.argv[1]", repr(str(folder))), env=env)
    assert done.returncode == 0 and "same" in done.stdout, done.stderr[-3000:]


def test_training_from_a_jpeg_store_decodes_the_batches_on_the_gpu(tmp_path, monkeypatch):
    # Each encoded batch (the steps', validation's) is decoded on the GPU (nvJPEG): pixels
    # the CPU decode's within the decoders' differences, so the epoch is the CPU
    # decoder's up to them.
    from alexnet import train as train_module
    from alexnet.jpeg import Encoded, decode_on
    from alexnet.train import Trainer
    from tests.helpers import jpeg_training_data, train_run

    run = train_run(jpeg_training_data(tmp_path), tmp_path / "run", epochs=1, device=["cuda"])
    images, labels, size = next(Trainer(run).batches())  # what the loader hands the step
    assert isinstance(images, Encoded) and len(images.sizes) == size == 4
    decoded, to_device = [], train_module.to_device

    def spy(images, device, shape, decoder):
        out = to_device(images, device, shape, decoder)
        if isinstance(images, Encoded):
            decoded.append((decode_on(images, torch.device("cpu"), shape), out))
        return out

    monkeypatch.setattr(train_module, "to_device", spy)
    record = Trainer(run).run_epoch()
    assert len(decoded) == 4  # 8 images, batch 4: both steps' batches, and validation's
    for on_cpu, on_gpu in decoded:
        assert on_gpu.is_cuda and on_gpu.shape == on_cpu.shape
        difference = (on_gpu.cpu().int() - on_cpu.int()).abs()
        assert difference.float().mean() <= NVJPEG_MEAN and difference.max() <= NVJPEG_MAX
    monkeypatch.undo()
    cpu_run = run.model_copy(update={"jpeg_decoder": "cpu", "checkpoint": tmp_path / "c.pt"})
    on_cpu = Trainer(cpu_run).run_epoch()
    assert record["train_loss"] == pytest.approx(on_cpu["train_loss"], rel=0.02)


def test_training_on_cuda_with_the_cpu_decoder_takes_decoded_batches(tmp_path):
    # compute.jpeg_decoder: cpu, for a host whose cores outrun the GPU's decoder: the
    # loader's threads decode, the GPU gets pixels, exactly the CPU decode's.
    from alexnet.jpeg import decode_on
    from alexnet.reader import LmdbSplit
    from alexnet.train import Trainer
    from tests.helpers import jpeg_training_data, train_run

    jpeg_training_data(tmp_path)
    split = LmdbSplit(tmp_path / "lmdb" / "train")
    on_gpu = decode_on(split.read_encoded(range(8)), CUDA, split.shape, "cpu")
    assert on_gpu.is_cuda and torch.equal(on_gpu.cpu(), split.read_batch(range(8))[0])
    run = train_run(tmp_path, tmp_path / "run", epochs=1, device=["cuda"])
    run = run.model_copy(update={"jpeg_decoder": "cpu"})
    images, _, size = next(Trainer(run).batches())  # what the loader hands the step
    assert torch.is_tensor(images) and images.dtype == torch.uint8 and len(images) == size
    record = Trainer(run).run_epoch()
    assert math.isfinite(record["train_loss"])


def test_the_compiled_step_on_cuda_is_the_eager_step_up_to_rounding(
    tmp_path, exact_float32, monkeypatch
):
    # train.compile on CUDA: CUDA graphs ("reduce-overhead"). Each step's loss waits
    # unread for up to 4 steps (4 replays of the graphs, whose outputs each replay
    # overwrites): the losses read must be the eager run's, step by step. Dropout off:
    # inductor's random numbers are not eager's.
    from alexnet.train import Trainer
    from tests.helpers import EPOCH_ENDS, assert_updates_within, tiny_training_data, train_run

    data = tiny_training_data(tmp_path / "data")
    read, settle = [], Trainer._settle

    def recorded(self, *flags):
        read.extend(float(loss) for loss, *_ in self.unread)
        return settle(self, *flags)

    monkeypatch.setattr(Trainer, "_settle", recorded)
    runs = {}
    for compiled in (False, True):
        read.clear()
        run = train_run(
            data,
            tmp_path / str(compiled),
            {"dropout": 0.0},
            epochs=2,
            batch_size=2,
            max_epochs_per_rate=1,
            sync_every=4,
            checkpoint_minutes=EPOCH_ENDS["checkpoint_minutes"],
            device=["cuda"],
            compile=compiled,
        )
        t = Trainer(run)
        start = {name: value.clone() for name, value in t.model.state_dict().items()}
        while not t.finished():
            t.run_epoch()
        runs[compiled] = t, list(read)
    (eager, eager_losses), (compiled, compiled_losses) = runs[False], runs[True]
    assert len(compiled_losses) == 10
    assert compiled_losses == pytest.approx(eager_losses, rel=1e-3)
    assert [r["lr"] for r in compiled.history] == pytest.approx([0.01, 0.001])
    assert_updates_within(compiled.model.state_dict(), eager.model.state_dict(), start, 2e-2)


COMPILED_RESUME_CHECK = """
import sys, torch
from pathlib import Path
from alexnet.errors import Interrupted
from alexnet.train import Trainer
from tests.helpers import EPOCH_ENDS, tiny_training_data, train_run
torch.use_deterministic_algorithms(True, warn_only=True)
torch.backends.cudnn.benchmark = False
root = Path(sys.argv[1])
data = tiny_training_data(root / "data")
def trainer(name):
    return Trainer(train_run(
        data, root / name, {"overlap_pool": False}, epochs=2, batch_size=2,
        **EPOCH_ENDS, device=["cuda"], compile=True,
    ))
whole = trainer("whole")
while not whole.finished():
    whole.run_epoch()
first = trainer("parts")
def on_step(done, total):
    if first.epoch == 1 and done == 2:
        first.stop_requested = True
try:
    while not first.finished():
        first.run_epoch(on_step=on_step)
except Interrupted:
    pass
resumed = trainer("parts")
assert resumed.resume() and (resumed.epoch, resumed.step) == (1, 2)
while not resumed.finished():
    resumed.run_epoch()
for (name, x), y in zip(whole.model.state_dict().items(), resumed.model.state_dict().values()):
    assert torch.equal(x, y), name
print("same")
"""


def test_a_compiled_run_on_cuda_resumes_bit_for_bit(tmp_path):
    # Dropout's masks inside CUDA graphs come from each step's seed, as in the eager
    # step: a run stopped and resumed ends with the uninterrupted run's weights
    # (deterministic kernels in a fresh process, as above).
    assert_prints_same(COMPILED_RESUME_CHECK, tmp_path)
