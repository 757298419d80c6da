"""Deterministic, resumable order over packed blocks.

The position in the data is a pure function of the step: step `s` consumes global samples
`[s * G, (s + 1) * G)` of an endless stream that reshuffles every epoch with `seed + epoch`. So
resuming needs only the step number, and a run with any process count sees the same global batch.
A global batch is laid out as [accumulation step][rank][micro batch]; each rank reads its own rows.
"""
from functools import lru_cache

import numpy as np
import torch


class BlockSampler:
    def __init__(self, blocks: np.ndarray, global_batch_size: int, micro_batch_size: int,
                 rank: int, world_size: int, seed: int):
        assert global_batch_size % (micro_batch_size * world_size) == 0
        self.blocks = blocks
        self.global_batch_size = global_batch_size
        self.micro_batch_size = micro_batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.accumulation_steps = global_batch_size // (micro_batch_size * world_size)

    @lru_cache(maxsize=2)
    def _epoch_order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng(self.seed + epoch).permutation(len(self.blocks))

    def _sample_indices(self, positions: range) -> np.ndarray:
        n = len(self.blocks)
        return np.array([self._epoch_order(p // n)[p % n] for p in positions], dtype=np.int64)

    def blocks_read(self, steps: int) -> np.ndarray:
        """The block numbers every rank reads in steps [0, steps), in reading order."""
        return self._sample_indices(range(steps * self.global_batch_size))

    def micro_batch(self, step: int, accumulation_step: int) -> torch.Tensor:
        """[micro_batch_size, seq_len] int64 token ids for this rank."""
        start = (step * self.global_batch_size
                 + (accumulation_step * self.world_size + self.rank) * self.micro_batch_size)
        idx = self._sample_indices(range(start, start + self.micro_batch_size))
        # Sorted reads are sequential on the memory map; the row order is restored after.
        order = np.argsort(idx)
        rows = np.empty((len(idx), self.blocks.shape[1]), dtype=np.int64)
        rows[order] = self.blocks[idx[order]]
        return torch.from_numpy(rows)

