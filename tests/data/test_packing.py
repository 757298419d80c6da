import numpy as np
import pytest

from minitron.config import ConfigError, DataConfig
from minitron.data.corpus import load_documents
from minitron.data.packing import build_or_load, pack_documents
from minitron.data.tokenizer import load_tokenizer, train_bpe_tokenizer
from minitron.dist.gang import LocalGang


def test_trained_tokenizer_round_trips_and_reloads(tmp_path, corpus_dir):
    docs = load_documents(DataConfig(path=str(corpus_dir)))
    tok = train_bpe_tokenizer(docs, vocab_size=600)
    assert len(tok) == 600
    text = "def f(x):\n    return x ** 2  # ünïcode\n"
    assert tok.decode(tok(text)["input_ids"]) == text
    tok.save_pretrained(tmp_path / "tok")
    again = load_tokenizer(str(tmp_path / "tok"))
    assert again(text)["input_ids"] == tok(text)["input_ids"] and again.eos_token_id == tok.eos_token_id


def test_packing_puts_eos_after_every_document(corpus_dir):
    tok = train_bpe_tokenizer(load_documents(DataConfig(path=str(corpus_dir))), vocab_size=400)
    docs = ["alpha beta", "gamma", "delta epsilon zeta"]
    blocks = pack_documents(docs, tok, seq_len=3)
    stream = [t for d in docs for t in (*tok(d)["input_ids"], tok.eos_token_id)]
    assert blocks.shape == (len(stream) // 3, 3)
    assert blocks.ravel().tolist() == stream[: blocks.size]
    assert (blocks == tok.eos_token_id).sum() == sum(1 for t in stream[: blocks.size] if t == tok.eos_token_id)


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
    assert not list(tmp_path.glob(".*"))  # no temporary entries left behind


def test_corpus_too_small_for_one_block(tmp_path):
    (tmp_path / "d.txt").write_text("tiny")
    (tmp_path / "e.txt").write_text("also tiny")
    cfg = DataConfig(path=str(tmp_path), vocab_size=300, seq_len=256, cache_dir=str(tmp_path / "c"))
    with pytest.raises(ConfigError, match="^data.seq_len"):
        build_or_load(cfg, LocalGang())
    assert not (tmp_path / "c").exists() or not any((tmp_path / "c").iterdir())
