"""What the pipeline runs on: imaging library and its codecs, torch devices; and
compiling the numba kernels ahead of their first use."""

from __future__ import annotations

import platform
from pathlib import Path

from alexnet.pilcodecs import CODECS


def pil_facts() -> dict[str, str]:
    """Which PIL is live (pillow-simd or stock Pillow) and whether it uses libjpeg-turbo."""
    import PIL
    from PIL import features

    # The live module decides (pip's metadata can say pillow-simd after stock Pillow was
    # reinstalled over it); pillow-simd versions carry a `.postN` suffix.
    simd = ".post" in PIL.__version__
    return {
        "PIL": f"{'pillow-simd' if simd else 'Pillow'} {PIL.__version__}",
        "SIMD resize": "yes" if simd else "no (stock Pillow: slower resize)",
        "libjpeg-turbo": "yes" if features.check_feature("libjpeg_turbo") else "no",
    }


def is_pillow_simd() -> bool:
    return pil_facts()["SIMD resize"] == "yes"


def pil_codecs() -> dict[str, str]:
    """Each codec, module and feature of CODECS: "yes (its version)" where the live PIL
    has it, else what to install for it. (PIL counts WebP and AVIF among its modules,
    not its codecs; `features.check` finds a name in either.)"""
    from PIL import features

    rows = {}
    for name, (kind, package) in CODECS.items():
        if features.check(name):
            version = features.version(name)
            rows[f"{kind} {name}"] = f"yes ({version})" if version else "yes"
        else:
            rows[f"{kind} {name}"] = f"no — install {package} and re-run make setup"
    return rows


def torch_facts() -> dict[str, str]:
    import torch

    devices = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return {
        "torch": torch.__version__,
        "CUDA devices": ", ".join(devices) if devices else "none (CPU only)",
        "CPU threads": str(torch.get_num_threads()),
        "NVIDIA DALI": dali_fact(),
    }


def dali_fact() -> str:
    """DALI's version, or why `compute.jpeg_decoder: dali` falls back to torchvision."""
    from alexnet.jpeg_dali import missing

    if why := missing():
        return f"no ({why}): compute.jpeg_decoder dali decodes with torchvision"
    import nvidia.dali  # the package's own version: its name on the registry names a CUDA

    return f"yes ({nvidia.dali.__version__})"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def facts() -> dict[str, str]:
    return {
        "python": platform.python_version(),
        "CPU": cpu_model(),
        **pil_facts(),
        **pil_codecs(),
        **torch_facts(),
    }


def compile_kernels() -> None:
    """Run each numba kernel once on a tiny input, so numba compiles it and writes its
    cache (`alexnet/__pycache__`) now: processes started later (stages, DataLoader
    workers, tests in parallel) load it in milliseconds instead of each compiling it."""
    import numpy as np
    import torch

    from alexnet import augment_cpu, lrn_cpu, stats

    x = torch.rand(2, 4, 3, 3)
    lrn_cpu.backward(lrn_cpu.forward(x, 5, 1e-4, 2.0, 2), x, 5, 1e-4, 2.0, 2)
    images = torch.zeros(1, 8, 8, 3, dtype=torch.uint8).permute(0, 3, 1, 2)
    corner = torch.zeros(1, dtype=torch.long)
    augment_cpu.crops(
        images, corner, corner, corner > 0, torch.zeros(2, 3, 8, 8), torch.zeros(1, 3), 4
    )
    stats.image_moments(iter([np.zeros((4, 4, 3), np.uint8)]), 4)
