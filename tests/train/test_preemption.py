"""Preemption, damaged checkpoints and diverged runs, on real runs.

- SIGKILL: the run resumes from its last checkpoint.
- SIGTERM to torchrun (what Kubernetes and SLURM preemption do) makes both ranks finish the step,
  save, write an interrupted summary and exit; resume=auto then repeats the uninterrupted run's
  losses, each step logged once.
- The SLURM script passes its USR1 (sbatch --signal) on to the tasks and requeues the job when
  they exit with the interrupted status; the requeued job continues.
- Only a save cut short (no manifest): the run starts over. Finished checkpoints that are all
  damaged: an error naming resume. A truncated newest checkpoint is skipped with a
  warning naming it; the run resumes from the one before and repeats the uninterrupted losses.
- A diverged loss stops the run with one line naming train.lr, saving nothing at or after it.
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import logged_steps, read_metrics, run_cli, tiny_args
from distributed.test_multiprocess import TRAIN_PY, free_port
from minitron.train.checkpoint import MANIFEST, newest_usable
from minitron.train.stopping import EXIT_INTERRUPTED

STEPS = 30
REPO = Path(__file__).resolve().parents[2]


def args(corpus_dir, out, *extra):
    return tiny_args(corpus_dir, out, f"train.max_steps={STEPS}", "train.save_every=10", "train.eval_every=10",
                     "train.lr=3e-3", *extra)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, corpus_dir):
    """The uninterrupted run (one process; two processes repeat it, tests/dist)."""
    out = tmp_path_factory.mktemp("reference")
    run_cli(args(corpus_dir, out))
    return read_metrics(out)


def assert_repeats(out: Path, reference: dict, rel: float) -> None:
    assert logged_steps(out) == list(range(1, STEPS + 1))
    resumed = read_metrics(out)
    for step in range(1, STEPS + 1):
        assert resumed[step]["train/loss"] == pytest.approx(reference[step]["train/loss"], rel=rel), step
    assert resumed[STEPS]["val/loss"] == pytest.approx(reference[STEPS]["val/loss"], rel=rel)


def start_and_wait_for_a_checkpoint(cmd, out: Path) -> subprocess.Popen:
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (out / "checkpoints" / "latest").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be signalled"
    return proc


def check_interrupted(out: Path, signal_name: str) -> int:
    summary = json.loads((out / "summary.json").read_text())
    assert summary["interrupted"] is True and summary["signal"] == signal_name
    step = summary["step"]
    assert 10 <= step < STEPS
    assert (out / "checkpoints" / f"step_{step:08d}" / "manifest.json").is_file()
    assert (out / "checkpoints" / "latest").read_text() == f"step_{step:08d}"
    assert not (out / "model").exists()
    assert logged_steps(out) == list(range(1, step + 1))  # the last step before the stop is logged too
    return step


def test_sigterm_to_two_process_training_saves_and_resume_repeats_the_losses(tmp_path, corpus_dir, reference):
    out = tmp_path / "run"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                str(free_port()), TRAIN_PY]
    proc = start_and_wait_for_a_checkpoint([*torchrun, *args(corpus_dir, out)], out)
    proc.send_signal(signal.SIGTERM)  # torchrun passes it on to both workers
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode != 0
    step = check_interrupted(out, "SIGTERM")
    assert f"interrupted by SIGTERM at step {step} of {STEPS}" in stderr

    run_cli(args(corpus_dir, out), launcher=torchrun)
    assert_repeats(out, reference, rel=1e-5)  # two processes against one: summation order differs
    assert "interrupted" not in json.loads((out / "summary.json").read_text())


def test_slurm_script_forwards_usr1_and_requeues(tmp_path, corpus_dir, reference):
    """launch/slurm.sbatch run by bash with `srun` and `scontrol` stand-ins (no SLURM here): the
    script's own signal handling and requeue are what is tested, on a real training run."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text('#!/usr/bin/env bash\nshift\nexec "$@"\n')  # drop --kill-on-bad-exit=1
    (bin_dir / "scontrol").write_text(f'#!/usr/bin/env bash\necho "$@" >> {tmp_path}/scontrol.log\n'
                                      'if [ "$1" = show ]; then echo localhost; fi\n')
    for stub in bin_dir.iterdir():
        stub.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "4242",
           "SLURM_JOB_NODELIST": "localhost"}
    # A script, not a link: a linked venv interpreter would not find its venv.
    (bin_dir / "python").write_text(f'#!/usr/bin/env bash\nexec {sys.executable} "$@"\n')
    (bin_dir / "python").chmod(0o755)
    out = tmp_path / "run"
    proc = subprocess.Popen(["bash", str(REPO / "launch" / "slurm.sbatch"), "train", *args(corpus_dir, out)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (out / "checkpoints" / "latest").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGUSR1)  # sbatch --signal=B:USR1@300 signals the batch script
    time.sleep(0.1)
    proc.send_signal(signal.SIGUSR1)  # a second signal, likely during the save: changes nothing
    proc.communicate(timeout=120)
    assert proc.returncode == EXIT_INTERRUPTED
    check_interrupted(out, "SIGUSR1")
    assert "requeue 4242" in (tmp_path / "scontrol.log").read_text()

    # The requeued job runs the script again and continues (a finished run started again exits at
    # once: tests/cli/test_rerun.py).
    subprocess.run(["bash", str(REPO / "launch" / "slurm.sbatch"), "train", *args(corpus_dir, out)],
                   env=env, check=True, capture_output=True, timeout=300)
    assert_repeats(out, reference, rel=1e-6)
    assert (tmp_path / "scontrol.log").read_text().count("requeue") == 1


def test_sigkill_mid_run_resumes_from_the_last_checkpoint(tmp_path, corpus_dir, reference):
    """A node that dies: no signal handling, no final save. The steps logged after the last
    checkpoint are dropped from metrics.jsonl and repeated, each logged once."""
    out = tmp_path / "run"
    proc = start_and_wait_for_a_checkpoint([sys.executable, "-m", "minitron.cli.train", *args(corpus_dir, out)], out)
    proc.kill()
    proc.wait()
    assert not (out / "summary.json").exists() and not (out / "model").exists()

    run_cli(args(corpus_dir, out))
    assert_repeats(out, reference, rel=1e-6)

    # resume=never starts over in the finished run's directory: the old checkpoints and metrics
    # go, and its first step is the reference's.
    run_cli(args(corpus_dir, out, "resume=never", "train.max_steps=1"))
    assert logged_steps(out) == [1]
    assert read_metrics(out)[1]["train/loss"] == pytest.approx(reference[1]["train/loss"], rel=1e-6)
    assert not (out / "checkpoints").exists()


def test_damaged_checkpoints_are_skipped_for_the_newest_usable_one(tmp_path, corpus_dir, reference):
    out = tmp_path / "run"
    # A segment of the reference's schedule that stops at step 20, checkpointed at 10 and 20.
    run_cli(args(corpus_dir, out, "train.max_steps=20", f"train.schedule_steps={STEPS}", "train.keep_checkpoints=2"))
    checkpoints = out / "checkpoints"

    # Neither usable (the newest cut short mid-save, the older one's manifest damaged): one line
    # naming resume, a warning for each; the disk as it was.
    newest, older = checkpoints / "step_00000020" / MANIFEST, checkpoints / "step_00000010" / MANIFEST
    manifests = {path: path.read_text() for path in (newest, older)}
    newest.unlink()
    older.write_text("{")
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    proc = run_cli(args(corpus_dir, out, f"train.schedule_steps={STEPS}", "train.keep_checkpoints=2"), check=False)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: resume: none of the 2 checkpoints"), proc.stderr[-2000:]
    assert "step_00000020 was never finished (no manifest.json" in proc.stdout + proc.stderr
    assert "step_00000010 is unusable (no readable manifest.json)" in proc.stdout + proc.stderr
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before
    for path, text in manifests.items():
        path.write_text(text)

    # The newest truncated: skipped with a warning naming it and both sizes; the run resumes from
    # step 10 and repeats the reference.
    states = checkpoints / "step_00000020" / "mp_rank_00_model_states.pt"
    size = states.stat().st_size
    with states.open("r+b") as f:
        f.truncate(size // 2)
    proc = run_cli(args(corpus_dir, out, f"train.schedule_steps={STEPS}", "train.keep_checkpoints=2"))
    warnings = [line for line in (proc.stdout + proc.stderr).splitlines() if "step_00000020 is unusable" in line]
    assert len(warnings) == 1 and "mp_rank_00_model_states.pt" in warnings[0], proc.stdout[-3000:]
    assert f"{size // 2:,} bytes, {size:,} when saved" in warnings[0]
    assert_repeats(out, reference, rel=1e-6)


def test_a_save_cut_short_is_ignored_and_with_nothing_before_it_the_run_starts_over(tmp_path, caplog):
    # A kill during the first save leaves one checkpoint directory and no manifest.
    cut_short = tmp_path / "step_00000004"
    cut_short.mkdir()
    (cut_short / "mp_rank_00_model_states.pt").write_bytes(b"PK\x03\x04")
    assert newest_usable(tmp_path) is None
    assert "step_00000004 was never finished" in caplog.text
    # With a finished one before it, that one is taken.
    finished = tmp_path / "step_00000002"
    finished.mkdir()
    (finished / MANIFEST).write_text(json.dumps({"step": 2, "files": {}}))
    assert newest_usable(tmp_path) == "step_00000002"


def test_a_diverged_loss_stops_with_one_line_and_saves_nothing_after_it(tmp_path, corpus_dir):
    out = tmp_path / "run"
    proc = run_cli(tiny_args(corpus_dir, out, "train.max_steps=30", "train.save_every=1", "train.lr=1e4",
                             "train.grad_clip=0", "train.warmup_steps=0", "train.eval_every=0"), check=False)
    assert proc.returncode == 1
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: train.lr: the loss became nan at step "), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    step = int(errors[0].split("at step ")[1].split(";")[0])
    saved = sorted(int(p.name[5:]) for p in (out / "checkpoints").glob("step_*"))
    assert saved and max(saved) == step - 1  # every good step was saved, the bad one was not
    assert not (out / "summary.json").exists() and not (out / "model").exists()
