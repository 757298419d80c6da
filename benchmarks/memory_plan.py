"""The memory planner (minitron/memory/plan.py) against measured peaks: real 2-step distillations
on this machine's CPU, each rank's peak resident memory minus its memory before the models
(summary.json's `memory`), next to what `minitron-plan plan.device=cpu` predicts.

    python benchmarks/memory_plan.py [--sets calibration validation]
    python benchmarks/memory_plan.py --device gpu    # one GPU: the 1-process configurations
    python benchmarks/memory_plan.py --job prune     # minitron-prune against `minitron-plan prune`


`calibration` is the pair the planner's per-parameter constants were read from (an 86M teacher,
a 26M student, 64-token blocks); `validation` a pair of other shapes (119M and 29M, 128-token
blocks) that nothing was fitted to. Random weights with a BPE tokenizer trained on the standard
library; each configuration runs as its own process group (torchrun for 2 processes).

With `--device gpu` the measured figure is each rank's peak allocated GPU memory above its mark
(summary.json's `memory` on a GPU), next to the planner's device prediction for `plan.device=gpu`;
on one GPU only the 1-process configurations run (NCCL takes one GPU per rank), ZeRO-3 with and
without the teacher offloaded to the host among them, whose tokens/s is offload's measured cost.
The `gpu` set is larger (a 0.9B teacher, 1024-token blocks), as a GPU's users run.

With `--job prune` each set's teacher is pruned (32 calibration blocks of 8 per pass, depth by
loss on 16 blocks) to the student's depth and FFN width, replicated and ZeRO-3-partitioned, from
its fp32 checkpoint in fp32 and in bf16; each run scores afresh (its own scores directory).
"""
import argparse
import json
import os
import socket
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

import torch

SETS = {
    "calibration": {"teacher": (768, 2304, 12), "student": (512, 1536, 8), "seq_len": 64},
    "validation": {"teacher": (1024, 2816, 10), "student": (640, 1792, 6), "seq_len": 128},
    "gpu": {"teacher": (2048, 8192, 16), "student": (2048, 5632, 8), "seq_len": 1024},
}
CONFIGS = [  # (processes, distill keys)
    (1, ["deepspeed=zero0"]),
    (1, ["deepspeed=zero0", "train.activation_checkpointing=true"]),
    (2, ["deepspeed=zero0"]),
    (1, ["deepspeed=zero1"]),
    (2, ["deepspeed=zero1"]),
    (2, ["deepspeed=zero2"]),
    (2, ["deepspeed=zero3"]),
    (2, ["deepspeed=zero3", "teacher.offload=cpu"]),
    (1, ["deepspeed=zero0", "train.precision=bf16"]),
    (2, ["deepspeed=zero0", "train.precision=bf16"]),
    (2, ["deepspeed=zero3", "train.precision=bf16"]),
]
PRUNE_CONFIGS = [
    (1, ["deepspeed=zero0"]),
    (1, ["deepspeed=zero0", "prune.precision=bf16"]),
    (2, ["deepspeed=zero3"]),
    (2, ["deepspeed=zero3", "prune.precision=bf16"]),
]
GPU_CONFIGS = [
    (1, ["deepspeed=zero0"]),
    (1, ["deepspeed=zero0", "train.activation_checkpointing=true"]),
    (1, ["deepspeed=zero0", "train.precision=bf16"]),
    (1, ["deepspeed=zero1", "train.precision=bf16"]),
    (1, ["deepspeed=zero3", "train.precision=bf16"]),
    (1, ["deepspeed=zero3", "train.precision=bf16", "teacher.offload=cpu"]),
]


def checkpoint(out: Path, shape, tokenizer_dir: Path, vocab: int) -> Path:
    from transformers import AutoModelForCausalLM, LlamaConfig

    hidden, ffn, layers = shape
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                      num_attention_heads=8, num_key_value_heads=4, head_dim=hidden // 8, max_position_embeddings=512)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(out)
    for f in tokenizer_dir.iterdir():
        (out / f.name).write_bytes(f.read_bytes())
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(cmd, env) -> None:
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sets", nargs="+", default=None, choices=list(SETS))
    parser.add_argument("--device", default="cpu", choices=["cpu", "gpu"])
    parser.add_argument("--job", default="distill", choices=["distill", "prune"])
    parser.add_argument("--steps", type=int, default=None,
                        help="default 2 on the CPU, 8 on a GPU (tokens/s from step 2)")
    args = parser.parse_args()
    on_gpu = args.device == "gpu"
    sets = args.sets or (["gpu"] if on_gpu else ["calibration", "validation"])
    configs = PRUNE_CONFIGS if args.job == "prune" else GPU_CONFIGS if on_gpu else CONFIGS
    steps = args.steps or (8 if on_gpu else 2)
    from minitron.data.tokenizer import train_bpe_tokenizer

    work = Path(tempfile.mkdtemp(prefix="memory_plan_"))
    corpus = work / "corpus"
    corpus.mkdir()
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    docs = [p.read_text(encoding="utf-8", errors="replace") for p in sorted(stdlib.glob("*.py"))[:40]]
    for i, doc in enumerate(docs):
        (corpus / f"{i:03d}.txt").write_text(doc)
    tokenizer = work / "tokenizer"
    train_bpe_tokenizer(docs, 512).save_pretrained(tokenizer)
    env = {**os.environ, "MINITRON_CACHE": str(work / "cache")}
    print("| set | processes | configuration | measured MiB per rank | predicted MiB | predicted / measured "
          "| tokens/s |")
    print("|---|---|---|---|---|---|---|")
    for name in sets:
        spec = SETS[name]
        teacher = checkpoint(work / name / "teacher", spec["teacher"], tokenizer, 512)
        student = checkpoint(work / name / "student", spec["student"], tokenizer, 512)
        if args.job == "prune":
            plan = ["prune", f"model.path={teacher}"]
            common = [*plan[1:], "logger=none", f"data.seq_len={spec['seq_len']}",
                      "prune.calibration.micro_batch_size=8", f"prune.export.num_layers={spec['student'][2]}",
                      f"prune.export.ffn_hidden_size={spec['student'][1]}"]
            run_keys = ["prune.calibration.num_samples=32", "prune.depth.eval_blocks=16"]
        else:
            plan = []
            common = [f"teacher.path={teacher}", f"student.path={student}", "logger=none",
                      f"data.seq_len={spec['seq_len']}", "train.global_batch_size=4"]
            run_keys = [f"train.max_steps={steps}", "train.eval_every=0", "train.eval_blocks=4", "train.save_every=0"]
        for i, (processes, keys) in enumerate(configs):
            out = work / name / f"run{i}"
            plan_dir = work / name / f"plan{i}"
            run([sys.executable, "-m", "minitron.cli.plan", *plan, *common, f"output_dir={plan_dir}",
                 f"plan.processes={processes}", f"plan.device={args.device}", *keys], env)
            command = f"minitron.cli.{args.job}"
            launcher = ([sys.executable, "-m", command] if processes == 1 else
                        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
                         "--master_port", str(free_port()), "-m", command])
            fresh = [f"prune.scores_dir={out}.scores"] if args.job == "prune" else []  # no cached scores
            run([*launcher, *common, f"output_dir={out}", f"data.path={corpus}", *run_keys, *fresh, *keys], env)
            summary = json.loads((out / "summary.json").read_text())
            memory = summary["memory"]
            measured = max(p - b for p, b in zip(memory["peak_bytes"], memory["before_models_bytes"]))
            predicted = predicted_bytes(json.loads((plan_dir / "plan.json").read_text()), keys, on_gpu)
            speed = f"{summary['tokens_per_s']:,.0f}" if "tokens_per_s" in summary else "-"
            print(f"| {name} | {processes} | {' '.join(keys)} | {measured / 2**20:,.0f} | {predicted / 2**20:,.0f} "
                  f"| {predicted / measured:.2f} | {speed} |", flush=True)


def predicted_bytes(plan: dict, keys, on_gpu: bool) -> float:
    """What the measured figure counts: on a GPU the device's share, on the CPU everything."""
    stage = int(next(k for k in keys if k.startswith("deepspeed=")).removeprefix("deepspeed=zero"))
    precision = "bf16" if {"train.precision=bf16", "prune.precision=bf16"} & set(keys) else "fp32"
    [row] = [c for c in plan["configurations"] if c["zero_stage"] == stage and c["precision"] == precision
             and c["teacher_offload"] == ("cpu" if "teacher.offload=cpu" in keys else "none")
             and c["activation_checkpointing"] == ("train.activation_checkpointing=true" in keys)]
    return row["bytes"]["device"] + (0 if on_gpu else row["bytes"]["host"])


if __name__ == "__main__":
    main()
