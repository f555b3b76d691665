"""Data parallelism across processes and nodes (torchrun / torch.distributed elastic).

A `World` is this process's rank among `size` training processes. torchrun sets
RANK, WORLD_SIZE and LOCAL_RANK; `World.from_env` joins the process group (NCCL when
training on CUDA, gloo on CPU). Without torchrun it is the one-process world, whose
collectives do nothing, so the training loop has one code path.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

GROUP_TIMEOUT = timedelta(hours=1)  # how long a collective waits for every rank


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0 writes checkpoints, metrics and the model file."""
        return self.rank == 0

    @classmethod
    def from_env(cls, devices: Sequence[str]) -> World:
        size = int(os.environ.get("WORLD_SIZE", "1"))
        if size == 1:
            return cls()
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if not dist.is_initialized():
            backend = "nccl" if devices[0].startswith("cuda") else "gloo"
            if backend == "nccl":
                # NCCL runs a rank's collectives on the current CUDA device; unset, every
                # rank of a node would use cuda:0. Make it the rank's own (first) GPU.
                mine = cls(size=size, local_rank=local_rank).device(devices)
                torch.cuda.set_device(mine[0])
            # The ranks hash the data they train on before their first collective after
            # DDP's (`Trainer.recipe`): minutes for ImageNet on network storage, and a rank
            # whose digests are cached waits for the others meanwhile. NCCL's default
            # timeout, 10 minutes, would abort a resume on a new node.
            dist.init_process_group(backend, timeout=GROUP_TIMEOUT)
        return cls(dist.get_rank(), size, local_rank)

    def device(self, names: Sequence[str]) -> list[str]:
        """This process's devices under torchrun: `cuda` means its own GPU,
        `cuda:LOCAL_RANK`; two devices `[cuda:0, cuda:1]` (model parallel) mean the rank's
        own pair, `[cuda:2r, cuda:2r+1]`, so the modes combine. (A list mixing CUDA and
        the CPU, which DDP cannot take, is refused with the params.)"""
        names = list(names)
        if self.size == 1:
            return names
        if names == ["cuda"]:
            return [f"cuda:{self.local_rank}"]
        if len(names) == 1:
            return names  # one explicit device (cpu, or a chosen GPU): as given
        if any(name.partition(":")[0] != "cuda" for name in names):
            return names
        stride = len(names)
        return [
            f"cuda:{int(name.partition(':')[2] or 0) + self.local_rank * stride}" for name in names
        ]

    @property
    def rows(self) -> slice:
        """This rank's share of a global batch: every size-th item from its rank."""
        return slice(self.rank, None, self.size)

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over all ranks (float64 on the CPU: exact for counts)."""
        if self.size == 1:
            return values
        tensor = torch.tensor(values, dtype=torch.float64)
        if dist.get_backend() == "nccl":
            tensor = tensor.cuda()  # the rank's own GPU, set in `from_env`
        dist.all_reduce(tensor)
        return tensor.cpu().tolist()

    def gather(self, values: Sequence[int]) -> list[list[int]]:
        """Every rank's `values` (as many on each), in rank order."""
        if self.size == 1:
            return [list(values)]
        tensor = torch.tensor(values, dtype=torch.int64)
        if dist.get_backend() == "nccl":
            tensor = tensor.cuda()  # the rank's own GPU, set in `from_env`
        views = [torch.empty_like(tensor) for _ in range(self.size)]
        dist.all_gather(views, tensor)
        return [view.cpu().tolist() for view in views]

    def close(self) -> None:
        if self.size > 1 and dist.is_initialized():
            dist.destroy_process_group()
