"""Bad input: one line on stderr naming the key, a non-zero exit, and no finished-looking output."""
import pytest

from conftest import run_cli, tiny_args


def bad(tmp_path, corpus_dir, *overrides):
    out = tmp_path / "out"
    proc = run_cli(tiny_args(corpus_dir, out, *overrides), check=False, timeout=300)
    assert proc.returncode != 0
    lines = [l for l in proc.stderr.strip().splitlines() if l.startswith("error:")]
    assert len(lines) == 1, proc.stderr[-2000:]
    assert not (out / "summary.json").exists() and not (out / "model").exists()
    return lines[0]


@pytest.mark.parametrize("overrides,key", [
    (("data.path=/nonexistent/corpus",), "data.path: no such file"),
    (("model=gigantic",), "model: unknown preset 'gigantic'"),
    (("data.seq_len=4096",), "data.seq_len: 4096 exceeds"),
    (("train.global_batch_size=6",), "train.global_batch_size: 6 is not a multiple"),
    (("model.path=/tmp",), "model.path: /tmp is not a Hugging Face checkpoint"),
    (("train.lr=-1",), "train.lr: must be positive"),
    (("train.warmup_steps=-5",), "train.warmup_steps: must be at least 0"),
    (("train.beta2=1.5",), "train.beta2: must be in [0, 1)"),
    (("train.eval_blocks=0",), "train.eval_blocks: must be at least 1"),
])
def test_rejected_before_any_work(tmp_path, corpus_dir, overrides, key):
    assert bad(tmp_path, corpus_dir, *overrides).startswith(f"error: {key}")


def test_empty_corpus(tmp_path, corpus_dir):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "blank.txt").write_text("   \n")
    assert bad(tmp_path, corpus_dir, f"data.path={empty}").startswith("error: data.path: the corpus is empty")


def test_binary_corpus_file(tmp_path, corpus_dir):
    (tmp_path / "weights.txt").write_bytes(bytes(range(256)) * 4)
    line = bad(tmp_path, corpus_dir, f"data.path={tmp_path / 'weights.txt'}")
    assert line.startswith("error: data.path: ") and "is a binary file" in line


def test_output_dir_that_is_a_file_or_cannot_be_made(tmp_path, corpus_dir):
    """Found before any data or model work: a file where the run directory should be, or a parent
    that is a file (so the directory can never be created)."""
    (tmp_path / "taken").write_text("not a directory")
    for out, message in ((tmp_path / "taken", "is a file"), (tmp_path / "taken" / "run", "cannot create or write")):
        proc = run_cli([*tiny_args(corpus_dir, out)], check=False, timeout=300)
        assert proc.returncode == 2
        assert proc.stderr.strip().splitlines()[-1].startswith("error: output_dir: "), proc.stderr[-2000:]
        assert message in proc.stderr
    assert (tmp_path / "taken").read_text() == "not a directory"
