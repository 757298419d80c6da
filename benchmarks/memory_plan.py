"""The memory planner (minitron/memory/plan.py) against measured peaks: real 2-step distillations
on this machine's CPU, each rank's peak resident memory minus its memory before the models
(summary.json's `memory`), next to what `minitron-plan plan.device=cpu` predicts.

    python benchmarks/memory_plan.py [--sets calibration validation]

`calibration` is the pair the planner's per-parameter constants were read from (an 86M teacher,
a 26M student, 64-token blocks); `validation` a pair of other shapes (119M and 29M, 128-token
blocks) that nothing was fitted to. Random weights with a BPE tokenizer trained on the standard
library; each configuration runs as its own process group (torchrun for 2 processes).
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
}
CONFIGS = [  # (processes, distill keys)
    (1, ["deepspeed=zero0"]),
    (1, ["deepspeed=zero0", "train.activation_checkpointing=true"]),
    (1, ["deepspeed=zero1"]),
    (2, ["deepspeed=zero1"]),
    (2, ["deepspeed=zero2"]),
    (2, ["deepspeed=zero3"]),
    (2, ["deepspeed=zero3", "teacher.offload=cpu"]),
    (1, ["deepspeed=zero0", "train.precision=bf16"]),
    (2, ["deepspeed=zero3", "train.precision=bf16"]),
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
    parser.add_argument("--sets", nargs="+", default=list(SETS), choices=list(SETS))
    args = parser.parse_args()
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
    print("| set | processes | configuration | measured MiB per rank | predicted MiB | predicted / measured |")
    print("|---|---|---|---|---|---|")
    for name in args.sets:
        spec = SETS[name]
        teacher = checkpoint(work / name / "teacher", spec["teacher"], tokenizer, 512)
        student = checkpoint(work / name / "student", spec["student"], tokenizer, 512)
        common = [f"teacher.path={teacher}", f"student.path={student}", "logger=none",
                  f"data.seq_len={spec['seq_len']}", "train.global_batch_size=4"]
        for i, (processes, keys) in enumerate(CONFIGS):
            out = work / name / f"run{i}"
            plan_dir = work / name / f"plan{i}"
            run([sys.executable, "-m", "minitron.cli.plan", *common, f"output_dir={plan_dir}",
                 f"plan.processes={processes}", "plan.device=cpu", *keys], env)
            launcher = ([sys.executable, "-m", "minitron.cli.distill"] if processes == 1 else
                        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
                         "--master_port", str(free_port()), "-m", "minitron.cli.distill"])
            run([*launcher, *common, f"output_dir={out}", f"data.path={corpus}", "train.max_steps=2",
                 "train.eval_every=0", "train.eval_blocks=4", "train.save_every=0", *keys], env)
            memory = json.loads((out / "summary.json").read_text())["memory"]
            measured = max(p - b for p, b in zip(memory["peak_bytes"], memory["before_models_bytes"]))
            predicted = predicted_bytes(json.loads((plan_dir / "plan.json").read_text()), keys)
            print(f"| {name} | {processes} | {' '.join(keys)} | {measured / 2**20:,.0f} | {predicted / 2**20:,.0f} "
                  f"| {predicted / measured:.2f} |", flush=True)


def predicted_bytes(plan: dict, keys) -> float:
    stage = int(next(k for k in keys if k.startswith("deepspeed=")).removeprefix("deepspeed=zero"))
    precision = "bf16" if "train.precision=bf16" in keys else "fp32"
    [row] = [c for c in plan["configurations"] if c["zero_stage"] == stage and c["precision"] == precision
             and c["teacher_offload"] == ("cpu" if "teacher.offload=cpu" in keys else "none")
             and c["activation_checkpointing"] == ("train.activation_checkpointing=true" in keys)]
    return row["bytes"]["device"] + row["bytes"]["host"]


if __name__ == "__main__":
    main()
