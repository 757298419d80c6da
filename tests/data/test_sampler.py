from collections import Counter

import numpy as np
import torch

from minitron.data.sampler import BlockSampler

BLOCKS = np.arange(50 * 4).reshape(50, 4)


def global_batch(world_size: int, micro: int, step: int, seed: int = 3) -> Counter:
    rows = []
    for rank in range(world_size):
        s = BlockSampler(BLOCKS, 8, micro, rank, world_size, seed)
        for a in range(s.accumulation_steps):
            rows += [tuple(r) for r in s.micro_batch(step, a).tolist()]
    return Counter(rows)


def test_same_global_batch_for_any_process_count():
    for step in (0, 5, 13):
        reference = global_batch(1, 2, step)
        assert global_batch(2, 2, step) == reference
        assert global_batch(2, 4, step) == reference
        assert global_batch(4, 1, step) == reference


def test_each_epoch_visits_every_block_once_and_is_seeded():
    s = BlockSampler(BLOCKS, 10, 10, 0, 1, seed=0)
    seen = torch.cat([s.micro_batch(step, 0) for step in range(5)])  # 50 blocks = one epoch
    assert sorted(seen[:, 0].tolist()) == sorted(BLOCKS[:, 0].tolist())
    other = BlockSampler(BLOCKS, 10, 10, 0, 1, seed=1)
    assert not torch.equal(other.micro_batch(0, 0), s.micro_batch(0, 0))
    # Resuming is a pure function of the step: a fresh sampler gives the same batch.
    assert torch.equal(BlockSampler(BLOCKS, 10, 10, 0, 1, seed=0).micro_batch(7, 0), s.micro_batch(7, 0))
