"""Documents from a source (local files, a `datasets` dataset, or the embedded corpus) and their
deterministic train/validation split."""
import hashlib
import json
import sysconfig
from pathlib import Path
from typing import Iterable, Iterator, List, Optional, Tuple

from minitron.config import ConfigError, DataConfig

TEXT_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")
# The first 12 MB of the standard library's source is more than the default run can read, and
# keeps tokenizer training and tokenisation to seconds. Applies to the embedded corpus only.
EMBEDDED_MAX_BYTES = 12_000_000


def load_documents(cfg: DataConfig) -> List[str]:
    """All documents of the configured source, in a fixed order, capped at `cfg.max_bytes`."""
    max_bytes = cfg.max_bytes
    if cfg.path:
        docs = _file_documents(Path(cfg.path).expanduser(), cfg.text_field)
        key = "data.path"
    elif cfg.name:
        docs = _dataset_documents(cfg.name, cfg.split, cfg.text_field)
        key = "data.name"
    else:
        docs = embedded_documents()
        key = "data.path"
        max_bytes = max_bytes or EMBEDDED_MAX_BYTES
    kept = list(_take_bytes((d for d in docs if d.strip()), max_bytes))
    if not kept:
        raise ConfigError(f"{key}: the corpus is empty (no document with text)")
    return kept


def check_source(cfg: DataConfig) -> None:
    """Cheap existence check, run before any model is built."""
    if cfg.path:
        path = Path(cfg.path).expanduser()
        if not path.exists():
            raise ConfigError(f"data.path: no such file or directory: {path}")
        if path.is_file() and path.suffix not in TEXT_SUFFIXES:
            raise ConfigError(f"data.path: {path} is not one of {', '.join(TEXT_SUFFIXES)}")


def embedded_documents() -> Iterator[str]:
    """The Python standard library's own source: text every Python install has, so the default job
    needs no download. Files are read in sorted order so the corpus is the same on every run."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(stdlib.rglob("*.py")):
        if "site-packages" in path.parts or "dist-packages" in path.parts:
            continue
        try:
            yield path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue


def split_documents(docs: List[str], val_fraction: float) -> Tuple[List[str], List[str]]:
    """Split by a hash of each document's text: stable under reordering and appending, and
    duplicates land on the same side (no train/validation leakage)."""
    train, val = [], []
    for doc in docs:
        bucket = int.from_bytes(hashlib.blake2b(doc.encode(), digest_size=8).digest(), "big")
        (val if bucket / 2**64 < val_fraction else train).append(doc)
    if not val and len(train) > 1:
        val.append(train.pop())
    if not train:
        raise ConfigError("data.val_fraction: no training documents left after the validation split")
    return train, val


def _take_bytes(docs: Iterable[str], max_bytes: Optional[int]) -> Iterator[str]:
    total = 0
    for doc in docs:
        if max_bytes is not None and total >= max_bytes:
            return
        total += len(doc)
        yield doc


def _file_documents(path: Path, text_field: str) -> Iterator[str]:
    files = sorted(p for p in path.rglob("*") if p.suffix in TEXT_SUFFIXES) if path.is_dir() else [path]
    for file in files:
        if file.suffix == ".txt":
            yield file.read_text(encoding="utf-8", errors="replace")
        elif file.suffix in (".jsonl", ".json"):
            yield from _jsonl_documents(file, text_field)
        else:
            yield from _parquet_documents(file, text_field)


def _jsonl_documents(file: Path, text_field: str) -> Iterator[str]:
    with file.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(f"data.path: {file}:{lineno} is not valid JSON ({e.msg})") from None
            if text_field not in record:
                raise ConfigError(f"data.text_field: {file}:{lineno} has no key {text_field!r}")
            yield record[text_field]


def _parquet_documents(file: Path, text_field: str) -> Iterator[str]:
    import pyarrow.parquet as pq

    table = pq.read_table(file)
    if text_field not in table.column_names:
        raise ConfigError(f"data.text_field: {file} has no column {text_field!r} ({table.column_names})")
    yield from table.column(text_field).to_pylist()


def _dataset_documents(name: str, split: str, text_field: str) -> Iterator[str]:
    import datasets

    if Path(name).expanduser().is_dir():
        ds = datasets.load_from_disk(str(Path(name).expanduser()))
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise ConfigError(f"data.split: {name} has splits {list(ds)}, not {split!r}")
            ds = ds[split]
    else:
        try:
            ds = datasets.load_dataset(name, split=split)
        except Exception as e:  # datasets raises many types for a name it cannot resolve
            raise ConfigError(f"data.name: cannot load dataset {name!r}: {str(e).splitlines()[0]}") from None
    if text_field not in ds.column_names:
        raise ConfigError(f"data.text_field: dataset {name} has no column {text_field!r} ({ds.column_names})")
    yield from ds[text_field]
