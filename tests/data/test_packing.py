import hashlib
import json

import numpy as np
import pytest

from conftest import corpus_texts
from minitron.config import ConfigError, DataConfig
from minitron.data import build
from minitron.data.corpus import is_validation
from minitron.data.packing import build_or_load
from minitron.data.tokenizer import load_tokenizer, train_bpe_tokenizer
from minitron.distributed.gang import LocalGang


def reference_blocks(docs, val_fraction, vocab_size, seq_len):
    """The data path as it was before streaming (all documents in memory), written out plainly:
    split by a hash of each document, the last training document to validation if none went
    there, a BPE trained on the training documents, EOS after every document, the tail dropped."""
    def to_val(doc):
        return int.from_bytes(hashlib.blake2b(doc.encode(), digest_size=8).digest(), "big") / 2**64 < val_fraction

    train, val = [d for d in docs if not to_val(d)], [d for d in docs if to_val(d)]
    if not val and len(train) > 1:
        val.append(train.pop())
    tok = train_bpe_tokenizer(train, vocab_size)

    def pack(part):
        stream = [t for ids in tok(part, add_special_tokens=False)["input_ids"] for t in (*ids, tok.eos_token_id)]
        n = len(stream) // seq_len
        return np.array(stream[: n * seq_len], dtype=np.uint16).reshape(n, seq_len)

    return pack(train), pack(val), tok


def test_trained_tokenizer_round_trips_and_reloads(tmp_path, corpus_dir):
    tok = train_bpe_tokenizer(iter(corpus_texts(corpus_dir)), vocab_size=600)
    assert len(tok) == 600
    text = "def f(x):\n    return x ** 2  # ünïcode\n"
    assert tok.decode(tok(text)["input_ids"]) == text
    tok.save_pretrained(tmp_path / "tok")
    again = load_tokenizer(str(tmp_path / "tok"))
    assert again(text)["input_ids"] == tok(text)["input_ids"] and again.eos_token_id == tok.eos_token_id


def test_encoding_puts_eos_after_every_document(corpus_dir):
    tok = train_bpe_tokenizer(corpus_texts(corpus_dir), vocab_size=400)
    docs = ["alpha beta", "gamma", "delta epsilon zeta"]
    train, val, n_train, n_val, last = build.encode(docs, tok, np.dtype(np.uint16), 0.0)
    stream = [t for d in docs for t in (*tok(d)["input_ids"], tok.eos_token_id)]
    assert train.tolist() == stream and len(val) == 0 and (n_train, n_val) == (3, 0)
    assert last == len(tok("delta epsilon zeta")["input_ids"]) + 1
    train, val, *_ = build.encode(docs, tok, np.dtype(np.uint16), 1.0)
    assert val.tolist() == stream and len(train) == 0


@pytest.mark.parametrize("val_fraction", [0.2, 0.01])  # 0.01: no document by hash, the last one moves
def test_blocks_are_identical_to_the_in_memory_path(tmp_path, corpus_dir, val_fraction):
    docs = corpus_texts(corpus_dir)
    (tmp_path / "corpus.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    cfg = DataConfig(path=str(tmp_path / "corpus.jsonl"), vocab_size=512, seq_len=64, val_fraction=val_fraction,
                     cache_dir=str(tmp_path / "cache"))
    data = build_or_load(cfg, LocalGang())
    train, val, tok = reference_blocks(docs, val_fraction, 512, 64)
    np.testing.assert_array_equal(np.asarray(data.train), train)
    np.testing.assert_array_equal(np.asarray(data.val), val)
    assert data.tokenizer().get_vocab() == tok.get_vocab()
    meta = json.loads((data.cache_dir / "meta.json").read_text())
    assert meta["train_documents"] + meta["val_documents"] == len(docs) and meta["build_seconds"] >= 0
    assert meta["train_tokens"] >= train.size and meta["train_blocks"] == len(train)


def test_trained_tokenizer_learns_from_a_bounded_sample(tmp_path, corpus_dir):
    docs = corpus_texts(corpus_dir)
    (tmp_path / "corpus.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    cfg = DataConfig(path=str(tmp_path / "corpus.jsonl"), vocab_size=400, seq_len=64, tokenizer_sample_bytes=50_000,
                     cache_dir=str(tmp_path / "cache"))
    data = build_or_load(cfg, LocalGang())
    train_docs = [d for d in docs if not is_validation(d, cfg.val_fraction)]
    sample, total = [], 0
    for doc in train_docs:
        if total >= 50_000:
            break
        sample.append(doc)
        total += len(doc)
    assert len(sample) < len(train_docs)
    assert data.tokenizer().get_vocab() == train_bpe_tokenizer(sample, 400).get_vocab()
    assert data.tokenizer().get_vocab() != train_bpe_tokenizer(train_docs, 400).get_vocab()


def test_worker_processes_give_the_same_blocks(tmp_path, corpus_dir, monkeypatch):
    (tmp_path / "corpus.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in corpus_texts(corpus_dir)))
    tok_dir = tmp_path / "tok"
    train_bpe_tokenizer(corpus_texts(corpus_dir), 512).save_pretrained(tok_dir)

    def blocks(num_proc, cache):
        cfg = DataConfig(path=str(tmp_path / "corpus.jsonl"), tokenizer=str(tok_dir), seq_len=64,
                         num_proc=num_proc, cache_dir=str(tmp_path / cache))
        data = build_or_load(cfg, LocalGang())
        return np.asarray(data.train), np.asarray(data.val)

    one = blocks(1, "one")
    monkeypatch.setattr(build, "POOL_AFTER_CHARS", 20_000)  # workers start after the first batch
    monkeypatch.setattr("minitron.data.corpus.BATCH_CHARS", 30_000)  # many batches in flight
    two = blocks(2, "two")
    for a, b in zip(one, two):
        np.testing.assert_array_equal(a, b)


def test_cache_is_reused_and_keyed_by_inputs(tmp_path, corpus_dir):
    cfg = DataConfig(path=str(corpus_dir), vocab_size=512, seq_len=64, cache_dir=str(tmp_path))
    first = build_or_load(cfg, LocalGang())
    stamp = (first.cache_dir / "meta.json").stat().st_mtime_ns
    second = build_or_load(cfg, LocalGang())
    assert second.cache_dir == first.cache_dir
    assert (second.cache_dir / "meta.json").stat().st_mtime_ns == stamp
    np.testing.assert_array_equal(second.train, first.train)
    assert first.train.shape[1] == 64 and len(first.val) > 0
    assert first.tokenizer().eos_token_id is not None
    cfg.seq_len = 32
    assert build_or_load(cfg, LocalGang()).cache_dir != first.cache_dir
    cfg.seq_len = 64
    (corpus_dir / "doc00.jsonl").touch()  # a new mtime, same content: re-hashed, same entry
    assert build_or_load(cfg, LocalGang()).cache_dir == first.cache_dir
    assert not list(tmp_path.glob(".*"))  # no temporary entries left behind


def test_corpus_too_small_for_one_block(tmp_path):
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "d.txt").write_text("tiny")
    (tmp_path / "corpus" / "e.txt").write_text("also tiny")
    cfg = DataConfig(path=str(tmp_path / "corpus"), vocab_size=300, seq_len=256, cache_dir=str(tmp_path / "c"))
    with pytest.raises(ConfigError, match="^data.seq_len"):
        build_or_load(cfg, LocalGang())
    # No finished block entry (the tokenizer, trained before the check, is one), and no temporary
    # directory left behind.
    assert [m.parent.name[:10] for m in (tmp_path / "c").glob("*/meta.json")] == ["tokenizer-"]
    assert not list((tmp_path / "c").glob(".*"))


def test_one_big_text_file_has_a_validation_split(tmp_path, corpus_dir):
    (tmp_path / "corpus.txt").write_text("\n\n".join(corpus_texts(corpus_dir)) * 3)  # about 1.2 MB, one file
    cfg = DataConfig(path=str(tmp_path / "corpus.txt"), vocab_size=512, seq_len=64, cache_dir=str(tmp_path / "c"))
    data = build_or_load(cfg, LocalGang())
    meta = json.loads((data.cache_dir / "meta.json").read_text())
    assert meta["val_documents"] > 10 and len(data.val) > 10 and len(data.train) > 20 * len(data.val) / 2
    cfg.txt_documents = "file"  # the whole file is one document: nothing left for validation
    with pytest.raises(ConfigError, match="^data.seq_len: the validation split"):
        build_or_load(cfg, LocalGang())


def test_val_path_replaces_the_split(tmp_path, corpus_dir):
    texts = corpus_texts(corpus_dir)
    (tmp_path / "train.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in texts[:20]))
    (tmp_path / "val.txt").write_text("\n\n".join(texts[20:]))
    cfg = DataConfig(path=str(tmp_path / "train.jsonl"), val_path=str(tmp_path / "val.txt"), vocab_size=512,
                     seq_len=64, cache_dir=str(tmp_path / "c"))
    data = build_or_load(cfg, LocalGang())
    tok = data.tokenizer()
    stream = lambda docs: [t for ids in tok(docs, add_special_tokens=False)["input_ids"]  # noqa: E731
                           for t in (*ids, tok.eos_token_id)]
    train_stream, val_stream = stream(texts[:20]), stream([p for p in "\n\n".join(texts[20:]).split("\n\n") if p.strip()])
    assert np.asarray(data.train).ravel().tolist() == train_stream[: data.train.size]
    assert np.asarray(data.val).ravel().tolist() == val_stream[: data.val.size]
