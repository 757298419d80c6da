"""minitron-pipeline end to end on a tiny teacher it pretrains itself: every stage's output, the
report, a rerun that skips every stage, a run killed mid-distillation that resumes to the same
result, a changed target that reruns only its own stages, and bad input refused before any work."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import compose_job, run_cli
from minitron.config import ConfigError
from minitron.pipeline.plan import plan_pipeline

PIPELINE = [sys.executable, "-m", "minitron.cli.pipeline"]
HALF = "{name: half, fraction: 0.5}"
SHALLOW = "{name: shallow, shape: {num_layers: 1}}"


def pipeline_args(corpus_dir, out, *extra, targets=(HALF, SHALLOW)):
    return [f"output_dir={out}", f"data.path={corpus_dir}", "model=tiny", "logger=none", "data.vocab_size=512",
            "data.seq_len=64", "pretrain.max_steps=12", "pretrain.micro_batch_size=4", "pretrain.global_batch_size=8",
            "pretrain.eval_every=0", "pretrain.save_every=0", "train.micro_batch_size=4", "train.global_batch_size=8",
            "train.max_steps=8", "train.eval_every=4", "train.eval_blocks=16", "train.warmup_steps=1",
            "search_steps=2", "search.max_candidates=2", "search.eval_blocks=8", "prune.calibration.num_samples=16",
            "prune.calibration.micro_batch_size=4", "prune.depth.eval_blocks=8", "eval.blocks=16",
            f"targets=[{', '.join(targets)}]", *extra]


@pytest.fixture(scope="module")
def piped(tmp_path_factory, corpus_dir):
    out = tmp_path_factory.mktemp("pipeline") / "run"
    proc = run_cli(pipeline_args(corpus_dir, out, "logger=wandb"), launcher=PIPELINE)
    return out, proc, rows_by_model(out)  # the rows as first written (a later test changes a target)


def rows_by_model(out):
    return {(r["name"], r["kind"]): r for r in json.loads((out / "summary.json").read_text())["models"]}


def test_pipeline_writes_every_stage_and_the_report(piped):
    out, proc, _ = piped
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stages"] == ["importance", "search", "prune", "distill", "eval", "report"]
    rows = rows_by_model(out)
    assert set(rows) == {("teacher", "teacher"), ("half", "pruned"), ("shallow", "pruned"),
                         ("half", "distilled"), ("shallow", "distilled")}
    teacher = rows[("teacher", "teacher")]
    assert abs(rows[("half", "pruned")]["params"] / (0.5 * teacher["params"]) - 1) <= 0.05
    for name in ("half", "shallow"):
        assert rows[(name, "pruned")]["params"] == rows[(name, "distilled")]["params"] < teacher["params"]
    for stage in ("teacher", "importance", "search", "prune", "distill", "eval"):
        assert (out / stage).is_dir(), stage
    # Each stage's model is a plain checkpoint; the searched target's pruned model is the search's winner.
    assert rows[("half", "pruned")]["path"].endswith("winner")
    for r in rows.values():
        assert os.path.isfile(os.path.join(r["path"], "model.safetensors")), r["path"]
    for name in ("report.md", "loss_vs_tokens.png", "params_vs_ppl.png"):
        assert (out / name).stat().st_size > 0, name
    report = (out / "report.md").read_text()
    assert "| teacher | teacher |" in report and "| half | distilled |" in report
    winner = json.loads((next((out / "search").glob("half-*")) / "summary.json").read_text())["winner"]["name"]
    assert f"- half (distilled, {winner}):" in report  # the searched shape, named as the search names it
    # The table printed at the end and the same figures in W&B.
    assert "distilled" in proc.stdout and "pipeline done" in proc.stdout
    media = list((out / "wandb").glob("offline-run-*/files/media/images/pipeline/*.png"))
    assert len(media) == 2, media


def test_rerun_skips_every_stage(piped, corpus_dir):
    out, _, before = piped
    started = time.perf_counter()
    proc = run_cli(pipeline_args(corpus_dir, out), launcher=PIPELINE)
    seconds = time.perf_counter() - started
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stage_seconds"] == {}, summary["stage_seconds"]
    assert {"teacher", "importance", "search/half", "prune/shallow", "distill/half", "distill/shallow",
            "eval/teacher-teacher"} <= set(summary["stages_skipped"])
    assert rows_by_model(out) == before
    print(f"rerun of a finished pipeline: {seconds:.1f} s")
    assert "skipped (already done)" in proc.stdout


def test_changing_one_target_reruns_only_its_stages(piped, corpus_dir, tmp_path):
    out, _, _ = piped
    proc = run_cli(pipeline_args(corpus_dir, out, targets=(HALF, "{name: shallow, shape: {num_layers: 1, "
                                                                   "ffn_hidden_size: 96}}")), launcher=PIPELINE)
    summary = json.loads((out / "summary.json").read_text())
    ran = set(summary["stage_seconds"])
    assert ran == {"prune/shallow", "distill/shallow", "eval/shallow (pruned)", "eval/shallow (distilled)"}, ran
    assert {"teacher", "importance", "search/half", "distill/half"} <= set(summary["stages_skipped"])
    assert proc.returncode == 0


def test_killed_mid_distillation_resumes_to_the_same_result(piped, corpus_dir, tmp_path):
    _, _, want = piped
    out = tmp_path / "run"
    args = pipeline_args(corpus_dir, out, "train.save_every=2")
    proc = subprocess.Popen([*PIPELINE, *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not list(out.glob("distill/*/checkpoints/*")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the pipeline ended before it could be killed"
    assert not (out / "summary.json").exists()
    killed_in = [p.parent.parent for p in out.glob("distill/*/checkpoints/*")]
    assert killed_in and not any((d / "summary.json").exists() for d in killed_in)

    run_cli(args, launcher=PIPELINE)
    got = rows_by_model(out)
    assert got.keys() == want.keys()
    for key in want:
        assert got[key]["val_loss"] == pytest.approx(want[key]["val_loss"], rel=1e-6), key
    summary = json.loads((out / "summary.json").read_text())
    assert {"teacher", "importance", "search/half"} <= set(summary["stages_skipped"])


@pytest.mark.parametrize("overrides, message", [
    (["targets=[{fraction: 1.5}]"], "targets[0].fraction: must be between 0 and 1"),
    (["targets=[{params: 1e9}]"], "targets[0].params: 1,000,000,000 is not below the teacher's"),
    (["targets=[{shape: {hidden_size: 4096}}]"], "targets[0].shape: hidden_size: 4096 must be between 1 and"),
    ([f"targets=[{HALF}, {{name: again, fraction: 0.5}}]"], "targets: targets[0] and targets[1] are the same"),
    ([f"targets=[{HALF}, {{name: half, fraction: 0.25}}]"], "targets: targets[0] and targets[1] are both named"),
    (["targets=[{fraction: 0.5, shape: {num_layers: 1}}]"], "targets[0]: give exactly one of"),
    (["targets=[]"], "targets: list at least one student"),
    (["stages=[importance,prune,distil]"], "stages: unknown stage 'distil'"),
    (["stages=[prune,distill]"], "stages: prune needs importance"),
    (["stages=[importance,prune,report]"], "stages: report needs eval"),
    (["stages=[importance,prune,distill]", f"targets=[{HALF}]"], "stages: distill needs search for targets[0]"),
    (["eval.tasks=[no_such_task_anywhere]"], "eval.tasks:"),
    (["pretrain.max_steps=0"], "pretrain.max_steps: must be at least 1"),
    (["search_steps=0"], "search_steps: must be at least 1"),
    (["data.path=/no/such/corpus", f"targets=[{HALF}]"], "data.path:"),
])
def test_bad_input_is_refused_before_any_work(overrides, message, corpus_dir, tmp_path):
    cfg = compose_job("pipeline", f"output_dir={tmp_path / 'run'}", f"data.path={corpus_dir}", "model=tiny",
                      *overrides)
    with pytest.raises(ConfigError) as e:
        plan_pipeline(cfg)
    assert str(e.value).startswith(message), str(e.value)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "run").exists()


def test_bad_input_through_the_cli_is_one_line(corpus_dir, tmp_path):
    out = tmp_path / "run"
    proc = run_cli(pipeline_args(corpus_dir, out, "targets=[{fraction: 2}]"), launcher=PIPELINE, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: targets[0].fraction:")
    assert not out.exists()


def test_teacher_correction_prunes_and_distils_from_the_corrected_teacher(piped, corpus_dir, tmp_path):
    """With `correct` listed, the teacher is first trained on data.* through the training job; the
    importance scores, the pruned student and its distillation all come from the corrected one."""
    out = tmp_path / "run"
    run_cli(pipeline_args(corpus_dir, out, "stages=[correct,importance,prune,distill,eval,report]",
                          "correct.max_steps=3", "correct.micro_batch_size=4", "correct.global_batch_size=8",
                          "correct.eval_every=0", "correct.save_every=0", targets=(SHALLOW,)), launcher=PIPELINE)
    summary = json.loads((out / "summary.json").read_text())
    corrected = next((out / "correct").glob("teacher-*"))
    assert summary["teacher"] == str((corrected / "model").resolve())
    assert json.loads((corrected / "summary.json").read_text())["steps"] == 3
    pruned = next((out / "prune").glob("shallow-*"))
    assert json.loads((pruned / "pruning.json").read_text())["teacher"]["path"] == summary["teacher"]
    distill = json.loads((next((out / "distill").glob("shallow-*")) / "model" / "distill.json").read_text())
    assert distill["teacher"] == summary["teacher"]
    # The corrected teacher is another model than the pretrained one: its validation loss moved.
    rows = rows_by_model(out)
    _, _, first = piped
    assert rows[("teacher", "teacher")]["val_loss"] != first[("teacher", "teacher")]["val_loss"]


@pytest.mark.slow
def test_teacher_offload_and_shard_size_reach_the_distillation(piped, corpus_dir, tmp_path):
    """teacher.offload and export.max_shard_size are the pipeline's keys as they are
    minitron-distill's: under ZeRO-3 the distillation's teacher lives in CPU memory and the
    distilled student is written in shards, and the student is the one the plain run distils."""
    import yaml
    from transformers import AutoModelForCausalLM

    out, _, want = piped
    teacher = json.loads((out / "summary.json").read_text())["teacher"]
    run = tmp_path / "run"
    run_cli(pipeline_args(corpus_dir, run, f"model.path={teacher}", "stages=[importance,prune,distill,eval,report]",
                          "deepspeed=zero3", "teacher.offload=cpu", "export.max_shard_size=40KB", targets=(SHALLOW,)),
            launcher=PIPELINE)
    distill_dir = next((run / "distill").glob("shallow-*"))
    assert yaml.safe_load((distill_dir / "config.yaml").read_text())["teacher"]["offload"] == "cpu"
    index = json.loads((distill_dir / "model" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    AutoModelForCausalLM.from_pretrained(distill_dir / "model")
    got = rows_by_model(run)
    assert got[("shallow", "distilled")]["val_loss"] == pytest.approx(want[("shallow", "distilled")]["val_loss"],
                                                                      rel=1e-5)
