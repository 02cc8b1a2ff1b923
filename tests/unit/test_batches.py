"""The mini-batch sampler shared by the in-process loop and Ray Train workers."""

from __future__ import annotations

import pytest
import torch

from services.core.errors import InvalidArgument
from services.training.loop import batches, steps_per_epoch


@pytest.mark.parametrize(("n", "batch", "world"), [(100, 32, 1), (100, 32, 2), (7, 64, 2),
                                                   (64, 64, 4), (10, 4, 4)])
def test_ranks_together_take_the_single_process_batches(n: int, batch: int, world: int) -> None:
    x = torch.arange(n, dtype=torch.float32)[:, None]

    def run(rank: int, w: int) -> list[torch.Tensor]:
        gen = torch.Generator().manual_seed(3)
        return [xb[:, 0] for xb, _ in batches(x, None, batch, gen, rank=rank, world=w)]

    shards = [run(r, world) for r in range(world)]
    assert all(len(s) == steps_per_epoch(n, batch, world) for s in shards)
    together = [torch.cat([s[step] for s in shards]) for step in range(len(shards[0]))]
    assert all(len(t) == min(batch, n - n % world) for t in together)
    if n >= batch:  # full batches: exactly the examples one process takes, step by step
        assert [sorted(t.tolist()) for t in together] == [sorted(b.tolist()) for b in run(0, 1)]


def test_a_global_batch_that_does_not_split_is_refused() -> None:
    with pytest.raises(InvalidArgument, match="multiple of the 3 workers"):
        next(batches(torch.zeros(10, 1), None, 8, torch.Generator(), rank=0, world=3))
