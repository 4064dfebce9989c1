"""Training on several processes (GPUs or CPU cores, one node or many) with torch.distributed.

Launch the same training command under torchrun; each process reads its rank from the
environment torchrun sets (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT):

    torchrun --nproc-per-node 4 -m trainer train --data ... --batch-size 256   # one node, 4 GPUs
    torchrun --nnodes 2 --node-rank 0 --nproc-per-node 8 --rdzv-backend c10d \
        --rdzv-endpoint trainer-0:29500 -m trainer train ...                    # on each node

``--batch-size`` is the global batch; each process trains on its 1/world share of it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    local_rank: int = 0
    world: int = 1

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def sum_over_ranks(self, values: Sequence[float]) -> list[float]:
        """Each value summed over every rank, on every rank (float64: image counts stay exact). A figure of the
        whole run (the train loss over every process's rows), and the same on every rank, so every rank takes the
        same decision on it (a non-finite loss stops them all)."""
        if not self.enabled:
            return [float(v) for v in values]
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
        total = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
        dist.all_reduce(total)
        return total.tolist()

    def gather_object(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` (picklable), in rank order, on every rank."""
        if not self.enabled:
            return [obj]
        parts: list = [None] * self.world
        dist.all_gather_object(parts, obj)
        return parts

    def gather_cat(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's tensor (any length), in rank order, on every rank."""
        if not self.enabled:
            return [tensor]
        parts: list = [None] * self.world
        dist.all_gather_object(parts, tensor.cpu())
        return parts


def init_distributed(device_name: str) -> tuple[DistContext, torch.device | None]:
    """Join the process group torchrun describes; (context, device for this rank) or (single, None)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext(), None
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device_name != "cpu" and torch.cuda.is_available()
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return DistContext(rank, local_rank, world), device


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
