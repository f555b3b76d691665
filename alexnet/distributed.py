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

import torch
import torch.distributed as dist


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
            dist.init_process_group(backend)
        return cls(dist.get_rank(), size, local_rank)

    def device(self, names: Sequence[str]) -> list[str]:
        """This process's devices under torchrun: `cuda` means its own GPU,
        `cuda:LOCAL_RANK`; two devices `[cuda:0, cuda:1]` (model parallel) mean the rank's
        own pair, `[cuda:2r, cuda:2r+1]`, so the modes combine. The stride is the number
        of GPUs in the list: `[cuda:0, cpu]` gives rank r `[cuda:r, cpu]`."""
        names = list(names)
        if self.size == 1:
            return names
        if names == ["cuda"]:
            return [f"cuda:{self.local_rank}"]
        if len(names) == 1:
            return names  # one explicit device (cpu, or a chosen GPU): as given
        stride = sum(name.partition(":")[0] == "cuda" for name in names)
        shifted = []
        for name in names:
            kind, _, index = name.partition(":")
            if kind == "cuda":
                name = f"cuda:{int(index or 0) + self.local_rank * stride}"
            shifted.append(name)
        return shifted

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
