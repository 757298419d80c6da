"""Shared fixtures: a small real-text corpus, CLI runners, and an offline environment."""
import ast
import json
import os
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest

# Nothing in the tests may reach a hub or write under $HOME.
os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                  WANDB_SILENT="true", TOKENIZERS_PARALLELISM="false")
# Triton kernels run in Triton's interpreter on CPU tensors (read when a kernel is decorated, so
# before anything imports minitron.distill).
os.environ["TRITON_INTERPRET"] = "1"


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    cache = tmp_path_factory.mktemp("minitron_cache")
    os.environ["MINITRON_CACHE"] = str(cache)
    yield cache


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory) -> Path:
    """About 400 KB of real text: a fixed set of standard-library modules, one document each."""
    out = tmp_path_factory.mktemp("corpus")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    names = ["argparse.py", "ast.py", "calendar.py", "csv.py", "dataclasses.py", "difflib.py",
             "enum.py", "fractions.py", "functools.py", "heapq.py", "inspect.py", "json/decoder.py",
             "json/encoder.py", "logging/__init__.py", "pathlib.py", "pprint.py", "random.py",
             "shutil.py", "statistics.py", "string.py", "textwrap.py", "typing.py", "uuid.py",
             "zipfile.py"]
    for i, name in enumerate(names):  # JSON lines: a module is one document however .txt is cut
        (out / f"doc{i:02d}.jsonl").write_text(json.dumps({"text": (stdlib / name).read_text(encoding="utf-8")}) + "\n")
    return out


def corpus_texts(corpus_dir: Path) -> list:
    """The test corpus's documents, in the order the data path reads them."""
    return [json.loads(f.read_text())["text"] for f in sorted(corpus_dir.glob("*.jsonl"))]


def tiny_args(corpus_dir: Path, output_dir: Path, *extra: str) -> list:
    """CLI overrides for a tiny, fast run on the test corpus."""
    return [f"output_dir={output_dir}", f"data.path={corpus_dir}", "model=tiny", "logger=none",
            "data.vocab_size=512", "data.seq_len=64", "train.micro_batch_size=4",
            "train.global_batch_size=8", "train.max_steps=6", "train.eval_every=3",
            "train.eval_blocks=16", "train.save_every=0", "train.warmup_steps=2", *extra]


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory, corpus_dir) -> Path:
    """A tiny llama (GQA) trained for a few steps on the test corpus; the checkpoint directory
    holds its tokenizer."""
    out = tmp_path_factory.mktemp("tiny_teacher")
    run_cli(tiny_args(corpus_dir, out))
    return out / "model"


@pytest.fixture(scope="session")
def pruned_student(tmp_path_factory, tiny_teacher, corpus_dir) -> Path:
    """The tiny teacher pruned in width (hidden 64 -> 48, ffn 176 -> 96, heads 4 -> 2) and depth (2 -> 1)."""
    out = tmp_path_factory.mktemp("student") / "pruned"
    run_cli([f"model.path={tiny_teacher}", f"data.path={corpus_dir}", "data.seq_len=64", f"output_dir={out}",
             "prune.calibration.num_samples=16", "prune.calibration.micro_batch_size=4", "prune.depth.eval_blocks=8",
             "prune.export.hidden_size=48", "prune.export.ffn_hidden_size=96", "prune.export.num_attention_heads=2",
             "prune.export.num_layers=1"], launcher=PRUNE)
    return out


@pytest.fixture(scope="session")
def embedded_pipeline(tmp_path_factory):
    """README command 1 as written (only output_dir differs): the embedded pipeline, from
    pretraining the default teacher to the evaluated students, run once per session and shared by
    the slow tests. Returns (output_dir, stdout, seconds)."""
    out = tmp_path_factory.mktemp("embedded") / "pipeline"
    started = time.perf_counter()
    proc = run_cli([f"output_dir={out}"], launcher=["minitron-pipeline"], timeout=1800)
    return out, proc.stdout, time.perf_counter() - started


@pytest.fixture(scope="session")
def embedded_teacher(embedded_pipeline) -> Path:
    """The pipeline's embedded teacher run: summary.json, metrics.jsonl and model/."""
    return next((embedded_pipeline[0] / "teacher").glob("embedded-*"))


def reads_as_python(sample: str) -> bool:
    """A def line with a name and parameters that parses, then a body indented below it (the last
    line may be cut mid-token, so only the lines before it count)."""
    header, *body = sample.splitlines()
    try:
        tree = ast.parse(header.strip() + "\n    pass")
    except SyntaxError:
        return False
    indent = len(header) - len(header.lstrip())
    return (isinstance(tree.body[0], ast.FunctionDef) and len(body) >= 2
            and all(len(line) - len(line.lstrip()) > indent for line in body[:-1] if line.strip()))


PRUNE = [sys.executable, "-m", "minitron.cli.prune"]


def compose_job(config_name: str, *overrides: str):
    """The typed job config a CLI would get for these overrides (conf/ + schema), in-process:
    for checks that need no subprocess."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from minitron.cli.common import conf_dir
    from minitron.config import register_schemas

    register_schemas()
    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
        return OmegaConf.to_object(compose(config_name=config_name, overrides=list(overrides)))


def run_cli(args, launcher=(), timeout=600, check=True, env=None) -> subprocess.CompletedProcess:
    cmd = [*launcher, *([sys.executable, "-m", "minitron.cli.train"] if not launcher else []), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


def logged_steps(output_dir: Path) -> list:
    """The steps of metrics.jsonl's training rows, in file order (a resumed run must not repeat one)."""
    rows = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return [row["step"] for row in rows if "train/loss" in row]


def read_metrics(output_dir: Path) -> dict:
    """step -> the metrics logged for it (a step's training row and its final-metrics row merged)."""
    rows = {}
    for line in (output_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        rows.setdefault(row["step"], {}).update(row)
    return rows

