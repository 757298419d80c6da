import json

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from minitron.config import ConfigError, DataConfig, DataSource
from minitron.data.corpus import (EMBEDDED_MAX_BYTES, check_source, document_batches, embedded_documents,
                                  is_validation, training_sources)


def documents(cfg: DataConfig, source: int = 0) -> list:
    return [doc for batch in document_batches(training_sources(cfg)[source]) for doc in batch]


def test_local_formats_read_every_document(tmp_path):
    (tmp_path / "a.txt").write_text("first document")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "second"}) + "\n\n" + json.dumps({"text": "third"}) + "\n")
    pq.write_table(pa.table({"text": ["fourth", "fifth"]}), tmp_path / "c.parquet")
    (tmp_path / "ignored.bin").write_bytes(b"\x00\x01")
    assert documents(DataConfig(path=str(tmp_path))) == ["first document", "second", "third", "fourth", "fifth"]
    assert documents(DataConfig(path=str(tmp_path / "b.jsonl"))) == ["second", "third"]


def test_one_text_file_is_cut_into_documents_by_blank_lines(tmp_path):
    (tmp_path / "corpus.txt").write_text("first para\nstill first\n\nsecond para\n\n\nthird\n  \n\nfourth\n")
    cfg = DataConfig(path=str(tmp_path / "corpus.txt"))
    assert cfg.txt_documents == "paragraph"
    assert documents(cfg) == ["first para\nstill first", "second para", "\nthird\n  ", "fourth\n"]
    cfg.txt_documents = "line"
    assert documents(cfg) == ["first para", "still first", "second para", "third", "fourth"]
    cfg.txt_documents = "file"
    assert documents(cfg) == [(tmp_path / "corpus.txt").read_text()]
    cfg.txt_documents = "sentence"
    with pytest.raises(ConfigError, match="^data.txt_documents: must be one of paragraph, line, file"):
        check_source(cfg)


def test_saved_datasets_directory_and_split(tmp_path):
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"content": ["x y", "z"]}),
                               "test": datasets.Dataset.from_dict({"content": ["held out"]})})
    dd.save_to_disk(str(tmp_path / "ds"))
    cfg = DataConfig(name=str(tmp_path / "ds"), text_field="content")
    assert documents(cfg) == ["x y", "z"]
    cfg.split = "test"
    assert documents(cfg) == ["held out"]
    cfg.split = "nope"
    with pytest.raises(ConfigError, match="^data.split"):
        documents(cfg)


def test_max_bytes_caps_the_corpus(tmp_path):
    for i in range(5):
        (tmp_path / f"{i}.txt").write_text("x" * 100)
    assert len(documents(DataConfig(path=str(tmp_path), max_bytes=250))) == 3


def test_documents_stream_in_bounded_batches(tmp_path):
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": f"doc {i} " * 50}) + "\n" for i in range(200)))
    batches = list(document_batches(training_sources(DataConfig(path=str(tmp_path)))[0], batch_chars=5000))
    assert len(batches) > 10 and all(sum(map(len, b)) < 5000 + 400 for b in batches)
    assert [d for b in batches for d in b] == [f"doc {i} " * 50 for i in range(200)]


@pytest.mark.parametrize("content,message", [
    ("", "data.path: the corpus is empty"),
    ('{"body": "x"}\n', "data.text_field: .*has no column or key 'text'"),
    ('{"text": "a"}\n{"body": "x"}\n', "data.text_field: .*record 2 has no text"),
    ('{"text": "a"}\n\n{"text": "b"}\n{not json\n', r"data.path: .*d.jsonl:4 is not valid JSON"),
])
def test_bad_sources_name_the_key(tmp_path, content, message):
    (tmp_path / "d.jsonl").write_text(content)
    with pytest.raises(ConfigError, match=f"^{message}"):
        documents(DataConfig(path=str(tmp_path / "d.jsonl")))


def test_parquet_without_the_text_column(tmp_path):
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "d.parquet")
    with pytest.raises(ConfigError, match="^data.text_field: .*d.parquet has no column or key 'text'"):
        documents(DataConfig(path=str(tmp_path)))


def test_bad_input_caught_by_the_cheap_check(tmp_path):
    def fails(message, **data):
        with pytest.raises(ConfigError, match=f"^{message}"):
            check_source(DataConfig(**data))

    fails("data.path: no such file", path=str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    fails("data.path: .* holds no .txt", path=str(tmp_path / "empty"))
    (tmp_path / "blob.txt").write_bytes(b"PK\x03\x04\x00\x00binary")
    fails("data.path: .*blob.txt is a binary file", path=str(tmp_path / "blob.txt"))
    (tmp_path / "ok.txt").write_text("fine")
    fails(r"data.sources\[1\].weight: must be positive", sources=[DataSource(path=str(tmp_path / "ok.txt")),
                                                              DataSource(path=str(tmp_path / "ok.txt"), weight=0)])
    fails("data.sources: set either", path=str(tmp_path / "ok.txt"), sources=[DataSource(path=str(tmp_path))])
    fails("data.val_path: no such file", path=str(tmp_path / "ok.txt"), val_path=str(tmp_path / "nope.txt"))
    fails("data.num_proc: must be at least 1", num_proc=0)


def test_split_is_by_document_hash_deterministic_and_stable():
    docs = [f"document number {i}" for i in range(400)]
    val = {d for d in docs if is_validation(d, 0.1)}
    assert 20 < len(val) < 60
    # Order and neighbours do not matter: a document's side depends on its text alone.
    assert {d for d in reversed(docs + ["a new one"]) if is_validation(d, 0.1)} - {"a new one"} == val


def test_embedded_corpus_is_the_standard_library_source():
    first = next(embedded_documents())
    assert "import" in first or "def " in first
    assert documents(DataConfig(max_bytes=100_000))  # non-empty, capped
    embedded = documents(DataConfig())
    assert 5_000_000 <= sum(map(len, embedded)) < EMBEDDED_MAX_BYTES + 1_000_000
    # Code people write, not codec tables (encodings/) or pydoc's topic strings (pydoc_data/).
    assert not any("Python Character Mapping Codec" in d or "Autogenerated by Sphinx" in d for d in embedded)


def test_user_corpora_are_not_capped_by_default(tmp_path):
    (tmp_path / "big.txt").write_text("y" * (EMBEDDED_MAX_BYTES + 10))
    (tmp_path / "more.txt").write_text("z")
    assert len(documents(DataConfig(path=str(tmp_path)))) == 2
