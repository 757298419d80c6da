"""Bad input found only once the data is read: one line on stderr naming the key, a non-zero exit,
and no finished-looking output. Mistakes the checks find before any work (every command, every
class of mistake) are the table in test_bad_input_table.py, run in-process."""
from conftest import run_cli, tiny_args


def bad(tmp_path, corpus_dir, *overrides):
    out = tmp_path / "out"
    proc = run_cli(tiny_args(corpus_dir, out, *overrides), check=False, timeout=300)
    assert proc.returncode != 0
    lines = [l for l in proc.stderr.strip().splitlines() if l.startswith("error:")]
    assert len(lines) == 1, proc.stderr[-2000:]
    assert not out.exists()  # the run made it, and removed it on failing
    return lines[0]


def test_empty_corpus(tmp_path, corpus_dir):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "blank.txt").write_text("   \n")
    assert bad(tmp_path, corpus_dir, f"data.path={empty}").startswith("error: data.path: the corpus is empty")
