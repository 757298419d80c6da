import json

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from minitron.config import ConfigError, DataConfig
from minitron.data.corpus import EMBEDDED_MAX_BYTES, check_source, embedded_documents, load_documents, split_documents


def test_local_formats_read_every_document(tmp_path):
    (tmp_path / "a.txt").write_text("first document")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "second"}) + "\n\n" + json.dumps({"text": "third"}) + "\n")
    pq.write_table(pa.table({"text": ["fourth", "fifth"]}), tmp_path / "c.parquet")
    (tmp_path / "ignored.bin").write_bytes(b"\x00\x01")
    assert load_documents(DataConfig(path=str(tmp_path))) == ["first document", "second", "third", "fourth", "fifth"]
    assert load_documents(DataConfig(path=str(tmp_path / "b.jsonl"))) == ["second", "third"]


def test_saved_datasets_directory_and_split(tmp_path):
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"content": ["x y", "z"]}),
                               "test": datasets.Dataset.from_dict({"content": ["held out"]})})
    dd.save_to_disk(str(tmp_path / "ds"))
    cfg = DataConfig(name=str(tmp_path / "ds"), text_field="content")
    assert load_documents(cfg) == ["x y", "z"]
    cfg.split = "test"
    assert load_documents(cfg) == ["held out"]
    cfg.split = "nope"
    with pytest.raises(ConfigError, match="^data.split"):
        load_documents(cfg)


def test_max_bytes_caps_the_corpus(tmp_path):
    for i in range(5):
        (tmp_path / f"{i}.txt").write_text("x" * 100)
    assert len(load_documents(DataConfig(path=str(tmp_path), max_bytes=250))) == 3


@pytest.mark.parametrize("content,key", [("", "data.path"), ('{"body": "x"}\n', "data.text_field"),
                                         ("{not json\n", "data.path")])
def test_bad_sources_name_the_key(tmp_path, content, key):
    (tmp_path / "d.jsonl").write_text(content)
    with pytest.raises(ConfigError, match=f"^{key}"):
        load_documents(DataConfig(path=str(tmp_path / "d.jsonl")))


def test_missing_path_is_caught_by_the_cheap_check(tmp_path):
    with pytest.raises(ConfigError, match="^data.path: no such file"):
        check_source(DataConfig(path=str(tmp_path / "missing")))


def test_split_is_by_document_hash_deterministic_and_stable():
    docs = [f"document number {i}" for i in range(400)]
    train, val = split_documents(docs, 0.1)
    assert 20 < len(val) < 60 and len(train) + len(val) == 400
    assert not set(train) & set(val)
    # Reordering and appending documents does not move any existing document across the split.
    train2, val2 = split_documents(list(reversed(docs)) + ["a new one"], 0.1)
    assert set(val) <= set(val2) and set(train) <= set(train2)


def test_embedded_corpus_is_the_standard_library_source():
    first = next(embedded_documents())
    assert "import" in first or "def " in first
    assert load_documents(DataConfig(max_bytes=100_000))  # non-empty, capped
    embedded = load_documents(DataConfig())
    assert EMBEDDED_MAX_BYTES <= sum(map(len, embedded)) < EMBEDDED_MAX_BYTES + 1_000_000


def test_user_corpora_are_not_capped_by_default(tmp_path):
    (tmp_path / "big.txt").write_text("y" * (EMBEDDED_MAX_BYTES + 10))
    (tmp_path / "more.txt").write_text("z")
    assert len(load_documents(DataConfig(path=str(tmp_path)))) == 2
