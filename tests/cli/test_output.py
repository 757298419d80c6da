"""What a user sees and gets, on real runs: minitron's lines and progress bars on the terminal,
other libraries' output in the run's log file (on the terminal too with log_level=debug), a last
line saying where everything is, checkpoints tidied after a finished run, and exported files whose
modes follow the umask."""
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import run_cli, tiny_args

TRAIN = [sys.executable, "-m", "minitron.cli.train"]
PRUNE = [sys.executable, "-m", "minitron.cli.prune"]
# Lines that other libraries write when DeepSpeed is imported and its engine starts on a CPU, and
# when transformers loads or saves weights.
NOISE = ("DeepSpeed", "real_accelerator", "Setting accelerator", "gcc ", "shm_comm_op", "Loading weights",
         "Writing model shards", "wandb:")


def run_with_umask(cmd, umask: int) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, preexec_fn=lambda: os.umask(umask))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def modes(directory: Path) -> dict:
    return {p.name: stat.S_IMODE(p.stat().st_mode) for p in [directory, *directory.iterdir()]}


def noise_in(text: str) -> list:
    return [line for line in text.splitlines() if any(n in line for n in NOISE)]


def test_training_terminal_shows_minitron_only_and_the_log_file_has_the_rest(tmp_path, corpus_dir):
    out = tmp_path / "run"
    proc = run_with_umask([*TRAIN, *tiny_args(corpus_dir, out, "logger=wandb", "train.save_every=3")], 0o027)
    terminal = proc.stdout + proc.stderr
    assert noise_in(terminal) == [], noise_in(terminal)
    assert "train:" in proc.stderr and "val=nan" not in proc.stderr  # the bar; no val before the first one
    assert "model: " in proc.stdout and "attention implementation" not in proc.stdout  # a debug line
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("train done in ") and f"everything is in {out}/ (log: train.log)" in last

    log = (out / "train.log").read_text()
    assert "real_accelerator" in log and "wandb:" in log  # DeepSpeed's announcement, W&B's banner
    assert "minitron.train.job: model: " in log  # minitron's own lines are in the file too

    # The exported model and summary follow the umask (safetensors writes 0600 on its own).
    assert set(modes(out / "model").values()) <= {0o750, 0o640}, modes(out / "model")
    assert modes(out / "model")["model.safetensors"] == 0o640
    # A finished run keeps no checkpoints by default, and says so.
    assert not (out / "checkpoints").exists()
    assert "removed 1 checkpoint (" in proc.stdout


def test_debug_shows_everything_and_a_bad_level_is_refused(tmp_path, corpus_dir):
    out = tmp_path / "run"
    proc = run_cli(tiny_args(corpus_dir, out, "log_level=debug", "train.max_steps=2", "train.keep_checkpoints=0",
                             "train.save_every=1"), launcher=TRAIN)
    assert "real_accelerator" in proc.stdout + proc.stderr
    assert "kept 1 checkpoint (" in proc.stdout and (out / "checkpoints" / "step_00000001").is_dir()

    proc = run_cli(tiny_args(corpus_dir, tmp_path / "bad", "log_level=loud"), launcher=TRAIN, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == "error: log_level: 'loud' is not one of debug, info, warning, error"
    assert not (tmp_path / "bad").exists()


@pytest.mark.slow
def test_pruning_the_default_teacher_shows_a_moving_bar_and_no_library_output(tmp_path, embedded_teacher):
    out = tmp_path / "pruned"
    proc = run_with_umask([*PRUNE, f"model.path={embedded_teacher / 'model'}", "prune.export.hidden_size=192",
                           "prune.export.num_layers=3", "prune.calibration.num_samples=64", "prune.depth.eval_blocks=16", f"output_dir={out}"], 0o002)
    terminal = proc.stdout + proc.stderr
    assert noise_in(terminal) == [], noise_in(terminal)
    # The calibration bar is redrawn as blocks go by: 0 of 64, some in between, all 64.
    counts = {int(part.split("|")[2].split("/")[0]) for part in proc.stderr.replace("\r", "\n").splitlines()
              if part.startswith("calibration:")}
    assert {0, 64} < counts, counts
    assert "depth: loss without each layer" in proc.stderr
    assert proc.stdout.strip().splitlines()[-1].startswith("prune done in ")
    assert (out / "prune.log").is_file()
    assert modes(out)["model.safetensors"] == 0o664 and modes(out)[out.name] == 0o775
