"""Where this process stands in a torchrun job, without importing torch (`ptq.distributed` re-exports all of it).

A process group can only have been joined once `torch.distributed` is loaded, so until then the environment
torchrun sets (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`) says everything: the command line can set up its logging and
print its help without paying for torch's import.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

from ptq.errors import PtqError


class DistributedError(PtqError, RuntimeError):
    """The environment describes a process group that cannot be joined as asked; the message says why."""


@dataclass(frozen=True)
class World:
    """This process's place in the job: rank in 0..size-1 (and its rank on this node)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def shard(self, n: int) -> range:
        """This rank's contiguous share of `n` items (the first `n % size` ranks take one more)."""
        return shard(n, self.rank, self.size)


def shard(n: int, rank: int, size: int) -> range:
    base, extra = divmod(n, size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (rank < extra))


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise DistributedError(f"environment variable {name}={value!r} is not an integer") from None


def _group():
    """torch.distributed if a process group has been joined, else None."""
    dist = sys.modules.get("torch.distributed")
    return dist if dist is not None and dist.is_available() and dist.is_initialized() else None


def joined() -> bool:
    """Whether this process has joined a process group (`ptq.distributed.setup` under torchrun)."""
    return _group() is not None


def world() -> World:
    """The job as torchrun describes it (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`); one process when unset."""
    dist = _group()
    if dist is not None:
        return World(dist.get_rank(), dist.get_world_size(), _env_int("LOCAL_RANK", 0))
    return World(_env_int("RANK", 0), _env_int("WORLD_SIZE", 1), _env_int("LOCAL_RANK", 0))
