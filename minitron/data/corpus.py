"""Corpus sources and the documents they hold, streamed in batches: local files read through the
`datasets` builders (text, json, parquet), a `datasets` dataset (hub name or `save_to_disk`
directory), a Megatron .bin/.idx pair (already tokenised; see indexed.py), or the embedded
corpus. Also the deterministic train/validation split by document hash, and content fingerprints
for cache keys that never need the corpus in memory."""
import hashlib
import json
import logging
import sysconfig
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, List, Optional

from minitron.config import ConfigError, DataConfig
from minitron.data import indexed
from minitron.data.tokenizer import MIN_TRAINED_VOCAB, check_tokenizer_files

TEXT_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")
TXT_DOCUMENTS = {"paragraph": "paragraph", "line": "line", "file": "document"}  # ours -> datasets' sample_by
# The embedded corpus is about 10 MB on Python 3.11; a later Python's larger standard library is cut
# here, which keeps tokenizer training and tokenisation to seconds. Applies to the embedded corpus only.
EMBEDDED_MAX_BYTES = 12_000_000
BATCH_CHARS = 1 << 20  # documents are handed on in batches of about this much text
_HASH_CHUNK = 8 << 20


@dataclass
class Source:
    """One corpus, as the build sees it. `key` names the config key a user fixes on an error."""
    kind: str  # files | dataset | indexed | embedded
    key: str
    path: Optional[str] = None
    name: Optional[str] = None
    split: str = "train"
    text_field: str = "text"
    txt_documents: str = "paragraph"
    max_bytes: Optional[int] = None
    weight: float = 1.0

    def describe(self) -> str:
        return self.path or self.name or "embedded standard-library source"


def training_sources(cfg: DataConfig) -> List[Source]:
    """The configured training corpora: data.sources, else data.path / data.name, else embedded."""
    if cfg.sources:
        sources = []
        for i, s in enumerate(cfg.sources):
            key = f"data.sources[{i}]"
            if not s.path and not s.name:
                raise ConfigError(f"{key}: give a path or a name")
            if not s.weight > 0:
                raise ConfigError(f"{key}.weight: must be positive, got {s.weight}")
            sources.append(_source(s.path, s.name, f"{key}.path" if s.path else f"{key}.name", cfg,
                                   split=s.split, text_field=s.text_field, txt_documents=s.txt_documents,
                                   weight=float(s.weight)))
        return sources
    if cfg.path or cfg.name:
        return [_source(cfg.path, cfg.name, "data.path" if cfg.path else "data.name", cfg)]
    return [Source("embedded", "data.path", max_bytes=cfg.max_bytes or EMBEDDED_MAX_BYTES)]


def validation_source(cfg: DataConfig) -> Optional[Source]:
    return _source(cfg.val_path, None, "data.val_path", cfg) if cfg.val_path else None


def _source(path, name, key, cfg: DataConfig, split=None, text_field=None, txt_documents=None,
            weight=1.0) -> Source:
    common = dict(key=key, split=split or cfg.split, text_field=text_field or cfg.text_field,
                  txt_documents=txt_documents or cfg.txt_documents, max_bytes=cfg.max_bytes, weight=weight)
    if path:
        path = str(Path(path).expanduser())
        kind = "indexed" if indexed.prefix_of(path) else "files"
        return Source(kind, path=indexed.prefix_of(path) or path, **common)
    return Source("dataset", name=name, **common)


def check_source(cfg: DataConfig) -> None:
    """Cheap checks of data.* (no tokenising), run before any model is built."""
    if cfg.seq_len < 2:
        raise ConfigError(f"data.seq_len: must be at least 2, got {cfg.seq_len}")
    if not 0.0 < cfg.val_fraction < 1.0:
        raise ConfigError(f"data.val_fraction: must be in (0, 1), got {cfg.val_fraction}")
    if cfg.path and cfg.name:
        raise ConfigError("data.path: set either data.path or data.name, not both")
    if cfg.sources and (cfg.path or cfg.name):
        raise ConfigError("data.sources: set either data.sources or data.path / data.name, not both")
    if cfg.num_proc is not None and cfg.num_proc < 1:
        raise ConfigError(f"data.num_proc: must be at least 1, got {cfg.num_proc}")
    if cfg.tokenizer_sample_bytes < 1:
        raise ConfigError(f"data.tokenizer_sample_bytes: must be positive, got {cfg.tokenizer_sample_bytes}")
    if cfg.max_bytes is not None and cfg.max_bytes < 1:
        raise ConfigError(f"data.max_bytes: must be positive or null (everything), got {cfg.max_bytes}")
    if not cfg.tokenizer and cfg.vocab_size < MIN_TRAINED_VOCAB:
        raise ConfigError(f"data.vocab_size: must be at least {MIN_TRAINED_VOCAB} (256 bytes + merges), "
                          f"got {cfg.vocab_size}")
    check_tokenizer_files(cfg.tokenizer)
    sources = training_sources(cfg)
    val = validation_source(cfg)
    for source in sources + ([val] if val else []):
        if source.txt_documents not in TXT_DOCUMENTS:
            raise ConfigError(f"data.txt_documents: must be one of {', '.join(TXT_DOCUMENTS)}, "
                              f"got {source.txt_documents!r}")
        if source.kind == "files":
            source_files(source)
        elif source.kind == "indexed":
            indexed.open_pair(source.path, source.key)
            if not cfg.tokenizer:
                raise ConfigError(f"data.tokenizer: {source.key} is a Megatron .bin/.idx pair (already "
                                  "tokenised); set data.tokenizer to the tokenizer that wrote it")


def source_files(source: Source) -> List[Path]:
    """The files of a `files` source in a fixed order; checks each is text in a known format."""
    path = Path(source.path)
    if not path.exists():
        raise ConfigError(f"{source.key}: no such file or directory: {path}")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in TEXT_SUFFIXES and p.is_file())
        if not files:
            raise ConfigError(f"{source.key}: {path} holds no {', '.join(TEXT_SUFFIXES)} files")
    elif path.suffix not in TEXT_SUFFIXES:
        raise ConfigError(f"{source.key}: {path} is not one of {', '.join(TEXT_SUFFIXES)} (or a Megatron "
                          ".bin/.idx prefix)")
    else:
        files = [path]
    for file in files:
        if file.suffix != ".parquet":
            with file.open("rb") as f:
                if b"\x00" in f.read(8192):
                    raise ConfigError(f"{source.key}: {file} is a binary file, not {file.suffix} text")
    return files


def document_batches(source: Source, batch_chars: int = BATCH_CHARS) -> Iterator[List[str]]:
    """The source's documents with text, in a fixed order, in batches of about `batch_chars`
    characters, stopping once `source.max_bytes` characters were read."""
    total, batch, size = 0, [], 0
    for doc in _documents(source):
        if not doc.strip():
            continue
        if source.max_bytes is not None and total >= source.max_bytes:
            break
        total += len(doc)
        batch.append(doc)
        size += len(doc)
        if size >= batch_chars:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch
    elif total == 0:
        raise ConfigError(f"{source.key}: the corpus is empty (no document with text)")


def is_validation(doc: str, val_fraction: float) -> bool:
    """The split by a hash of each document's text: stable under reordering and appending, and
    duplicates land on the same side (no train/validation leakage)."""
    bucket = int.from_bytes(hashlib.blake2b(doc.encode(), digest_size=8).digest(), "big")
    return bucket / 2**64 < val_fraction


def fingerprint(source: Source, memo_dir: Path) -> str:
    """A digest of everything the source's documents depend on. File contents are hashed as they
    stream past (memoised by path, size and mtime, so an unchanged corpus is not re-read)."""
    h = hashlib.sha256(json.dumps({k: getattr(source, k) for k in (
        "kind", "split", "text_field", "txt_documents", "max_bytes")}, sort_keys=True).encode())
    if source.kind == "files":
        root = Path(source.path)
        for file in source_files(source):
            h.update(f"{file.relative_to(root) if root.is_dir() else file.name}\0".encode())
            h.update(file_digest(file, memo_dir).encode())
    elif source.kind == "indexed":
        for suffix in (".idx", ".bin"):
            h.update(file_digest(Path(source.path + suffix), memo_dir).encode())
    elif source.kind == "dataset":
        h.update(f"{source.name}\0{_open_dataset(source)._fingerprint}".encode())
    else:
        for batch in document_batches(source):
            for doc in batch:
                h.update(hashlib.blake2b(doc.encode(), digest_size=16).digest())
    return h.hexdigest()[:20]


def file_digest(file: Path, memo_dir: Path) -> str:
    stat = file.stat()
    stamp = f"{file.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}"
    memo = memo_dir / hashlib.sha256(stamp.encode()).hexdigest()[:24]
    if memo.exists():
        return memo.read_text()
    h = hashlib.sha256()
    with file.open("rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    memo_dir.mkdir(parents=True, exist_ok=True)
    tmp = memo.with_name(f".{memo.name}.{id(h)}")
    tmp.write_text(h.hexdigest())
    tmp.replace(memo)
    return h.hexdigest()


# Left out of the embedded corpus: codec tables, pydoc's topic strings, the regression tests (larger
# than the rest together), IDLE and lib2to3's fixtures would teach the small teacher hex tables and
# test data instead of the Python people write; installed packages are not the standard library.
EMBEDDED_SKIP = {"encodings", "pydoc_data", "test", "idlelib", "lib2to3", "site-packages", "dist-packages"}


def embedded_documents() -> Iterator[str]:
    """The Python standard library's own source (about 10 MB, one document per module): text every
    Python install has, so the default job needs no download. Files are read in sorted order so the
    corpus is the same on every run."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(stdlib.rglob("*.py")):
        if path.relative_to(stdlib).parts[0] in EMBEDDED_SKIP:
            continue
        try:
            yield path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue


def _documents(source: Source) -> Iterator[str]:
    if source.kind == "embedded":
        yield from embedded_documents()
    elif source.kind == "dataset":
        yield from _column(_open_dataset(source).select_columns([source.text_field]).iter(batch_size=1000),
                           source, source.name)
    elif source.kind == "files":
        for file in source_files(source):
            yield from _file_documents(file, source)
    else:
        raise ConfigError(f"{source.key}: a Megatron .bin/.idx pair holds tokens, not documents")


def _file_documents(file: Path, source: Source) -> Iterator[str]:
    import datasets

    if file.stat().st_size == 0:  # datasets' json builder stumbles on an empty file
        return
    if file.suffix == ".txt":
        builder, options = "text", {"sample_by": TXT_DOCUMENTS[source.txt_documents], "encoding_errors": "replace"}
    else:
        builder, options = ("parquet" if file.suffix == ".parquet" else "json"), {}
    with _quiet_datasets():
        ds = datasets.load_dataset(builder, data_files=[str(file)], split="train", streaming=True, **options)
        try:
            yield from _column(ds.iter(batch_size=1000), source, file)
        except ConfigError:
            raise
        except Exception as e:  # pyarrow and datasets raise many types for a malformed file
            if builder == "json":
                _raise_json_error(file, source)
            raise ConfigError(f"{source.key}: cannot read {file}: {str(e).splitlines()[0][:200]}") from None


def _column(batches: Iterable[dict], source: Source, where) -> Iterator[str]:
    row = 0
    for batch in batches:
        texts = batch.get(source.text_field)
        if texts is None:
            raise ConfigError(f"{_field_key(source)}: {where} has no column or key {source.text_field!r} "
                              f"(it has {', '.join(map(str, batch))})")
        for text in texts:
            row += 1
            if not isinstance(text, str):
                raise ConfigError(f"{_field_key(source)}: {where}: record {row} has no text in "
                                  f"{source.text_field!r} (got {type(text).__name__})")
            yield text


def _field_key(source: Source) -> str:
    return f"{source.key.rsplit('.', 1)[0]}.text_field" if source.key.startswith("data.sources") else "data.text_field"


def _raise_json_error(file: Path, source: Source) -> None:
    """datasets reads JSON lines in large chunks and reports a row within a chunk; find the line."""
    with file.open(encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{source.key}: {file}:{lineno} is not valid JSON ({e.msg})") from None
    raise ConfigError(f"{source.key}: {file} is neither JSON lines nor one JSON array of records")


def _open_dataset(source: Source):
    import datasets

    path = Path(source.name).expanduser()
    if path.is_dir():
        try:
            ds = datasets.load_from_disk(str(path))
        except FileNotFoundError as e:
            raise ConfigError(f"{source.key}: {path} is not a saved dataset ({str(e).splitlines()[0]})") from None
        if isinstance(ds, datasets.DatasetDict):
            if source.split not in ds:
                raise ConfigError(f"data.split: {source.name} has splits {list(ds)}, not {source.split!r}")
            ds = ds[source.split]
    else:
        try:
            with _quiet_datasets():
                ds = datasets.load_dataset(source.name, split=source.split)
        except Exception as e:  # datasets raises many types for a name it cannot resolve
            raise ConfigError(f"{source.key}: cannot load dataset {source.name!r}: {str(e).splitlines()[0]}") from None
    if source.text_field not in ds.column_names:
        raise ConfigError(f"{_field_key(source)}: dataset {source.name} has no column {source.text_field!r} "
                          f"({ds.column_names})")
    return ds


@contextmanager
def _quiet_datasets():
    """datasets logs a malformed file at ERROR before raising; we raise our own one-line error."""
    logger = logging.getLogger("datasets")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)

