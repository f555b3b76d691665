"""Data parallelism across processes and nodes (torchrun / torch.distributed elastic).

A `World` is this process's rank among `size` training processes. torchrun sets
RANK, WORLD_SIZE and LOCAL_RANK; `World.from_env` joins the process group (NCCL when
training on CUDA, gloo on CPU). Without torchrun it is the one-process world, whose
collectives do nothing, so the training loop has one code path.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TypeVar

import torch
import torch.distributed as dist

from alexnet.errors import one_line

# How long the ranks wait for each other after hashing the data they train on: a raw
# ImageNet store is ~250 GB, ~7 h at 10 MB/s (a NAS shared by many nodes); an hour made
# such a start fail every time, nothing hashed kept. A rank that dies ends the wait at
# once (gloo sees its connections close: measured, 2 processes); this bounds only a hung
# one. NCCL's own timeout, 10 minutes, stays for the training's collectives.
PATIENCE = timedelta(hours=12)

T = TypeVar("T")


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    patient: object = field(default=None, compare=False, repr=False)  # see `wait_for_all`

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
                from alexnet.placement import resolve_devices

                mine = cls(size=size, local_rank=local_rank).device(devices)
                # a rank past the node's GPUs (or none there): one line, not a traceback
                torch.cuda.set_device(resolve_devices(mine)[0])
            dist.init_process_group(backend)
        # made by every rank together, as groups must be; its barrier on the CPU
        patient = dist.new_group(backend="gloo", timeout=PATIENCE)
        return cls(dist.get_rank(), size, local_rank, patient)

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

    def wait_for_all(self) -> None:
        """Wait up to `PATIENCE` until every rank is here (the one-process world: at once)."""
        if self.size > 1:
            dist.barrier(group=self.patient)

    def node_first(self, work: Callable[[], T]) -> T:
        """`work()` on each node's first rank, then on the node's other ranks, then every
        rank waits for all (each wait up to `PATIENCE`). What the first leaves behind (the
        data digests' memo) spares the others the cost: a node's 8 ranks read ImageNet's
        LMDB once for its digest, not 8 times at once."""
        first = self.local_rank == 0
        if first:
            done = work()
        self.wait_for_all()
        if not first:
            done = work()
        self.wait_for_all()
        return done

    def close(self) -> None:
        if self.size > 1 and dist.is_initialized():
            dist.destroy_process_group()


def launch(argv: Sequence[str]) -> int:
    """torchrun (`torch.distributed.run`) on `argv`, its failures as an exit status, not
    its traceback and report of every rank: a rank that failed has said why in its own
    `error:` line, and only one killed by a signal (which could not) is named here. A
    signal to torchrun itself is 128 + its number, as a shell reports it."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous.api import RendezvousError
    from torch.distributed.run import parse_args, run

    if os.environ.pop("ALEXNET_QUIET_AGENT", None):  # its level was read as torch loaded
        os.environ.pop("TORCH_CPP_LOG_LEVEL", None)  # (flows.train.QUIET_AGENT): workers'
    args = parse_args(list(argv))
    try:
        run(args)
    except RendezvousError as error:  # no worker started: nobody else says why
        print(
            f"error: {rendezvous_problem(error, args.rdzv_endpoint, args.nnodes)}", file=sys.stderr
        )
        return 1
    except ChildFailedError as error:
        rank, first = error.get_first_failure()
        if first.exitcode < 0:
            print(f"error: rank {rank} was killed by {first.signal_name()}", file=sys.stderr)
        return 1
    except SignalException as error:
        return 128 + error.sigval
    return 0


def rendezvous_problem(error: Exception, endpoint: str, nodes: str) -> str:
    """The line for a rendezvous that failed (torch's timeout error has no message)."""
    from torch.distributed.elastic.rendezvous.api import RendezvousTimeoutError

    if isinstance(error, RendezvousTimeoutError):
        return (
            f"the rendezvous at {endpoint} did not gather its {nodes} nodes in time: "
            "start `alexnet train` on every node, all with this train.rdzv_endpoint"
        )
    while error.__cause__ is not None:  # torch's "See inner exception for details."
        error = error.__cause__
    line = f"the rendezvous at {endpoint} failed ({one_line(error, first_only=True)})"
    if isinstance(error, dist.DistNetworkError | ConnectionError | TimeoutError):
        line += ": train.rdzv_endpoint must name a training node that every node reaches"
    return line


if __name__ == "__main__":  # `python -m alexnet.distributed TORCHRUN-ARGS`: flows/train.py
    sys.exit(launch(sys.argv[1:]))
