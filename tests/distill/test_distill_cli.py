"""minitron-distill end to end on a tiny pruned student: logits + hidden-state losses export the
student alone (the lm preset and random init run in test_distill_result.py); ZeRO-3 over 2
processes (teacher sharded too) matches 1 process; a preempted 2-process run resumes with the same
losses; bad input is refused before training."""
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import compose_job, logged_steps, read_metrics, run_cli
from minitron.config import ConfigError
from minitron.distill.job import check_distill_inputs
from distributed.test_multiprocess import free_port

DISTILL = [sys.executable, "-m", "minitron.cli.distill"]
# The student has one layer: match the embedding outputs and the final normed hidden states.
HIDDEN = ["distill=logits_hidden", "distill.intermediate.pairs=[[0,0],[-1,-1]]"]
DISTILL_PY = str(Path(__file__).resolve().parents[2] / "minitron" / "cli" / "distill.py")


def distill_args(teacher, student, corpus_dir, out, *extra):
    return [f"teacher.path={teacher}", f"student.path={student}", f"data.path={corpus_dir}", f"output_dir={out}",
            "logger=none", "data.seq_len=64", "train.micro_batch_size=4", "train.global_batch_size=8",
            "train.max_steps=4", "train.eval_every=2", "train.eval_blocks=16", "train.save_every=0",
            "train.warmup_steps=1", "train.lr=3e-3", "distill.logits.chunk_tokens=100", *extra]


@pytest.fixture(scope="module")
def student(pruned_student):
    return pruned_student


# Every parameter partitioned under ZeRO-3 (by default small ones stay whole on each rank).
ZERO3 = ["deepspeed=zero3", "+deepspeed.zero_optimization.stage3_param_persistence_threshold=0"]


@pytest.fixture(scope="module")
def zero3_run(tmp_path_factory, tiny_teacher, student, corpus_dir):
    """One process, ZeRO-3, logits + hidden-state losses."""
    out = tmp_path_factory.mktemp("zero3") / "one"
    run_cli(distill_args(tiny_teacher, student, corpus_dir, out, *ZERO3, *HIDDEN), launcher=DISTILL)
    return out


def test_logits_hidden_preset_trains_and_exports_the_student_alone(zero3_run, student):
    out = zero3_run
    summary = json.loads((out / "summary.json").read_text())
    for key in ("kd_loss", "hidden_0_0", "hidden_1_2", "hidden_weight", "val_loss", "val_ppl", "teacher_val_loss",
                "tokens_per_s"):
        assert summary[key] > 0, key
    assert summary["mfu"] is None  # no GPU here
    assert summary["teacher_params_per_rank"] == [summary["teacher_params"]]  # one rank holds it all
    metrics = read_metrics(out)
    assert {"train/kd", "train/hidden_0_0", "train/hidden_1_2", "val/loss"} <= set(metrics[4])
    # The dynamic weight makes the hidden term weigh as much as the logit term at every step.
    for row in metrics.values():
        hidden = row["train/hidden_0_0"] + row["train/hidden_1_2"]
        assert row["train/loss"] == pytest.approx(2 * row["train/kd"], rel=0.05)
        assert row["train/hidden_weight"] == pytest.approx(row["train/kd"] / hidden, rel=0.05)

    model_dir = Path(summary["output_model"])
    assert {"pruning.json", "distill.json", "config.json", "model.safetensors", "tokenizer.json"} <= {
        p.name for p in model_dir.iterdir()}
    with safe_open(model_dir / "model.safetensors", "pt") as f:
        assert not [k for k in f.keys() if "projection" in k]
    distilled = AutoModelForCausalLM.from_pretrained(model_dir)
    pruned = AutoModelForCausalLM.from_pretrained(student)
    assert distilled.config.hidden_size == 48
    assert not torch.equal(distilled.model.layers[0].mlp.down_proj.weight, pruned.model.layers[0].mlp.down_proj.weight)
    manifest = json.loads((model_dir / "distill.json").read_text())
    assert manifest["preset"] == "logits_hidden" and manifest["tokens_seen"] == 4 * 8 * 64


def test_zero3_two_processes_match_one_and_shard_the_teacher(tmp_path, tiny_teacher, student, corpus_dir, zero3_run):
    one, two = zero3_run, tmp_path / "two"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                str(free_port()), DISTILL_PY]
    run_cli(distill_args(tiny_teacher, student, corpus_dir, two, *ZERO3, *HIDDEN), launcher=torchrun)
    a, b = read_metrics(one), read_metrics(two)
    assert sorted(b) == [1, 2, 3, 4]
    for step in a:
        for key in ("train/loss", "train/kd", "train/hidden_1_2"):
            assert b[step][key] == pytest.approx(a[step][key], rel=1e-5, abs=1e-6), (step, key)
    summary = json.loads((two / "summary.json").read_text())
    assert summary["val_loss"] == pytest.approx(json.loads((one / "summary.json").read_text())["val_loss"], rel=1e-5)
    per_rank, total = summary["teacher_params_per_rank"], summary["teacher_params"]
    assert len(per_rank) == 2
    for held in per_rank:
        assert held == pytest.approx(total / 2, rel=0.01)


def test_preempted_two_process_run_resumes_with_the_same_losses_without_saving_the_teacher(
        tmp_path, tiny_teacher, student, corpus_dir):
    """SIGUSR1 to each worker, as srun passes on sbatch's --signal: both ranks stop at the same
    step, save and exit; resume=auto repeats the uninterrupted run's losses, each step logged once."""
    steps = 20

    def args(out, *extra):
        return distill_args(tiny_teacher, student, corpus_dir, out, f"train.max_steps={steps}", "train.save_every=5",
                            "train.eval_every=40", *HIDDEN, *extra)

    reference = tmp_path / "reference"
    run_cli(args(reference), launcher=DISTILL)
    out = tmp_path / "preempted"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                str(free_port()), DISTILL_PY]
    proc = subprocess.Popen([*torchrun, *args(out)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    latest = out / "checkpoints" / "latest"
    while not latest.exists() and proc.poll() is None:
        time.sleep(0.02)
    workers = psutil.Process(proc.pid).children()
    assert proc.poll() is None and len(workers) == 2, "the run ended before it could be signalled"
    for worker in workers:
        worker.send_signal(signal.SIGUSR1)
    _, stderr = proc.communicate(timeout=120)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["interrupted"] and summary["signal"] == "SIGUSR1" and 5 <= summary["step"] < steps
    assert f"interrupted by SIGUSR1 at step {summary['step']}" in stderr
    assert logged_steps(out) == list(range(1, summary["step"] + 1)) and not (out / "model").exists()

    # Checkpoints hold the student and the projection, never the teacher.
    states = torch.load(next((out / "checkpoints").glob("step_*/mp_rank_00_model_states.pt")), weights_only=False)
    names = list(states["module"])
    assert names and all(n.startswith(("student.", "projection.")) for n in names)

    run_cli(args(out, "resume=auto"), launcher=torchrun)
    resumed, expected = read_metrics(out), read_metrics(reference)
    assert logged_steps(out) == list(range(1, steps + 1))
    for step in range(1, steps + 1):  # two processes against one: summation order differs
        assert resumed[step]["train/loss"] == pytest.approx(expected[step]["train/loss"], rel=1e-5), step
    assert json.loads((out / "summary.json").read_text())["val_loss"] == pytest.approx(
        json.loads((reference / "summary.json").read_text())["val_loss"], rel=1e-5)


@pytest.fixture(scope="module")
def other_tokenizer_student(tmp_path_factory, student):
    """The pruned student with one extra token in its tokenizer."""
    out = tmp_path_factory.mktemp("other_tok") / "student"
    shutil.copytree(student, out)
    tok = AutoTokenizer.from_pretrained(out)
    tok.add_tokens(["<extra_token_for_test>"])
    tok.save_pretrained(out)
    return out


def gpt2_dir(near: Path) -> Path:
    out = near.parent / "gpt2"
    out.mkdir(exist_ok=True)
    (out / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 64, "n_layer": 2, "n_head": 2}))
    return out


BAD = [
    ("student.path: its tokenizer differs", lambda t, s, o: [f"student.path={o}"]),
    ("distill.intermediate.pairs: student index 5",
     lambda t, s, o: [*HIDDEN, "distill.intermediate.pairs=[[0,0],[5,1]]"]),
    ("distill.intermediate.pairs: teacher index -4", lambda t, s, o: [*HIDDEN, "distill.intermediate.pairs=[[0,-4]]"]),
    ("distill.intermediate.projection:", lambda t, s, o: [*HIDDEN, "distill.intermediate.projection=false"]),
    ("teacher.path: no such directory", lambda t, s, o: [f"teacher.path={t}/missing"]),
    ("student.path: no such directory", lambda t, s, o: [f"student.path={s}/missing"]),
    ("student.path: set it", lambda t, s, o: ["student.path=null"]),
    ("student.path: model type 'gpt2' is not supported", lambda t, s, o: [f"student.path={gpt2_dir(o)}"]),
    ("distill.logits.divergence:", lambda t, s, o: ["distill.logits.divergence=kl"]),
    ("distill.logits.ce_weight:", lambda t, s, o: ["distill.logits.divergence=none"]),
    ("data.seq_len:", lambda t, s, o: ["data.seq_len=4096"]),
    ("distill.logits.top_k: 100000 is above the teacher's vocabulary", lambda t, s, o: ["distill.logits.top_k=100000"]),
    ("student.path: the student", lambda t, s, o: [f"teacher.path={s}", f"student.path={t}"]),  # swapped
    ("train.lr: must be positive", lambda t, s, o: ["train.lr=-1"]),
    ("output_dir: ", lambda t, s, o: [f"output_dir={t}/config.json"]),
]


@pytest.mark.parametrize("message,overrides", BAD, ids=[m.split(":")[0] + str(i) for i, (m, _) in enumerate(BAD)])
def test_bad_input_is_named_by_the_cheap_checks(tmp_path, tiny_teacher, student, other_tokenizer_student,
                                               corpus_dir, message, overrides):
    cfg = compose_job("distill", *distill_args(tiny_teacher, student, corpus_dir, tmp_path / "out"),
                          *overrides(tiny_teacher, student, other_tokenizer_student))
    with pytest.raises(ConfigError) as err:
        check_distill_inputs(cfg, world_size=1)
    assert str(err.value).startswith(message)


@pytest.mark.parametrize("case", [0, 4])
def test_bad_input_exits_with_one_line_and_writes_nothing(tmp_path, tiny_teacher, student, other_tokenizer_student,
                                                          corpus_dir, case):
    message, overrides = BAD[case]
    out = tmp_path / "out"
    proc = run_cli([*distill_args(tiny_teacher, student, corpus_dir, out),
                    *overrides(tiny_teacher, student, other_tokenizer_student)], launcher=DISTILL, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and lines[0].startswith(f"error: {message}"), proc.stderr[-2000:]
    assert not (out / "summary.json").exists() and not (out / "model").exists()
