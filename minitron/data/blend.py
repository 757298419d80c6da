"""A weighted blend of several block arrays, seen as one array.

The blend has as many blocks as its sources together; source i fills round(w_i * N) of them
(largest remainders), spread evenly along the blend, so every prefix (the first validation blocks
an evaluation reads, a run's first steps) holds the sources in proportion too. A source with more
slots than blocks repeats its blocks; one with fewer uses a seeded subset. The mapping is a pure
function of the sizes, weights and seed, so every rank and every run sees the same blend, and
the sampler's resumable order applies to it unchanged.
"""
from typing import List, Sequence

import numpy as np


def apportion(total: int, weights: Sequence[float]) -> np.ndarray:
    """Integer counts summing to `total`, proportional to `weights` (largest remainders)."""
    w = np.asarray(weights, dtype=np.float64)
    exact = total * w / w.sum()
    counts = np.floor(exact).astype(np.int64)
    short = total - counts.sum()
    counts[np.argsort(-(exact - counts), kind="stable")[:short]] += 1
    return counts


def blend_index(sizes: Sequence[int], weights: Sequence[float], seed: int, shuffle: bool):
    """(source id, row) per blended block. `shuffle` picks a seeded subset / repeat order of each
    source's rows (training); without it, rows are taken in order (validation)."""
    total = int(sum(sizes))
    if total == 0:
        return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64)
    counts = apportion(total, [w if n else 0.0 for w, n in zip(weights, sizes)])
    # The k-th block of source i sits at (k + 0.5) / count_i along the blend: evenly spread.
    position = np.concatenate([(np.arange(c) + 0.5) / c for c in counts if c])
    source = np.concatenate([np.full(c, i, dtype=np.int64) for i, c in enumerate(counts) if c])
    order = np.argsort(position, kind="stable")
    source = source[order]
    row = np.empty(total, dtype=np.int64)
    for i, (c, n) in enumerate(zip(counts, sizes)):
        if not c:
            continue
        picks = np.arange(c) % n
        if shuffle:
            picks = np.random.default_rng([seed, i]).permutation(n)[picks]
        row[source == i] = picks
    return source, row


class BlendedBlocks:
    """Indexable like a [blocks, seq_len] array (ints, slices, integer arrays)."""

    def __init__(self, parts: List[np.ndarray], source: np.ndarray, row: np.ndarray):
        self.parts, self.source, self.row = parts, source, row
        self.shape = (len(source), parts[0].shape[1])
        self.dtype = np.result_type(*(p.dtype for p in parts))

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index):
        if isinstance(index, (int, np.integer)):
            return self[np.array([index])][0]
        picked = np.arange(len(self))[index] if isinstance(index, slice) else np.asarray(index)
        out = np.empty((len(picked), self.shape[1]), dtype=self.dtype)
        src, row = self.source[picked], self.row[picked]
        for i, part in enumerate(self.parts):
            mine = np.flatnonzero(src == i)
            if len(mine):
                out[mine] = part[row[mine]]
        return out
