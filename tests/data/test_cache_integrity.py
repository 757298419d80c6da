"""Cache entries record their files' sizes and checksums: a truncated or corrupted entry is found
when it is opened, rebuilt from its source, and never read as tokens (issue 13)."""
import json
import logging
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import compose_job, corpus_texts, run_cli, tiny_args
from minitron.config import ConfigError, DataConfig, DataSource
from minitron.data.build import damage, seal
from minitron.data.packing import build_or_load, open_layout, prepare
from minitron.distributed.gang import LocalGang


def truncate(file):
    os.truncate(file, file.stat().st_size // 2)


def flip_middle_byte(file):
    """Same size, one byte different: only a checksum can tell."""
    raw = bytearray(file.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    file.write_bytes(bytes(raw))


def blend_config(tmp_path, corpus_dir) -> DataConfig:
    """Two sources, so the cache holds every kind of entry: tokenizer, source blocks, blend."""
    docs = corpus_texts(corpus_dir)
    for name, part in (("alpha", docs[::2]), ("beta", docs[1::2])):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in part))
    return DataConfig(sources=[DataSource(path=str(tmp_path / "alpha.jsonl"), weight=0.7),
                               DataSource(path=str(tmp_path / "beta.jsonl"), weight=0.3)],
                      vocab_size=512, seq_len=64, cache_dir=str(tmp_path / "cache"))


def snapshot(layout: dict):
    """Copies of what a job reads (the memory maps are dropped before any file is damaged)."""
    data = open_layout(layout)
    return np.array(data.train[:]), np.array(data.val[:]), data.tokenizer().get_vocab()


def damage_warnings(caplog) -> list:
    return [r.getMessage() for r in caplog.records
            if r.name == "minitron.data.packing" and r.levelno == logging.WARNING]


ENTRIES = {"tokens": lambda layout: layout["train"][0], "tokenizer": lambda layout: layout["tokenizer_dir"],
           "blend": lambda layout: layout["cache_dir"]}


# Each kind of entry and file once, both harms across them (every pair would cost the suite 10 builds).
@pytest.mark.parametrize("entry_kind, file_name, harm", [("tokens", "train.bin", truncate),
                                                        ("tokens", "val.bin", flip_middle_byte),
                                                        ("tokens", "meta.json", flip_middle_byte),
                                                        ("tokenizer", "tokenizer.json", truncate),
                                                        ("blend", "train_row.npy", flip_middle_byte)])
def test_a_damaged_entry_is_rebuilt_with_the_same_content(tmp_path, corpus_dir, caplog, harm, entry_kind,
                                                          file_name):
    cfg = blend_config(tmp_path, corpus_dir)
    layout = prepare(cfg, seed=0)
    train, val, vocab = snapshot(layout)
    entry = ENTRIES[entry_kind](layout)
    file = Path(entry) / file_name
    size = file.stat().st_size
    harm(file)
    assert damage(file.parent) is not None

    with caplog.at_level(logging.WARNING):
        data = build_or_load(cfg, LocalGang())
    warnings = damage_warnings(caplog)
    assert len(warnings) == 1 and "\n" not in warnings[0]
    assert warnings[0].startswith(f"data cache entry {entry}: {file_name} ") and warnings[0].endswith("; rebuilding")
    assert damage(file.parent) is None
    assert file.stat().st_size == size or file_name == "meta.json"  # meta.json records the build's seconds
    np.testing.assert_array_equal(np.array(data.train[:]), train)
    np.testing.assert_array_equal(np.array(data.val[:]), val)
    assert data.tokenizer().get_vocab() == vocab
    assert not list((tmp_path / "cache").glob(".*"))  # the damaged copy is gone, no temp dir left


def test_truncation_names_both_sizes(tmp_path, corpus_dir, caplog):
    cfg = DataConfig(path=str(corpus_dir), vocab_size=512, seq_len=64, cache_dir=str(tmp_path / "cache"))
    entry = build_or_load(cfg, LocalGang()).cache_dir
    size = (entry / "train.bin").stat().st_size
    os.truncate(entry / "train.bin", 1000)
    with caplog.at_level(logging.WARNING):
        build_or_load(cfg, LocalGang())
    assert damage_warnings(caplog) == [f"data cache entry {entry}: train.bin is 1,000 bytes, expected {size:,}; "
                                       "rebuilding"]


def test_an_intact_entry_is_reused_without_a_warning(tmp_path, corpus_dir, caplog):
    cfg = DataConfig(path=str(corpus_dir), vocab_size=512, seq_len=64, cache_dir=str(tmp_path / "cache"))
    entry = build_or_load(cfg, LocalGang()).cache_dir
    stamp = (entry / "train.bin").stat().st_mtime_ns
    meta = json.loads((entry / "meta.json").read_text())
    assert set(meta["files"]) == {"train.bin", "val.bin"}
    assert meta["files"]["train.bin"]["bytes"] == meta["train_blocks"] * 64 * 2  # uint16 tokens
    with caplog.at_level(logging.WARNING):
        assert build_or_load(cfg, LocalGang()).cache_dir == entry
    assert not damage_warnings(caplog) and (entry / "train.bin").stat().st_mtime_ns == stamp


def test_another_node_rebuilds_its_own_truncated_copy(tmp_path, corpus_dir, caplog):
    """Rank 0 checksums its entries; a node with its own cache directory (here: rank 8, the first of
    its node, given rank 0's layout) finds its copy truncated and rebuilds it before reading."""
    cfg = DataConfig(path=str(corpus_dir), vocab_size=512, seq_len=64, cache_dir=str(tmp_path / "cache"))
    layout = prepare(cfg, seed=0)
    train = snapshot(layout)[0]
    os.truncate(Path(layout["cache_dir"]) / "train.bin", 64 * 2 * 3)

    class SecondNode:
        """What rank 8 of 16 sees: rank 0's layout broadcast, no other node failing."""
        rank, world_size, local_rank = 8, 16, 0

        def broadcast_object(self, obj):
            return "ok", layout

        def all_reduce_sum(self, tensor):
            return tensor

    with caplog.at_level(logging.WARNING):
        data = build_or_load(cfg, SecondNode())
    assert len(damage_warnings(caplog)) == 1
    np.testing.assert_array_equal(np.array(data.train[:]), train)


def test_a_gone_source_with_a_damaged_cache_is_a_one_line_config_error(tmp_path, corpus_dir):
    corpus = tmp_path / "corpus"
    shutil.copytree(corpus_dir, corpus)
    cfg = DataConfig(path=str(corpus), vocab_size=512, seq_len=64, cache_dir=str(tmp_path / "cache"))
    entry = build_or_load(cfg, LocalGang()).cache_dir
    shutil.rmtree(corpus)
    truncate(entry / "train.bin")
    with pytest.raises(ConfigError) as error:
        build_or_load(cfg, LocalGang())
    assert str(error.value).startswith("data.path: ") and str(corpus) in str(error.value)
    assert "\n" not in str(error.value)


def test_checksumming_a_14_mb_entry_takes_well_under_a_second(tmp_path):
    entry = tmp_path / "entry"
    entry.mkdir()
    np.random.default_rng(0).integers(0, 2**16, size=7 << 20, dtype=np.uint16).tofile(entry / "train.bin")
    (entry / "meta.json").write_text("{}")
    seal(entry)
    started = time.perf_counter()
    assert damage(entry) is None
    assert time.perf_counter() - started < 0.25
    flip_middle_byte(entry / "train.bin")
    assert "CRC-32" in damage(entry)


def test_a_training_run_rebuilds_a_truncated_cache_entry_and_trains(tmp_path, corpus_dir):
    """The acceptance test: the CLI's own cache entry is built, truncated, and the next run trains."""
    args = tiny_args(corpus_dir, tmp_path / "run", "train.max_steps=2", "train.eval_every=2",
                     f"data.cache_dir={tmp_path / 'cache'}")
    job = compose_job("train", *args)
    entry = build_or_load(job.data, LocalGang(), job.seed).cache_dir
    size = (entry / "train.bin").stat().st_size
    truncate(entry / "train.bin")

    proc = run_cli(args)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["data_cache"] == str(entry) and np.isfinite(summary["val_loss"])
    assert (entry / "train.bin").stat().st_size == size and damage(entry) is None
    logs = proc.stdout + proc.stderr + "".join(f.read_text() for f in (tmp_path / "run").glob("*.log"))
    assert f"data cache entry {entry}: train.bin is {size // 2:,} bytes, expected {size:,}; rebuilding" in logs
