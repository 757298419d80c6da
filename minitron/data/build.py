"""Tokenise one source's documents into on-disk token files, with memory bounded by a few batches
whatever the corpus size.

Documents stream in batches of about a megabyte of text; worker processes tokenise them and split
each batch into train and validation tokens (EOS after every document); the parent appends the
results to `train.bin` and `val.bin` in document order, so the files are exactly what tokenising
the whole corpus at once and concatenating would give. Small corpora never start the workers.

Every cache entry's meta.json records the size and CRC-32 of each of its files (`seal`), so an
entry truncated or corrupted after it was written is found when it is opened (`damage`) and
rebuilt, never read as tokens.
"""
import gc
import json
import logging
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
import zlib
from collections import deque
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable, Iterator, List, Optional, Tuple

import numpy as np

from minitron import progress
from minitron.config import ConfigError
from minitron.data.corpus import is_validation

log = logging.getLogger(__name__)

POOL_AFTER_CHARS = 4 << 20  # tokenise in-process until the corpus proves larger than this
IN_FLIGHT_PER_WORKER = 2  # batches queued per worker: keeps workers busy, memory bounded
CHECKSUM_CHUNK = 8 << 20  # bytes read at a time when checksumming: memory stays flat for any file size

Encoded = Tuple[np.ndarray, np.ndarray, int, int, int]
"""(train tokens, validation tokens, train documents, validation documents, tokens of the batch's
last training document), EOS included."""


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


def encode(docs: List[str], tokenizer, dtype: np.dtype, val_fraction: float) -> Encoded:
    """Tokenise a batch; `val_fraction` 0 sends every document to train, 1 every one to validation."""
    ids = tokenizer(docs, add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    flags = [is_validation(d, val_fraction) if 0 < val_fraction < 1 else val_fraction >= 1 for d in docs]
    parts = ([], [])
    for doc_ids, to_val in zip(ids, flags):
        parts[to_val].append(doc_ids)
    train, val = (np.fromiter((t for doc in part for t in (*doc, eos)), dtype=dtype) for part in parts)
    last_train = len(parts[0][-1]) + 1 if parts[0] else 0
    return train, val, len(parts[0]), len(parts[1]), last_train


def build_entry(entry: Path, batches: Iterable[List[str]], tokenizer, seq_len: int, val_fraction: float,
                num_proc: int, key: str, need: Tuple[bool, bool], label: str, total_chars: Optional[int] = None,
                extra_meta: Optional[dict] = None) -> None:
    """Write a cache entry (`train.bin`, `val.bin`, `meta.json`) at `entry`, atomically.
    `need` says which of (train, validation) must have at least one block."""
    def write(tmp: Path):
        meta = _tokenise(tmp, batches, tokenizer, seq_len, val_fraction, num_proc, total_chars, label)
        check_blocks(meta, need, key)
        meta.update(extra_meta or {})
        log.info("data: %s documents, %s tokens of %s in %.1f s -> %s",
                 f"{meta['train_documents'] + meta['val_documents']:,}",
                 f"{meta['train_tokens'] + meta['val_tokens']:,}", key, meta["build_seconds"], entry)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))

    write_atomically(entry, write)


def check_blocks(meta: dict, need: Tuple[bool, bool], key: str) -> None:
    """An entry's (train, validation) sides that `need` blocks have at least one."""
    for split, needed in zip(("train", "val"), need):
        if needed and meta[f"{split}_blocks"] == 0:
            side = "training" if split == "train" else "validation"
            hint = "add documents or raise data.val_fraction" if split == "val" else "add documents"
            raise ConfigError(f"data.seq_len: the {side} split of {key} has fewer than {meta['seq_len']} tokens "
                              f"(one block); {hint}")


def write_atomically(entry: Path, write: Callable[[Path], None]) -> None:
    """`write` fills a temporary directory beside `entry`, which is sealed and then renamed to it:
    an interrupted write never looks complete."""
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=entry.parent, prefix=f".{entry.name}-"))
    try:
        write(tmp)
        seal(tmp)
        if entry.exists():  # a concurrent builder finished first; its entry is identical
            shutil.rmtree(tmp)
        else:
            tmp.rename(entry)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def seal(entry: Path) -> None:
    """Record the size and CRC-32 of every file of `entry` under "files" in its meta.json (made if
    the entry has none, as a tokenizer's has not), and a CRC-32 of meta.json's own content."""
    meta_file = entry / "meta.json"
    meta = json.loads(meta_file.read_text()) if meta_file.exists() else {}
    meta["files"] = {f.name: {"bytes": f.stat().st_size, "crc32": crc32_of(f)}
                     for f in sorted(entry.iterdir()) if f.is_file() and f.name != "meta.json"}
    meta["meta_crc32"] = _meta_crc32(meta)
    meta_file.write_text(json.dumps(meta, indent=2))


def damage(entry: Path, checksums: bool = True) -> Optional[str]:
    """What is wrong with a sealed entry, or None if nothing is: a missing or altered meta.json, or
    a file missing, of another size or (with `checksums`) of another CRC-32 than recorded. Sizes
    are all compared first: a truncated file is found without reading any data."""
    try:
        meta = json.loads((entry / "meta.json").read_text())
        files = meta["files"]
        if meta["meta_crc32"] != _meta_crc32(meta):
            return "meta.json does not match its recorded CRC-32"
    except FileNotFoundError:
        return "meta.json is missing"
    except (ValueError, KeyError, TypeError):  # UnicodeDecodeError is a ValueError
        return "meta.json is unreadable or records no checksums"
    for name, want in files.items():
        file = entry / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != want["bytes"]:
            return f"{name} is {file.stat().st_size:,} bytes, expected {want['bytes']:,}"
    for name, want in files.items() if checksums else ():
        if crc32_of(entry / name) != want["crc32"]:
            return f"{name} does not match its recorded CRC-32 (same size, different content)"
    return None


def crc32_of(file: Path) -> str:
    """CRC-32 of a file, read in chunks (zlib runs at GB/s: a 14 MB entry takes milliseconds).
    It guards against truncation and bit rot, not against tampering, which needs no guarding here."""
    crc = 0
    with file.open("rb") as f:
        while chunk := f.read(CHECKSUM_CHUNK):
            crc = zlib.crc32(chunk, crc)
    return f"{crc:08x}"


def _meta_crc32(meta: dict) -> str:
    """meta.json's own checksum: over its other keys, so a flipped digit in a block count is found."""
    rest = {k: v for k, v in meta.items() if k != "meta_crc32"}
    return f"{zlib.crc32(json.dumps(rest, sort_keys=True).encode()):08x}"


def _tokenise(out: Path, batches, tokenizer, seq_len, val_fraction, num_proc, total_chars, label) -> dict:
    dtype = token_dtype(len(tokenizer))
    counts = {"train_documents": 0, "val_documents": 0, "train_tokens": 0, "val_tokens": 0, "characters": 0}
    last_train = 0
    start = time.perf_counter()
    bar = progress.bar(total_chars, f"tokenise {label}", unit="char", unit_scale=True)
    with (out / "train.bin").open("wb") as train_file, (out / "val.bin").open("wb") as val_file, _serial_tokenizers():
        work = _encode_all(batches, lambda docs: encode(docs, tokenizer, dtype, val_fraction),
                           (tokenizer, dtype, val_fraction), num_proc)
        for chars, (train, val, n_train, n_val, last) in work:
            train.tofile(train_file)
            val.tofile(val_file)
            counts["train_documents"] += n_train
            counts["val_documents"] += n_val
            counts["train_tokens"] += len(train)
            counts["val_tokens"] += len(val)
            counts["characters"] += chars
            last_train = last or last_train
            bar.update(chars)
            seconds = time.perf_counter() - start
            bar.set_postfix_str(f"{counts['train_documents'] + counts['val_documents']:,} docs, "
                                f"{(counts['train_tokens'] + counts['val_tokens']) / seconds:,.0f} tok/s", refresh=False)
    bar.update(max(0, (bar.total or 0) - bar.n))  # the total was an estimate (file bytes)
    bar.close()
    if counts["val_documents"] == 0 and counts["train_documents"] > 1 and 0 < val_fraction < 1:
        _move_last_document_to_val(out, dtype, counts, last_train)
    meta = {"seq_len": seq_len, "dtype": dtype.name, "vocab_size": len(tokenizer), **counts,
            "build_seconds": round(time.perf_counter() - start, 2)}
    for split in ("train", "val"):
        blocks = counts[f"{split}_tokens"] // seq_len
        os.truncate(out / f"{split}.bin", blocks * seq_len * dtype.itemsize)  # the tail under one block
        meta[f"{split}_blocks"] = blocks
    return meta


def _move_last_document_to_val(out: Path, dtype, counts: dict, length: int) -> None:
    """A corpus whose hash split sends nothing to validation still gets one validation document:
    the last training one."""
    start = counts["train_tokens"] - length
    last = np.fromfile(out / "train.bin", dtype=dtype, count=length, offset=start * dtype.itemsize)
    os.truncate(out / "train.bin", start * dtype.itemsize)
    last.tofile(out / "val.bin")
    counts.update(train_tokens=start, val_tokens=length, train_documents=counts["train_documents"] - 1,
                  val_documents=1)


def _encode_all(batches: Iterable[List[str]], encode_here: Callable, worker_args: tuple,
                num_proc: int) -> Iterator[Tuple[int, Encoded]]:
    """(characters, encoded) per batch, in order. In this process until POOL_AFTER_CHARS, then on
    `num_proc` workers with at most IN_FLIGHT_PER_WORKER batches each in flight."""
    batches = iter(batches)
    seen = 0
    for docs in batches:
        chars = sum(map(len, docs))
        yield chars, encode_here(docs)
        seen += chars
        if num_proc > 1 and seen >= POOL_AFTER_CHARS:
            break
    else:
        return
    # fork shares the tokenizer without pickling; tokenizers' thread pool is never started in
    # this process (see _serial_tokenizers), so forking is safe. Elsewhere, spawn.
    context = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
    gc.freeze()  # the workers' garbage collector then leaves inherited pages shared, not copied
    try:
        pool = context.Pool(num_proc, initializer=_init_worker, initargs=worker_args)
    finally:
        gc.unfreeze()
    with pool:
        pending = deque()
        for docs in batches:
            pending.append((sum(map(len, docs)), pool.apply_async(_encode_in_worker, (docs,))))
            if len(pending) >= num_proc * IN_FLIGHT_PER_WORKER:
                chars, result = pending.popleft()
                yield chars, result.get()
        while pending:
            chars, result = pending.popleft()
            yield chars, result.get()


_WORKER_ARGS = None


def _init_worker(tokenizer, dtype, val_fraction) -> None:
    global _WORKER_ARGS
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one process is one core
    _WORKER_ARGS = (tokenizer, dtype, val_fraction)


def _encode_in_worker(docs: List[str]) -> Encoded:
    return encode(docs, *_WORKER_ARGS)


@contextmanager
def _serial_tokenizers():
    """Tokenise on one thread here: `data.num_proc` alone says how many cores the build uses."""
    before = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = before
