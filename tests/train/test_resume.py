"""A segment of a longer schedule continues like one run (a SIGKILLed, preempted or damaged run's
resume: test_preemption.py)."""
import pytest

from conftest import logged_steps, read_metrics, run_cli, tiny_args


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
