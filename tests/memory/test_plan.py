"""minitron-plan: its per-rank predictions against the peaks real distillation runs measure in
themselves (peak resident memory minus the memory before the models, summary.json's `memory`),
for four configurations including ZeRO-3 over 2 processes with the teacher offloaded; and its
recommendation and refusals."""
import json
import shutil
import sys

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from conftest import run_cli
from distributed.test_multiprocess import free_port

PLAN = [sys.executable, "-m", "minitron.cli.plan"]
DISTILL = [sys.executable, "-m", "minitron.cli.distill"]
# Shapes unlike those the planner's constants were read from (benchmarks/memory_plan.py).
TEACHER = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=10)
STUDENT = dict(hidden_size=640, intermediate_size=1792, num_hidden_layers=6)


def random_checkpoint(tiny_teacher, out, shape):
    config = AutoConfig.from_pretrained(tiny_teacher)
    config.update(dict(shape, num_attention_heads=8, num_key_value_heads=4, head_dim=shape["hidden_size"] // 8,
                       tie_word_embeddings=False))
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    for f in tiny_teacher.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(f, out / f.name)
    return out


@pytest.fixture(scope="module")
def pair(tmp_path_factory, tiny_teacher):
    root = tmp_path_factory.mktemp("plan_models")
    return (random_checkpoint(tiny_teacher, root / "teacher", TEACHER),
            random_checkpoint(tiny_teacher, root / "student", STUDENT))


def common(pair, out, global_batch=4):
    teacher, student = pair
    return [f"teacher.path={teacher}", f"student.path={student}", f"output_dir={out}", "logger=none",
            "data.seq_len=128", f"train.global_batch_size={global_batch}"]


@pytest.mark.slow
@pytest.mark.parametrize("processes, keys", [
    (1, ["deepspeed=zero0"]),
    (1, ["deepspeed=zero0", "train.activation_checkpointing=true"]),
    (2, ["deepspeed=zero0"]),
    (2, ["deepspeed=zero2"]),
    (2, ["deepspeed=zero3"]),
    (2, ["deepspeed=zero3", "teacher.offload=cpu"]),
], ids=["zero0", "zero0-checkpointing", "zero0-2proc", "zero2-2proc", "zero3-2proc", "zero3-2proc-offload"])
def test_predicted_peaks_are_within_15_percent_of_measured(pair, corpus_dir, tmp_path, processes, keys):
    run_cli([*common(pair, tmp_path / "plan"), f"plan.processes={processes}", "plan.device=cpu", *keys],
            launcher=PLAN)
    plan = json.loads((tmp_path / "plan" / "plan.json").read_text())
    stage = int(next(k for k in keys if k.startswith("deepspeed=")).removeprefix("deepspeed=zero"))
    [predicted] = [c for c in plan["configurations"]
                   if c["zero_stage"] == stage and c["precision"] == "fp32"
                   and c["teacher_offload"] == ("cpu" if "teacher.offload=cpu" in keys else "none")
                   and c["activation_checkpointing"] == ("train.activation_checkpointing=true" in keys)]

    launcher = DISTILL if processes == 1 else [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node",
                                               str(processes), "--master_port", str(free_port()), "-m",
                                               "minitron.cli.distill"]
    run_cli([*common(pair, tmp_path / "run"), f"data.path={corpus_dir}", "train.max_steps=2", "train.eval_every=0",
             "train.eval_blocks=4", "train.save_every=0", *keys], launcher=launcher)
    memory = json.loads((tmp_path / "run" / "summary.json").read_text())["memory"]
    assert len(memory["peak_bytes"]) == processes
    expected = predicted["bytes"]["device"] + predicted["bytes"]["host"]
    for peak, before in zip(memory["peak_bytes"], memory["before_models_bytes"]):
        assert (peak - before) == pytest.approx(expected, rel=0.15), (keys, (peak - before) / 2**20, expected / 2**20)


def test_recommends_the_cheapest_configuration_that_fits(pair, tmp_path):
    proc = run_cli([*common(pair, tmp_path, 64), "plan.processes=8", "plan.device_memory_gb=1.0"], launcher=PLAN)
    plan = json.loads((tmp_path / "plan.json").read_text())
    fitting = [c for c in plan["configurations"] if c["precision"] == "fp32" and c["device_gb"] <= 1.0]
    assert fitting and len(fitting) < 10  # some fp32 configurations do not fit
    cheapest = min(fitting, key=lambda c: (c["teacher_offload"] != "none", c["activation_checkpointing"],
                                           c["zero_stage"]))
    assert plan["recommended"].startswith(f"deepspeed=zero{cheapest['zero_stage']} train.precision=fp32")
    assert ("teacher.offload=cpu" in plan["recommended"]) == (cheapest["teacher_offload"] == "cpu")
    assert ("activation_checkpointing" in plan["recommended"]) == cheapest["activation_checkpointing"]
    assert f"recommended: {plan['recommended']}" in proc.stdout
    # More memory never recommends a slower configuration; less memory never a larger one.
    roomy = run_cli([*common(pair, tmp_path / "roomy", 64), "plan.processes=8", "plan.device_memory_gb=80"],
                    launcher=PLAN)
    assert "recommended: deepspeed=zero0 train.precision=fp32" in roomy.stdout
    stages = {c["zero_stage"] for c in plan["configurations"]}
    assert stages == {0, 1, 2, 3} and len(plan["configurations"]) == 20
    zero3 = [c for c in plan["configurations"] if c["zero_stage"] == 3 and c["precision"] == "fp32"
             and not c["activation_checkpointing"]]
    offloaded = next(c for c in zero3 if c["teacher_offload"] == "cpu")
    resident = next(c for c in zero3 if c["teacher_offload"] == "none")
    assert offloaded["device_gb"] < resident["device_gb"] and offloaded["host_gb"] > 0


def test_a_student_alone_plans_without_a_teacher(pair, tmp_path):
    """distill=lm trains the student with no teacher: no teacher terms, on either device."""
    for device in ("gpu", "cpu"):
        run_cli([*common(pair, tmp_path / device), "distill=lm", f"plan.device={device}"], launcher=PLAN)
        plan = json.loads((tmp_path / device / "plan.json").read_text())
        assert plan["teacher_params"] == 0
        assert all(not any(k.startswith("teacher") for k in c["bytes"]) for c in plan["configurations"])


def test_a_device_no_configuration_fits_is_one_line_naming_the_key_and_the_smallest(pair, tmp_path):
    proc = run_cli([*common(pair, tmp_path), "plan.device_memory_gb=0.01"], launcher=PLAN, check=False)
    assert proc.returncode == 2
    [line] = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert line.startswith("error: plan.device_memory_gb: no configuration fits 0.01 GiB per device; the smallest "
                           "found needs ")
    # One process: ZeRO has nothing to partition over, so the smallest is plain data parallelism
    # with the student's activations recomputed.
    assert "GiB (zero0, fp32, activation checkpointing); use more processes (plan.processes)" in line
    assert not (tmp_path / "plan.json").exists()


PRUNE = [sys.executable, "-m", "minitron.cli.prune"]


def prune_common(pair, out):
    return [f"model.path={pair[0]}", f"output_dir={out}", "logger=none", "data.seq_len=128",
            "prune.calibration.micro_batch_size=8", "prune.export.num_layers=6", "prune.export.ffn_hidden_size=1792"]


@pytest.mark.slow
@pytest.mark.parametrize("processes, keys", [
    (1, ["deepspeed=zero0"]),
    (1, ["deepspeed=zero0", "prune.precision=bf16"]),
    (2, ["deepspeed=zero3"]),
], ids=["replicated", "replicated-bf16-from-fp32", "zero3-2proc"])
def test_pruning_peaks_are_within_15_percent_of_measured(pair, corpus_dir, tmp_path, processes, keys):
    """`minitron-plan prune` against minitron-prune's own peaks (summary.json's `memory`): the
    teacher's weights and calibration pass, a bf16 run's cast from the fp32 checkpoint, and the
    teacher partitioned over 2 ranks."""
    run_cli(["prune", *prune_common(pair, tmp_path / "plan"), f"plan.processes={processes}", "plan.device=cpu",
             *keys], launcher=PLAN)
    plan = json.loads((tmp_path / "plan" / "plan.json").read_text())
    assert plan["job"] == "prune" and len(plan["configurations"]) == 4
    stage = int(keys[0].removeprefix("deepspeed=zero"))
    precision = "bf16" if "prune.precision=bf16" in keys else "fp32"
    [predicted] = [c for c in plan["configurations"] if c["zero_stage"] == stage and c["precision"] == precision]

    launcher = PRUNE if processes == 1 else [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node",
                                             str(processes), "--master_port", str(free_port()), "-m",
                                             "minitron.cli.prune"]
    run_cli([*prune_common(pair, tmp_path / "run"), f"data.path={corpus_dir}", "prune.calibration.num_samples=32",
             "prune.depth.eval_blocks=16", *keys], launcher=launcher)
    memory = json.loads((tmp_path / "run" / "summary.json").read_text())["memory"]
    assert len(memory["peak_bytes"]) == processes
    for peak, before in zip(memory["peak_bytes"], memory["before_models_bytes"]):
        assert (peak - before) == pytest.approx(predicted["bytes"]["device"], rel=0.15), \
            (keys, (peak - before) / 2**20, predicted["bytes"]["device"] / 2**20)


def test_pruning_plan_recommends_and_refuses_by_the_device_memory(pair, tmp_path):
    """The cheapest pruning that fits (the replicated teacher before a partitioned one), and the
    one-line refusal naming the pruning's own micro-batch key when nothing fits."""
    roomy = run_cli(["prune", *prune_common(pair, tmp_path / "roomy"), "plan.processes=4", "plan.device_memory_gb=80"],
                    launcher=PLAN)
    assert "recommended: deepspeed=zero0 prune.precision=fp32" in roomy.stdout
    plan = json.loads((tmp_path / "roomy" / "plan.json").read_text())
    by = {(c["zero_stage"], c["precision"]): c for c in plan["configurations"]}
    # Four ranks each hold a quarter of the teacher.
    assert by[(3, "fp32")]["bytes"]["teacher_weights"] == pytest.approx(by[(0, "fp32")]["bytes"]["teacher_weights"] / 4)
    tight_gb = (by[(3, "fp32")]["device_gb"] + by[(0, "fp32")]["device_gb"]) / 2
    tight = run_cli(["prune", *prune_common(pair, tmp_path / "tight"), "plan.processes=4",
                     f"plan.device_memory_gb={tight_gb}"], launcher=PLAN)
    assert "recommended: deepspeed=zero3 prune.precision=fp32" in tight.stdout
    proc = run_cli(["prune", *prune_common(pair, tmp_path / "none"), "plan.device_memory_gb=0.01"], launcher=PLAN,
                   check=False)
    assert proc.returncode == 2
    [line] = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert line.startswith("error: plan.device_memory_gb: no configuration fits 0.01 GiB per device")
    assert line.endswith("use more processes (plan.processes) or a smaller prune.calibration.micro_batch_size or "
                         "data.seq_len")
    assert not (tmp_path / "none" / "plan.json").exists()
