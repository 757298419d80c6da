"""Tokenise documents, pack them into fixed-length blocks, and cache the result on disk.

The cache key hashes everything the blocks depend on (document texts, split, tokenizer, block
length), so a changed input never reuses stale blocks. Entries are written to a temporary
directory and renamed, so an interrupted build never looks complete.
"""
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import List

import numpy as np

from minitron.config import ConfigError, DataConfig
from minitron.data.corpus import load_documents, split_documents
from minitron.data.tokenizer import load_tokenizer, train_bpe_tokenizer

CACHE_VERSION = 1


@dataclass
class PackedData:
    train: np.ndarray
    """[num_blocks, seq_len] token ids, memory-mapped: each rank reads only its own rows."""
    val: np.ndarray
    tokenizer_dir: Path
    cache_dir: Path

    def tokenizer(self):
        return load_tokenizer(str(self.tokenizer_dir))


def default_cache_root(cfg: DataConfig) -> Path:
    if cfg.cache_dir:
        return Path(cfg.cache_dir).expanduser()
    return Path(os.environ.get("MINITRON_CACHE", Path.home() / ".cache" / "minitron"))


def pack_documents(docs: List[str], tokenizer, seq_len: int) -> np.ndarray:
    """Concatenate documents with EOS after each, then cut into [N, seq_len] blocks (the tail
    shorter than one block is dropped)."""
    eos = tokenizer.eos_token_id
    ids = tokenizer(docs, add_special_tokens=False)["input_ids"]
    dtype = np.uint16 if len(tokenizer) <= 2**16 else np.uint32
    stream = np.fromiter((t for doc in ids for t in (*doc, eos)), dtype=dtype)
    num_blocks = len(stream) // seq_len
    return stream[: num_blocks * seq_len].reshape(num_blocks, seq_len)


def cache_key(train: List[str], val: List[str], cfg: DataConfig) -> str:
    h = hashlib.sha256()
    spec = {"v": CACHE_VERSION, "seq_len": cfg.seq_len, "tokenizer": cfg.tokenizer,
            "vocab_size": None if cfg.tokenizer else cfg.vocab_size}
    if cfg.tokenizer and Path(cfg.tokenizer).expanduser().is_dir():
        for f in sorted(Path(cfg.tokenizer).expanduser().glob("*.json")):
            h.update(f.read_bytes())
    h.update(json.dumps(spec, sort_keys=True).encode())
    for name, docs in (("train", train), ("val", val)):
        h.update(name.encode())
        for doc in docs:
            h.update(hashlib.blake2b(doc.encode(), digest_size=16).digest())
    return h.hexdigest()[:20]


def build_or_load(cfg: DataConfig, gang) -> PackedData:
    """Return the packed data for `cfg`. Only rank 0 reads and tokenises; it broadcasts where the
    cache entry is (or the error it hit, so every rank fails with the same message)."""
    result = None
    if gang.rank == 0:
        try:
            docs = load_documents(cfg)
            train_docs, val_docs = split_documents(docs, cfg.val_fraction)
            entry = default_cache_root(cfg) / cache_key(train_docs, val_docs, cfg)
            if not (entry / "meta.json").exists():
                _build_entry(entry, train_docs, val_docs, cfg)
            result = ("ok", str(entry))
        except ConfigError as e:
            result = ("error", str(e))
            if gang.world_size == 1:
                raise
    status, value = gang.broadcast_object(result)
    if status == "error":
        raise ConfigError(value)
    return _open_entry(Path(value))


def _build_entry(entry: Path, train_docs: List[str], val_docs: List[str], cfg: DataConfig) -> None:
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=entry.parent, prefix=f".{entry.name}-"))
    try:
        tok = load_tokenizer(cfg.tokenizer) if cfg.tokenizer else train_bpe_tokenizer(train_docs, cfg.vocab_size)
        tok.save_pretrained(tmp / "tokenizer")
        train = pack_documents(train_docs, tok, cfg.seq_len)
        val = pack_documents(val_docs, tok, cfg.seq_len)
        if len(train) == 0:
            raise ConfigError(f"data.seq_len: the training split has fewer than {cfg.seq_len} tokens (one block)")
        if len(val) == 0:
            raise ConfigError(f"data.seq_len: the validation split has fewer than {cfg.seq_len} tokens "
                              "(one block); add documents or raise data.val_fraction")
        np.save(tmp / "train.npy", train)
        np.save(tmp / "val.npy", val)
        meta = {"train_blocks": len(train), "val_blocks": len(val), "seq_len": cfg.seq_len,
                "train_documents": len(train_docs), "val_documents": len(val_docs),
                "vocab_size": len(tok)}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        if entry.exists():  # a concurrent builder finished first; its entry is identical
            shutil.rmtree(tmp)
        else:
            tmp.rename(entry)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _open_entry(entry: Path) -> PackedData:
    return PackedData(
        train=np.load(entry / "train.npy", mmap_mode="r"),
        val=np.load(entry / "val.npy", mmap_mode="r"),
        tokenizer_dir=entry / "tokenizer",
        cache_dir=entry,
    )
