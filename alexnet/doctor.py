"""What the pipeline runs on: imaging library, JPEG codec, torch devices."""

from __future__ import annotations

import importlib.metadata
import platform


def pil_facts() -> dict[str, str]:
    """Which PIL is live (pillow-simd or stock Pillow) and whether it uses libjpeg-turbo."""
    import PIL
    from PIL import features

    try:
        importlib.metadata.distribution("pillow-simd")
        simd = True
    except importlib.metadata.PackageNotFoundError:
        simd = ".post" in PIL.__version__  # pillow-simd versions carry a .postN suffix
    return {
        "PIL": f"{'pillow-simd' if simd else 'Pillow'} {PIL.__version__}",
        "SIMD resize": "yes" if simd else "no (stock Pillow: slower resize)",
        "libjpeg-turbo": "yes" if features.check_feature("libjpeg_turbo") else "no",
    }


def is_pillow_simd() -> bool:
    return pil_facts()["SIMD resize"] == "yes"


def torch_facts() -> dict[str, str]:
    import torch

    devices = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return {
        "torch": torch.__version__,
        "CUDA devices": ", ".join(devices) if devices else "none (CPU only)",
        "CPU threads": str(torch.get_num_threads()),
    }


def facts() -> dict[str, str]:
    return {
        "python": platform.python_version(),
        "CPU": platform.processor() or platform.machine(),
        **pil_facts(),
        **torch_facts(),
    }
