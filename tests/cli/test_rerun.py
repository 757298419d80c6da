"""Running a command again in its own output_dir: a finished run with the same settings exits 0
at once and changes no file (train, prune, distill); other settings or another command's output
are refused before anything is written; a run that fails on bad input leaves nothing behind."""
import hashlib
import sys
from pathlib import Path

import pytest

from conftest import PRUNE, run_cli, tiny_args

DISTILL = [sys.executable, "-m", "minitron.cli.distill"]


def files(root: Path) -> dict:
    """Every file under root: its modification time and content hash."""
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(root.rglob("*")) if p.is_file()}


def rerun_changes_nothing(args, launcher, out: Path) -> str:
    before = files(out)
    proc = run_cli(args, launcher=launcher)
    assert files(out) == before
    assert "already finished with these settings" in proc.stdout, proc.stdout + proc.stderr[-2000:]
    return proc.stdout


def prune_args(teacher, corpus_dir, out, *extra):
    return [f"model.path={teacher}", f"data.path={corpus_dir}", "data.seq_len=64", f"output_dir={out}",
            "prune.calibration.num_samples=8", "prune.calibration.micro_batch_size=4", "prune.depth.eval_blocks=4",
            "prune.export.ffn_hidden_size=96", *extra]


@pytest.fixture(scope="module")
def train_run(tiny_teacher, corpus_dir):
    """The session's tiny teacher run and the arguments that made it (conftest), left unchanged."""
    out = tiny_teacher.parent
    return out, tiny_args(corpus_dir, out)


def test_finished_train_run_is_not_redone(train_run):
    out, args = train_run
    rerun_changes_nothing(args, (), out)
    rerun_changes_nothing([*args, "logger=wandb"], (), out)  # where results are reported is not a setting


def test_other_settings_are_refused_before_anything_is_written(train_run):
    out, args = train_run
    before = files(out)
    proc = run_cli([*args, "train.lr=1e-3"], check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith(
        f"error: output_dir: {out} holds a finished run with other settings (train.lr: 0.003 here, 0.001 now); "
        "choose another output_dir, or set resume=never to replace it")
    assert files(out) == before


def test_finished_prune_and_distill_runs_are_not_redone(tmp_path, tiny_teacher, corpus_dir):
    pruned = tmp_path / "pruned"
    run_cli(prune_args(tiny_teacher, corpus_dir, pruned), launcher=PRUNE)
    rerun_changes_nothing(prune_args(tiny_teacher, corpus_dir, pruned), PRUNE, pruned)

    distilled = tmp_path / "distilled"
    args = [f"teacher.path={tiny_teacher}", f"student.path={pruned}", f"data.path={corpus_dir}",
            f"output_dir={distilled}", "logger=none", "data.seq_len=64", "train.micro_batch_size=4",
            "train.global_batch_size=8", "train.max_steps=2", "train.eval_every=2", "train.eval_blocks=8",
            "train.save_every=0", "train.warmup_steps=1"]
    run_cli(args, launcher=DISTILL)
    rerun_changes_nothing(args, DISTILL, distilled)

    # Another command's finished output is refused, and left as it was.
    before = files(pruned)
    proc = run_cli([*args[:3], f"output_dir={pruned}", *args[4:]], launcher=DISTILL, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: output_dir: {pruned} holds the finished output of another command; choose another output_dir")
    assert files(pruned) == before


def test_a_run_that_fails_on_bad_input_leaves_nothing_behind(tmp_path, corpus_dir):
    # output_dir and two parents are new: all three go.
    proc = run_cli(tiny_args(corpus_dir, tmp_path / "a" / "b" / "out", "data.path=/nonexistent"), check=False)
    assert proc.returncode == 2 and "error: data.path" in proc.stderr
    assert list(tmp_path.iterdir()) == []

    # An existing directory keeps what it held, and gets nothing (Hydra's .hydra/ and log included).
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "notes.txt").write_text("mine")
    proc = run_cli(tiny_args(corpus_dir, existing, "train.max_steps=2", "data.seq_len=100000"), check=False)
    assert proc.returncode == 2 and "error: data.seq_len" in proc.stderr
    assert files(existing).keys() == {"notes.txt"}
