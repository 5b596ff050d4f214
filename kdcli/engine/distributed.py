"""torchrun integration: one process per GPU (or CPU worker), NCCL on GPUs and gloo on CPU.

`torchrun --nproc_per_node N -m kdcli teach ...` sets WORLD_SIZE/RANK/LOCAL_RANK; kdcli reads them, shards
every sampler's stream across ranks (class-balanced and unpaired ones included), averages gradients with DDP
(the frozen teacher is never wrapped) and lets rank 0 alone write files. `--batch-size` is per process.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.utils.data import Sampler


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1
    started_here: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def env_rank() -> int:
    return int(os.environ.get("RANK", "0"))


def local_world_size() -> int:
    """Processes torchrun started on this machine (they share its CPUs)."""
    return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def setup(device: torch.device) -> Ranks:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Ranks()
    if dist.is_initialized():
        return Ranks(dist.get_rank(), dist.get_world_size())
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Ranks(dist.get_rank(), dist.get_world_size(), started_here=True)


def teardown(ranks: Ranks) -> None:
    if ranks.started_here and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


class RankShard(Sampler):
    """Every rank draws the same seeded stream and keeps every world-th index: disjoint shares, equal lengths,
    and together exactly the batches a single process would see (with --batch-size per process)."""

    def __init__(self, base: Sampler, ranks: Ranks):
        self.base, self.ranks = base, ranks

    @property
    def generator(self):  # the engine reseeds the stream each epoch through this
        return getattr(self.base, "generator", None)

    def __len__(self) -> int:
        return len(self.base) // self.ranks.world

    def __iter__(self) -> Iterator[int]:
        indices = list(self.base)
        usable = len(indices) - len(indices) % self.ranks.world
        return iter(indices[self.ranks.rank : usable : self.ranks.world])


def mean_across_ranks(values: dict[str, float], ranks: Ranks, device: torch.device) -> dict[str, float]:
    if not ranks.distributed or not values:
        return values
    keys = sorted(values)
    tensor = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return {k: float(v) / ranks.world for k, v in zip(keys, tensor.tolist(), strict=True)}
