"""Decoding a JPEG store's batches with NVIDIA DALI (params `compute.jpeg_decoder: dali`).

DALI's image decoder on a GPU (its "mixed" backend: the host parses each file, the device
decodes) gives part of every batch to the hardware JPEG engines of the GPUs that have
them (A100, H100, H200) and the rest to CUDA nvJPEG; torchvision's batched `decode_jpeg`
decodes on the CUDA cores alone. `bench/gpu.py` times both, and the faster is to be the
default (torchvision until a GPU has measured them).
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
def _context(device: torch.device, threads: int, stream: torch.cuda.Stream | None):
    """DALI's evaluation context: its pool of `threads` host threads (kept: making one
    starts threads) and, on a CUDA `device`, torch's `stream` there, so that the decode
    is ordered with the work torch queues before and after it."""
    import nvidia.dali.experimental.dynamic as ndd

    if stream is None:
        return ndd.EvalContext(num_threads=threads, device_id=None)
    return ndd.EvalContext(num_threads=threads, device_id=device.index, cuda_stream=stream)


def decode(
    payloads: list[torch.Tensor], device: torch.device, threads: int, shape: tuple[int, int, int]
) -> torch.Tensor:
    """(N, H, W, 3) uint8 RGB on `device`, one DALI call for the batch. Raises
    `ValueError` where an image is not `shape` (H, W, 3), and DALI's `RuntimeError`
    where a payload does not decode. A CUDA `device` names its index
    (`alexnet.jpeg.decode_on` sees to it)."""
    import nvidia.dali.experimental.dynamic as ndd
    import nvidia.dali.types as types

    # torch's current stream on the device, named for DALI
    stream = torch.cuda.current_stream(device) if device.type == "cuda" else None
    with _context(device, threads, stream):
        batch = ndd.batch([payload.numpy() for payload in payloads])
        backend = "gpu" if stream is not None else "cpu"
        # the pixels as stored, as torchvision and PIL give them: no turn by an EXIF tag
        images = ndd.decoders.image(
            batch, device=backend, output_type=types.RGB, adjust_orientation=False
        )
        odd = [row for row, each in enumerate(images.shape) if tuple(each) != shape]
        if odd:
            raise ValueError(f"rows {odd} are not {shape}")
        # torch takes DALI's memory as it is (DLPack, ordered on torch's stream)
        return images.torch()
