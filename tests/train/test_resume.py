"""A run SIGKILLed after a checkpoint and restarted with resume=auto repeats the uninterrupted
run's per-step losses exactly (same process count, deterministic CPU kernels), logging each step
once."""
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import logged_steps, read_metrics, run_cli, tiny_args

STEPS = 60  # long enough (a few seconds) that the kill lands mid-run, after the first checkpoint


def resume_args(corpus_dir, out, *extra):
    return tiny_args(corpus_dir, out, f"train.max_steps={STEPS}", "train.save_every=10",
                     "train.eval_every=50", "train.lr=3e-3", *extra)


def test_resume_after_sigkill_repeats_the_losses(tmp_path, corpus_dir):
    reference = tmp_path / "reference"
    run_cli(resume_args(corpus_dir, reference))

    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "minitron.cli.train", *resume_args(corpus_dir, out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latest = out / "checkpoints" / "latest"
    deadline = time.time() + 300
    while not latest.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (out / "summary.json").exists() and not (out / "model").exists()
    killed_at = max(read_metrics(out))
    assert killed_at < STEPS

    proc = run_cli(resume_args(corpus_dir, out, "resume=auto"))
    resumed, expected = read_metrics(out), read_metrics(reference)
    assert logged_steps(out) == list(range(1, STEPS + 1))  # the steps after the checkpoint were not logged twice
    for step in range(1, STEPS + 1):
        assert resumed[step]["train/loss"] == pytest.approx(expected[step]["train/loss"], rel=1e-6), step
    assert resumed[STEPS]["val/loss"] == pytest.approx(expected[STEPS]["val/loss"], rel=1e-6)
    assert (out / "summary.json").exists()

    # resume=never starts over in the finished run's directory: the old checkpoints and metrics
    # go, and its first step is the reference's.
    run_cli(resume_args(corpus_dir, out, "resume=never", "train.max_steps=1"))
    assert logged_steps(out) == [1]
    assert read_metrics(out)[1]["train/loss"] == pytest.approx(expected[1]["train/loss"], rel=1e-6)
    assert not (out / "checkpoints").exists()


def test_a_segment_of_a_longer_schedule_continues_like_one_run(tmp_path, corpus_dir):
    """train.schedule_steps: a run stopped at step 4 of an 8-step schedule checkpoints its last step
    (save_every=0), and the run that continues it to 8 repeats the uninterrupted run's losses (the
    search's successive halving continues its candidates this way)."""
    def args(out, *extra):
        return tiny_args(corpus_dir, out, "train.max_steps=8", "train.eval_every=0", "train.lr=3e-3", *extra)

    reference = tmp_path / "reference"
    run_cli(args(reference))
    out = tmp_path / "segments"
    run_cli(args(out, "train.max_steps=4", "train.schedule_steps=8"))
    assert (out / "checkpoints" / "latest").read_text() == "step_00000004"
    run_cli(args(out, "train.schedule_steps=8"))
    resumed, expected = read_metrics(out), read_metrics(reference)
    assert logged_steps(out) == list(range(1, 9))
    for step in range(1, 9):
        assert resumed[step]["train/loss"] == pytest.approx(expected[step]["train/loss"], rel=1e-6), step
        assert resumed[step]["train/lr"] == pytest.approx(expected[step]["train/lr"], rel=1e-12), step
