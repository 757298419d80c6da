"""The packed data a job trains on: its sources tokenised into fixed-length blocks, cached on disk.

Cache layout under data.cache_dir (or $MINITRON_CACHE, ~/.cache/minitron):
    tokenizer-<key>/   the tokenizer the blocks were made with (given, or trained on a sample)
    <key>/             one source's blocks: train.bin, val.bin, meta.json (see build.py)
    indexed-<key>/     a Megatron .bin/.idx source: meta.json only; its blocks are read in place
    blend-<key>/       a blend of several sources: which source and row each block comes from
    file-digests/      content hashes of corpus files, memoised by path, size and mtime
Every key hashes everything its content depends on (source file contents, tokenizer, block
length, split), so a changed input never reuses stale blocks, and no key needs the corpus in
memory. Entries are built in a temporary directory and renamed: an interrupted build never looks
complete. Each entry's meta.json records its files' sizes and CRC-32s; an entry that no longer
matches them (a truncated copy, a flipped bit) is logged, removed and rebuilt when it is opened.
"""
import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List, Tuple

import numpy as np
import torch

from minitron.config import ConfigError, DataConfig
from minitron.data import blend, indexed
from minitron.data.build import build_entry, check_blocks, damage, write_atomically
from minitron.data.corpus import (Source, document_batches, fingerprint, is_validation, source_files,
                                  training_sources, validation_source)
from minitron.data.tokenizer import load_tokenizer, train_bpe_tokenizer

log = logging.getLogger(__name__)

CACHE_VERSION = 3  # 3: meta.json records file sizes and checksums (every entry has a meta.json)
TOKENIZER_FILES = ("tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab*", "merges.txt",
                   "*.model", "*.tiktoken")


@dataclass
class PackedData:
    train: np.ndarray
    """[num_blocks, seq_len] token ids, memory-mapped (or a blend of such): each rank reads only its
    own rows."""
    val: np.ndarray
    tokenizer_dir: Path
    cache_dir: Path

    def tokenizer(self):
        return load_tokenizer(str(self.tokenizer_dir))


def default_cache_root(cfg: DataConfig) -> Path:
    if cfg.cache_dir:
        return Path(cfg.cache_dir).expanduser()
    return Path(os.environ.get("MINITRON_CACHE", Path.home() / ".cache" / "minitron"))


def digest_memo_dir(cfg: DataConfig) -> Path:
    """Where file digests are memoised (corpus files, and the teacher's weights)."""
    return default_cache_root(cfg) / "file-digests"


def build_or_load(cfg: DataConfig, gang, seed: int = 0) -> PackedData:
    """The packed data for `cfg`. Rank 0 reads and tokenises while the other ranks wait; it
    broadcasts where the entries are (or the error it hit, so every rank fails with the same
    message). A node that cannot see them (a per-node cache directory) builds its own copy."""
    result = None
    if gang.rank == 0:
        try:
            result = ("ok", prepare(cfg, seed))
        except ConfigError as e:
            result = ("error", str(e))
            if gang.world_size == 1:
                raise
    status, layout = gang.broadcast_object(result)
    if status == "error":
        raise ConfigError(layout)
    failed = 0
    if gang.rank != 0 and gang.local_rank == 0 and not _sizes_match(layout):
        try:
            layout = prepare(cfg, seed)
        except ConfigError:
            failed = 1
    if gang.all_reduce_sum(torch.tensor([failed])).item():
        raise ConfigError("data.cache_dir: building the data cache failed on another node")
    return open_layout(layout)


def prepare(cfg: DataConfig, seed: int) -> dict:
    """Build whatever cache entries are missing or damaged; return where the job's data is."""
    root, memo = default_cache_root(cfg), digest_memo_dir(cfg)
    sources, val_source = training_sources(cfg), validation_source(cfg)
    fraction = 0.0 if val_source else cfg.val_fraction
    prints = [fingerprint(s, memo) for s in sources]
    tok_dir = _tokenizer_entry(cfg, root, sources, prints, fraction)
    tok = load_tokenizer(str(tok_dir))
    need = (True, val_source is None and len(sources) == 1)
    train_entries = [_source_entry(cfg, root, s, p, tok, tok_dir.name, fraction, need)
                     for s, p in zip(sources, prints)]
    val_entries = ([_source_entry(cfg, root, val_source, fingerprint(val_source, memo), tok, tok_dir.name, 1.0,
                                  (False, True))] if val_source else train_entries)
    weights = [s.weight for s in sources]
    layout = {"tokenizer_dir": str(tok_dir), "train": [str(e) for e in train_entries],
              "val": [str(e) for e in val_entries], "weights": weights, "cache_dir": str(train_entries[0])}
    if len(sources) > 1:
        layout["cache_dir"] = str(_blend_entry(root, layout, seed, own_val=val_source is None))
    return layout


def _sizes_match(layout: dict) -> bool:
    """Whether this node sees every entry of `layout` whole, by file sizes only. Rank 0 has just
    checksummed them: on a shared filesystem these are the same files, and every node re-reading a
    multi-GB cache would cost more than it guards. A node-local copy that is missing or of another
    size goes through `prepare`, which checksums it and rebuilds it."""
    entries = {layout["tokenizer_dir"], *layout["train"], *layout["val"], layout["cache_dir"]}  # val may be train
    return all(damage(Path(e), checksums=False) is None for e in entries)


def _reusable(entry: Path) -> bool:
    """Whether `entry` exists and matches its recorded sizes and checksums. A damaged entry is
    removed (with a warning) so the caller rebuilds it from its source."""
    if not entry.exists():
        return False
    problem = damage(entry)
    if problem is None:
        return True
    _discard(entry, problem)
    log.warning("data cache entry %s: %s; rebuilding", entry, problem)
    return False


def _discard(entry: Path, problem: str) -> None:
    # Moved aside first (a rename is atomic), so a concurrent job never opens a half-deleted entry.
    aside = None
    try:
        aside = Path(tempfile.mkdtemp(dir=entry.parent, prefix=f".{entry.name}-damaged-"))
        entry.rename(aside / entry.name)
    except FileNotFoundError:
        pass  # another job discarded it first
    except OSError as e:
        raise ConfigError(f"data.cache_dir: the cache entry {entry} is damaged ({problem}) and cannot be "
                          f"removed ({e.strerror}); delete it, or set data.cache_dir to a writable "
                          "directory") from None
    finally:
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)


def open_layout(layout: dict) -> PackedData:
    train = [open_blocks(Path(e), "train") for e in layout["train"]]
    val = [open_blocks(Path(e), "val") for e in layout["val"]]
    if len(train) > 1:
        blend_dir = Path(layout["cache_dir"])
        train = [blend.BlendedBlocks(train, *(np.load(blend_dir / f"train_{n}.npy", mmap_mode="r")
                                              for n in ("source", "row")))]
        if len(val) > 1:
            val = [blend.BlendedBlocks(val, *(np.load(blend_dir / f"val_{n}.npy", mmap_mode="r")
                                              for n in ("source", "row")))]
    if len(val[0]) == 0:
        raise ConfigError("data.val_fraction: the validation split holds no block; add documents, raise "
                          "data.val_fraction or set data.val_path")
    return PackedData(train=train[0], val=val[0], tokenizer_dir=Path(layout["tokenizer_dir"]),
                      cache_dir=Path(layout["cache_dir"]))


def open_blocks(entry: Path, split: str) -> np.ndarray:
    meta = json.loads((entry / "meta.json").read_text())
    blocks, seq_len, dtype = meta[f"{split}_blocks"], meta["seq_len"], np.dtype(meta["dtype"])
    if blocks == 0:
        return np.empty((0, seq_len), dtype)
    file = entry / meta.get(f"{split}_file", f"{split}.bin")  # an absolute path (indexed) stays as it is
    return np.memmap(file, dtype=dtype, mode="r", offset=meta.get(f"{split}_offset", 0) * dtype.itemsize,
                     shape=(blocks, seq_len))


def _key(spec: dict) -> str:
    return hashlib.sha256(json.dumps({"v": CACHE_VERSION, **spec}, sort_keys=True).encode()).hexdigest()[:20]


def _tokenizer_entry(cfg: DataConfig, root: Path, sources: List[Source], prints: List[str],
                     fraction: float) -> Path:
    """A copy of the given tokenizer (keyed by its files), or one trained on the sample (keyed by
    the sample's inputs)."""
    if cfg.tokenizer:
        path = Path(cfg.tokenizer).expanduser()
        files = sorted({f for pattern in TOKENIZER_FILES for f in path.glob(pattern) if f.is_file()}) \
            if path.is_dir() else []
        spec = {"tokenizer": None if files else cfg.tokenizer,
                "files": [[f.name, hashlib.sha256(f.read_bytes()).hexdigest()] for f in files]}
    else:
        spec = {"vocab_size": cfg.vocab_size, "sample": cfg.tokenizer_sample_bytes, "val_fraction": fraction,
                "sources": [[p, s.weight] for s, p in zip(sources, prints)]}
    entry = root / f"tokenizer-{_key(spec)}"

    def write(tmp: Path):
        tok = load_tokenizer(cfg.tokenizer) if cfg.tokenizer else train_bpe_tokenizer(
            _tokenizer_sample(sources, cfg.tokenizer_sample_bytes, fraction), cfg.vocab_size)
        tok.save_pretrained(tmp)

    if not _reusable(entry):
        write_atomically(entry, write)
    return entry


def _tokenizer_sample(sources: List[Source], budget: int, fraction: float) -> Iterator[str]:
    """The first `budget` characters of the training split, shared among sources by weight.
    Matches the blocks' split exactly, including the one document a corpus with no validation
    document by hash gives to validation (the last; see build.py)."""
    total_weight = sum(s.weight for s in sources)
    for source in sources:
        share, taken, count, held, saw_val, capped = budget * source.weight / total_weight, 0, 0, None, False, False
        for batch in document_batches(source):
            for doc in batch:
                if fraction and is_validation(doc, fraction):
                    saw_val = True
                    continue
                if taken >= share:
                    capped = True
                    break
                if held is not None:
                    yield held
                held, taken, count = doc, taken + len(doc), count + 1
            if capped:
                break
        if held is not None and (capped or saw_val or count == 1 or not fraction):
            yield held


def _source_entry(cfg: DataConfig, root: Path, source: Source, print_: str, tok, tok_key: str,
                  fraction: float, need: Tuple[bool, bool]) -> Path:
    spec = {"source": print_, "tokenizer": tok_key, "seq_len": cfg.seq_len, "val_fraction": fraction}
    if source.kind == "indexed":
        entry = root / f"indexed-{_key(spec)}"
        if not _reusable(entry):
            write_atomically(entry, lambda tmp: _index_meta(tmp, source, tok, cfg.seq_len, fraction, need))
        return entry
    entry = root / _key(spec)
    if not _reusable(entry):
        total = sum(f.stat().st_size for f in source_files(source)) if source.kind == "files" else None
        build_entry(entry, document_batches(source), tok, cfg.seq_len, fraction, _num_proc(cfg), source.key,
                    need, label=Path(source.describe()).name, total_chars=total,
                    extra_meta={"source": source.describe(), "tokenizer": tok_key})
    return entry


def _index_meta(out: Path, source: Source, tok, seq_len: int, fraction: float, need) -> None:
    """A Megatron pair's blocks are read where they are: train is its first documents, validation
    its last `fraction` of documents (Megatron splits by document ranges too)."""
    pair = indexed.open_pair(source.path, source.key)
    top = indexed.max_token(pair)
    if top >= len(tok):
        raise ConfigError(f"data.tokenizer: {source.path}.bin holds token id {top}, outside the tokenizer's "
                          f"{len(tok)} tokens; set data.tokenizer to the tokenizer that wrote it")
    n_val = 0 if fraction == 0 else pair.num_documents if fraction >= 1 else \
        min(pair.num_documents - 1, math.ceil(fraction * pair.num_documents))
    split = int(pair.document_starts[pair.num_documents - n_val])
    meta = {"seq_len": seq_len, "dtype": pair.dtype.name, "source": source.path, "vocab_size": len(tok),
            "train_file": str(pair.bin_path), "train_offset": 0, "train_blocks": split // seq_len,
            "val_file": str(pair.bin_path), "val_offset": split, "val_blocks": (pair.num_tokens - split) // seq_len,
            "train_documents": pair.num_documents - n_val, "val_documents": n_val,
            "train_tokens": split, "val_tokens": pair.num_tokens - split}
    check_blocks(meta, need, source.key)
    (out / "meta.json").write_text(json.dumps(meta, indent=2))


def _blend_entry(root: Path, layout: dict, seed: int, own_val: bool) -> Path:
    """Which source and row each blended block comes from, computed once and memory-mapped."""
    sizes = {split: [json.loads((Path(e) / "meta.json").read_text())[f"{split}_blocks"] for e in layout[split]]
             for split in ("train", "val")}
    entry = root / f"blend-{_key({'parts': layout['train'], 'val': layout['val'], 'weights': layout['weights'], 'seed': seed})}"

    def write(tmp: Path):
        for split, shuffle in (("train", True), ("val", False)):
            if split == "val" and not own_val:
                continue
            source, row = blend.blend_index(sizes[split], layout["weights"], seed, shuffle)
            np.save(tmp / f"{split}_source.npy", source.astype(np.int16))
            np.save(tmp / f"{split}_row.npy", row)
        (tmp / "meta.json").write_text(json.dumps({"train_blocks": int(sum(sizes["train"])),
                                                   "weights": layout["weights"], "parts": layout["train"]}, indent=2))

    if not _reusable(entry):
        write_atomically(entry, write)
    return entry


def _num_proc(cfg: DataConfig) -> int:
    if cfg.num_proc:
        return cfg.num_proc
    return max(1, min(16, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))
