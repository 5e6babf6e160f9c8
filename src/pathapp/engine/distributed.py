"""The torchrun environment, read in one place, and the few collectives the loops use.

`dist_env()` is what the launcher says about this process (no torch import, so planners and the CLI
can ask); `setup_distributed()` joins the process group a training loop needs."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class DistEnv:
    """Rank, world size and this node's share of it, as torchrun sets them (1 process without it)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def dist_env() -> DistEnv:
    """The launcher's environment now (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE)."""
    def get(name: str, default: int) -> int:
        return int(os.environ.get(name, default))

    return DistEnv(get("RANK", 0), get("WORLD_SIZE", 1), get("LOCAL_RANK", 0), get("LOCAL_WORLD_SIZE", 1))


@dataclass
class DistInfo:
    """A training process after setup: its rank in the process group and its device."""

    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed() -> DistInfo:
    """Join the torchrun process group when WORLD_SIZE > 1 (NCCL on GPU, gloo on CPU)."""
    import torch
    import torch.distributed as dist

    env = dist_env()
    cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{env.local_rank}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    if env.world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    return DistInfo(rank, dist.get_world_size() if dist.is_initialized() else 1, device)


def is_distributed() -> bool:
    """Inside a process group of more than one process."""
    import torch.distributed as dist

    return dist.is_initialized() and dist.get_world_size() > 1


def all_mean(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """The mean of each value over all processes (the values themselves in one process)."""
    if not is_distributed():
        return values
    import torch
    import torch.distributed as dist

    t = torch.tensor(list(values.values()), dtype=torch.float64, device=device)
    dist.all_reduce(t)
    t /= dist.get_world_size()
    return dict(zip(values, t.tolist()))


def gather(obj: Any) -> list[Any]:
    """Every process's `obj`, in rank order ([obj] in one process)."""
    if not is_distributed():
        return [obj]
    import torch.distributed as dist

    objs: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(objs, obj)
    return objs
