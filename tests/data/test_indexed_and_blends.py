import json
import struct

import numpy as np
import pytest

from conftest import corpus_texts
from minitron.config import ConfigError, DataConfig, DataSource
from minitron.data import indexed
from minitron.data.corpus import check_source
from minitron.data.packing import build_or_load
from minitron.data.sampler import BlockSampler
from minitron.data.tokenizer import train_bpe_tokenizer
from minitron.distributed.gang import LocalGang


def write_megatron_pair(prefix, documents, dtype=np.uint16):
    """A writer following Megatron Core's description of the format: each document one sequence,
    tokens back to back in .bin; the .idx header, lengths, byte pointers, document boundaries."""
    codes = {np.uint16: 8, np.int32: 4}
    lengths = np.array([len(d) for d in documents], dtype=np.int32)
    pointers = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64) * np.dtype(dtype).itemsize
    with open(f"{prefix}.bin", "wb") as f:
        for doc in documents:
            np.asarray(doc, dtype=dtype).tofile(f)
    with open(f"{prefix}.idx", "wb") as f:
        f.write(b"MMIDIDX\x00\x00" + struct.pack("<QBQQ", 1, codes[dtype], len(documents), len(documents) + 1))
        f.write(lengths.tobytes() + pointers.tobytes() + np.arange(len(documents) + 1, dtype=np.int64).tobytes())


@pytest.fixture
def tokenizer_dir(tmp_path, corpus_dir):
    train_bpe_tokenizer(corpus_texts(corpus_dir), 512).save_pretrained(
        tmp_path / "tok")
    return tmp_path / "tok"


def test_megatron_pair_reads_back_the_exact_tokens(tmp_path, tokenizer_dir):
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 512, size=rng.integers(5, 300)) for _ in range(120)]
    write_megatron_pair(tmp_path / "corpus_text_document", docs)
    pair = indexed.open_pair(str(tmp_path / "corpus_text_document"))
    assert pair.num_documents == 120
    for i in (0, 7, 119):
        np.testing.assert_array_equal(pair.tokens(int(pair.document_starts[i]), len(docs[i])), docs[i])
    cfg = DataConfig(path=str(tmp_path / "corpus_text_document"), tokenizer=str(tokenizer_dir), seq_len=32,
                     val_fraction=0.1, cache_dir=str(tmp_path / "c"))
    check_source(cfg)
    data = build_or_load(cfg, LocalGang())
    stream = np.concatenate(docs)
    split = sum(len(d) for d in docs[:108])  # the last 10% of documents (12) are validation
    np.testing.assert_array_equal(np.asarray(data.train).ravel(), stream[: data.train.size])
    assert data.train.size == split // 32 * 32
    np.testing.assert_array_equal(np.asarray(data.val).ravel(), stream[split: split + data.val.size])
    # The prefix may be given with either suffix too.
    cfg.path = str(tmp_path / "corpus_text_document.bin")
    assert build_or_load(cfg, LocalGang()).cache_dir == data.cache_dir


def test_broken_megatron_pairs_name_data_path(tmp_path, tokenizer_dir):
    write_megatron_pair(tmp_path / "a", [list(range(100))] * 4)
    prefix = str(tmp_path / "a")

    def fails(message, **data):
        with pytest.raises(ConfigError, match=f"^{message}"):
            check_source(DataConfig(path=prefix, **data))

    fails("data.tokenizer: .*Megatron .bin/.idx pair")  # tokens need the tokenizer that wrote them
    raw = (tmp_path / "a.idx").read_bytes()
    (tmp_path / "a.idx").write_bytes(b"NOTANIDX!" + raw[9:])
    fails("data.path: .*a.idx is not a Megatron index", tokenizer=str(tokenizer_dir))
    (tmp_path / "a.idx").write_bytes(raw)
    (tmp_path / "a.bin").write_bytes((tmp_path / "a.bin").read_bytes()[:300])
    fails("data.path: .*a.bin is truncated", tokenizer=str(tokenizer_dir))
    (tmp_path / "a.idx").write_bytes(raw[:60])
    fails("data.path: .*a.idx is truncated", tokenizer=str(tokenizer_dir))
    write_megatron_pair(tmp_path / "big", [[0, 5000, 7]] * 40)  # ids beyond the 512-token vocabulary
    with pytest.raises(ConfigError, match="^data.tokenizer: .*token id 5000"):
        build_or_load(DataConfig(path=str(tmp_path / "big"), tokenizer=str(tokenizer_dir), seq_len=8,
                                 cache_dir=str(tmp_path / "c")), LocalGang())


def write_jsonl(path, word, n):
    path.write_text("".join(json.dumps({"text": f"{word} {i} " * 40}) + "\n" for i in range(n)))


def test_blend_draws_sources_by_weight_deterministically(tmp_path, tokenizer_dir):
    write_jsonl(tmp_path / "alpha.jsonl", "alpha", 400)
    write_jsonl(tmp_path / "omega.jsonl", "omega", 150)  # fewer blocks: upsampled to its weight
    cfg = DataConfig(sources=[DataSource(path=str(tmp_path / "alpha.jsonl"), weight=0.8),
                              DataSource(path=str(tmp_path / "omega.jsonl"), weight=0.2)],
                     tokenizer=str(tokenizer_dir), seq_len=32, cache_dir=str(tmp_path / "c"))
    check_source(cfg)
    data = build_or_load(cfg, LocalGang(), seed=3)
    tok = data.tokenizer()
    alpha, omega = tok(" alpha")["input_ids"][0], tok(" omega")["input_ids"][0]

    def draws(blocks, world_size, seed=3, steps=100):
        rows = []
        for step in range(steps):
            for rank in range(world_size):
                sampler = BlockSampler(blocks, 16, 16 // world_size, rank, world_size, seed)
                rows.append(sampler.micro_batch(step, 0).numpy())
        return np.concatenate(rows)

    rows = draws(data.train, 1)
    from_alpha = np.array([(r == alpha).any() for r in rows])
    from_omega = np.array([(r == omega).any() for r in rows])
    assert not (from_alpha & from_omega).any() and (from_alpha | from_omega).all()
    n, p = len(rows), from_alpha.mean()
    assert abs(p - 0.8) < 3 * np.sqrt(0.8 * 0.2 / n), p  # 1600 draws: within three standard errors
    # The same seed gives the same draws after a reload from the cache, and on two processes.
    again = build_or_load(cfg, LocalGang(), seed=3)
    np.testing.assert_array_equal(draws(again.train, 1, steps=5), rows[:80])
    np.testing.assert_array_equal(draws(again.train, 2, steps=5), rows[:80])
    # Validation blends too, and in proportion from its first blocks on.
    first = np.asarray(data.val[:10])
    assert 7 <= sum((r == alpha).any() for r in first) <= 9


def test_blend_with_megatron_and_text_sources_and_a_val_path(tmp_path, tokenizer_dir):
    write_jsonl(tmp_path / "alpha.jsonl", "alpha", 200)
    write_megatron_pair(tmp_path / "ids", [np.arange(10, 60)] * 80)
    write_jsonl(tmp_path / "val.jsonl", "held out", 60)
    cfg = DataConfig(sources=[DataSource(path=str(tmp_path / "alpha.jsonl")), DataSource(path=str(tmp_path / "ids"))],
                     val_path=str(tmp_path / "val.jsonl"), tokenizer=str(tokenizer_dir), seq_len=32,
                     cache_dir=str(tmp_path / "c"))
    check_source(cfg)
    data = build_or_load(cfg, LocalGang())
    rows = np.asarray(data.train[:])
    tok = data.tokenizer()
    from_text = np.array([(r == tok(" alpha")["input_ids"][0]).any() for r in rows])
    from_ids = np.array([((10 <= r) & (r < 60)).all() for r in rows])
    assert not (from_text & from_ids).any() and (from_text | from_ids).all()
    assert from_ids.mean() == 0.5  # equal weights, exactly over the whole blend
    held = tok(" held")["input_ids"][0]
    assert all((r == held).any() for r in np.asarray(data.val))
