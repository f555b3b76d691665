"""Decoding a JPEG store's batches with NVIDIA DALI (params `compute.jpeg_decoder: dali`).

DALI's image decoder on a GPU (its "mixed" backend: the host parses each file, the device
decodes) gives part of every batch to the hardware JPEG engines of the GPUs that have
them (A100, H100, H200) and the rest to CUDA nvJPEG; torchvision's batched `decode_jpeg`
decodes on the CUDA cores alone. `bench/gpu.py` times both; the faster is the default.
On a CPU, DALI decodes with libjpeg-turbo on its own threads: what the tests check this
module with (the trainer's CPU loader keeps its own pool of threads, as fast: BENCHMARKS).

DALI is an optional dependency (`pip install 'alexnet-pipeline[dali]'`, Linux x86-64
only). Where it does not import, `missing()` says why, and `alexnet.jpeg` decodes with
torchvision instead, after a warning.

The calls are DALI's dynamic mode (`nvidia.dali.experimental.dynamic`): one operator
call on a batch in hand, no pipeline to build; the version is pinned for that reason.
"""

from __future__ import annotations

import functools

import torch


@functools.cache
def missing() -> str | None:
    """Why DALI cannot decode here (None: it can)."""
    try:
        import nvidia.dali.experimental.dynamic  # noqa: F401
    except (ImportError, OSError) as error:  # OSError: a CUDA library it links is absent
        return f"NVIDIA DALI does not import ({error})"
    return None


@functools.cache
def _context(device: torch.device, threads: int):
    """DALI's evaluation context for `device`: its pool of `threads` host threads (kept:
    making one starts threads) and, on CUDA, the device and torch's stream there, so
    the decode is ordered with the work torch queues before and after it."""
    import nvidia.dali.experimental.dynamic as ndd

    if device.type != "cuda":
        return ndd.EvalContext(num_threads=threads, device_id=None)
    return ndd.EvalContext(
        num_threads=threads,
        device_id=device.index,
        cuda_stream=torch.cuda.current_stream(device),
    )


def decode(
    payloads: list[torch.Tensor], device: torch.device, threads: int, shape: tuple[int, int, int]
) -> torch.Tensor:
    """(N, H, W, 3) uint8 RGB on `device` (a CUDA device with its index), one DALI call
    for the batch. Raises `ValueError` where an image is not `shape` (H, W, 3), and
    DALI's `RuntimeError` where a payload does not decode."""
    import nvidia.dali.experimental.dynamic as ndd
    import nvidia.dali.types as types

    with _context(device, threads):
        batch = ndd.batch([payload.numpy() for payload in payloads])
        backend = "gpu" if device.type == "cuda" else "cpu"
        images = ndd.decoders.image(batch, device=backend, output_type=types.RGB)
        odd = [row for row, each in enumerate(images.shape) if tuple(each) != shape]
        if odd:
            raise ValueError(f"rows {odd} are not {shape}")
        # torch takes DALI's memory as it is (DLPack, ordered on torch's stream)
        return images.torch()
