"""Who this process is among the ranks of one training run: plain data, no torch (every stage script reads it).

The torch side (DDP, reductions, the launcher) is ``petbreeds.learn.distributed``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from petbreeds.config import DistributedParams

# torchrun's environment in every worker it starts, in the order of World's fields.
_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")


@dataclass(frozen=True)
class World:
    """This process's place among the ranks of one run; ``World()`` is a single process (no torch.distributed)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    sync_bn: bool = False  # distributed.sync_bn: BatchNorm statistics over the global batch

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes outputs, prints the epoch table and logs to MLflow."""
        return self.rank == 0

    def shard(self, n: int) -> range:
        """This rank's contiguous share of ``n`` items (the first ``n % world_size`` ranks take one more)."""
        per_rank, extra = divmod(n, self.world_size)
        start = self.rank * per_rank + min(self.rank, extra)
        return range(start, start + per_rank + (self.rank < extra))


SINGLE_PROCESS = World()


def under_torchrun() -> bool:
    """True inside a worker that torchrun (or ``petbreeds.learn.distributed.launch``) started."""
    return all(name in os.environ for name in _ENV)


def world_from_env(sync_bn: bool) -> World:
    """The World torchrun describes in this worker's environment."""
    rank, world_size, local_rank, local_world_size = (int(os.environ[name]) for name in _ENV)
    return World(rank, world_size, local_rank, local_world_size, sync_bn)


def world_size_of(params: DistributedParams) -> int:
    """How many processes ``distributed:`` asks for, over all machines."""
    return params.nproc_per_node * params.nnodes
