"""`DistContext`: what the training loop needs to know about data-parallel training.

A single process is rank 0 of a world of 1, and everything below is then a no-op. A distributed
launcher (torchrun) initialises `torch.distributed`, wraps the model in DDP and passes
``DistContext(rank, world_size)`` to `fit`: each rank then trains on its own shard of the
same seeded permutation, evaluates every world_size-th test image, sums its statistics with
the others, and only rank 0 writes files and prints.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1

    def __post_init__(self) -> None:
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={self.rank}, "
                             f"world_size={self.world_size}")

    @property
    def is_main(self) -> bool:
        """The rank that writes checkpoints, metrics and progress."""
        return self.rank == 0

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """`t` summed over all ranks (in place); `t` itself in a single process."""
        if self.world_size > 1:
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
        return t

    def any(self, flag: bool, device: torch.device) -> bool:
        """True when `flag` is true on any rank, so that all ranks stop at the same step."""
        if self.world_size == 1:
            return flag
        return bool(self.all_reduce_sum(torch.tensor([float(flag)], device=device)).item() > 0)
