"""Megatron-LM / NeMo indexed datasets: a `.bin` of token ids and an `.idx` describing it, read
through memory maps (no Megatron dependency).

The `.idx` layout (little-endian), as Megatron Core documents it:
    9 bytes   magic b"MMIDIDX\\x00\\x00"
    uint64    version (1)
    uint8     dtype code of the tokens in .bin (1 uint8, 2 int8, 3 int16, 4 int32, 5 int64, 8 uint16)
    uint64    sequence count S
    uint64    document count D (documents + 1: the boundaries)
    int32[S]  tokens per sequence
    int64[S]  byte offset of each sequence in .bin
    int64[D]  document boundaries, as indices into the sequences ([0, ..., S])
Megatron's preprocessing appends the end-of-document token itself (`--append-eod`), so documents
are read as they are stored: their tokens back to back, cut into blocks.
"""
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from minitron.config import ConfigError

MAGIC = b"MMIDIDX\x00\x00"
DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 8: np.uint16}
_HEADER = struct.Struct("<QBQQ")


@dataclass
class IndexedPair:
    bin_path: Path
    dtype: np.dtype
    document_starts: np.ndarray
    """[documents + 1] token offset of each document's first token in .bin, then the total."""

    @property
    def num_documents(self) -> int:
        return len(self.document_starts) - 1

    @property
    def num_tokens(self) -> int:
        return int(self.document_starts[-1])

    def tokens(self, start: int, count: int) -> np.ndarray:
        """`count` tokens from token offset `start`, memory-mapped."""
        if count == 0:
            return np.empty(0, self.dtype)
        return np.memmap(self.bin_path, dtype=self.dtype, mode="r", offset=start * self.dtype.itemsize,
                         shape=(count,))


def prefix_of(path: str) -> Optional[str]:
    """The pair's prefix if `path` names one (`prefix`, `prefix.bin` or `prefix.idx`), else None."""
    for suffix in (".bin", ".idx"):
        if path.endswith(suffix) and Path(path[: -len(suffix)] + ".idx").exists():
            return path[: -len(suffix)]
    if not Path(path).exists() and Path(path + ".idx").exists():
        return path
    return None


def open_pair(prefix: str, key: str = "data.path") -> IndexedPair:
    """Read and check the index; the token file is only mapped. Errors name `key`."""
    idx, bin_path = Path(prefix + ".idx"), Path(prefix + ".bin")
    if not bin_path.exists():
        raise ConfigError(f"{key}: {idx} has no {bin_path.name} beside it")
    raw = np.memmap(idx, dtype=np.uint8, mode="r") if idx.stat().st_size else np.empty(0, np.uint8)
    if raw[: len(MAGIC)].tobytes() != MAGIC or len(raw) < len(MAGIC) + _HEADER.size:
        raise ConfigError(f"{key}: {idx} is not a Megatron index (bad header)")
    version, code, num_seq, num_doc = _HEADER.unpack_from(raw, len(MAGIC))
    if version != 1:
        raise ConfigError(f"{key}: {idx} has index version {version}; only version 1 is read")
    if code not in DTYPES:
        raise ConfigError(f"{key}: {idx} stores tokens of dtype code {code}, not an integer type")
    dtype = np.dtype(DTYPES[code])
    offset = len(MAGIC) + _HEADER.size
    if len(raw) < offset + num_seq * 12 + num_doc * 8 or num_doc < 1:
        raise ConfigError(f"{key}: {idx} is truncated ({len(raw)} bytes for {num_seq} sequences)")
    lengths = np.frombuffer(raw, np.int32, num_seq, offset).astype(np.int64)
    pointers = np.frombuffer(raw, np.int64, num_seq, offset + num_seq * 4)
    boundaries = np.frombuffer(raw, np.int64, num_doc, offset + num_seq * 12)
    # Megatron writes sequences back to back; that is what lets documents be read as one stream.
    expected = np.concatenate([[0], np.cumsum(lengths)]) * dtype.itemsize
    if (lengths < 0).any() or not np.array_equal(pointers, expected[:-1]):
        raise ConfigError(f"{key}: {idx} describes sequences that are not stored back to back")
    if boundaries[0] != 0 or boundaries[-1] != num_seq or (np.diff(boundaries) < 0).any():
        raise ConfigError(f"{key}: {idx} has document boundaries outside its {num_seq} sequences")
    if bin_path.stat().st_size < expected[-1]:
        raise ConfigError(f"{key}: {bin_path} is truncated ({bin_path.stat().st_size} bytes, the index "
                          f"describes {int(expected[-1])})")
    return IndexedPair(bin_path, dtype, expected[boundaries] // dtype.itemsize)


def max_token(pair: IndexedPair, chunk: int = 1 << 26) -> int:
    """The largest token id in the pair, read in chunks (bounded memory)."""
    top = 0
    for start in range(0, pair.num_tokens, chunk):
        top = max(top, int(pair.tokens(start, min(chunk, pair.num_tokens - start)).max()))
    return top
