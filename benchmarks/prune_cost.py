"""What pruning costs: (a) the calibration pass (hooks collecting every statistic) against a
plain forward pass over the same blocks, and (b) the pruning job's peak memory against the
size of teacher + student.

    python benchmarks/prune_cost.py [--hidden 768 --ffn 2048 --layers 12 --heads 12 --kv-heads 4]
                                    [--vocab 8192] [--samples 64] [--rounds 3]

(a) runs in this process on a random model; the modes alternate for --rounds rounds and the
best time of each is kept (these machines are noisy). The plain baseline is the decoder trunk
(what calibration runs: no logits are needed); a full causal-LM forward is reported too.
(b) saves that model as a checkpoint with a tokenizer and runs the real pruning job
(`run_prune_job`, ffn halved; calibration, loss-when-removed for the teacher's loss, slicing,
export) in a child process: its peak RSS above the RSS it had with everything imported (the model's code too) and the
data cache opened, against teacher + student parameter bytes.
"""
import argparse
import json
import os
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

SEQ_LEN, MICRO_BATCH = 256, 8


def random_teacher(args):
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.ffn,
                      num_hidden_layers=args.layers, num_attention_heads=args.heads,
                      num_key_value_heads=args.kv_heads, max_position_embeddings=SEQ_LEN)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval()


@torch.no_grad()
def time_calibration(args) -> dict:
    from minitron.distributed.gang import LocalGang
    from minitron.models.adapters import adapter_for
    from minitron.prune.importance import collect_activation_stats

    model = random_teacher(args)
    blocks = np.random.default_rng(0).integers(0, args.vocab, size=(args.samples, SEQ_LEN))
    batches = [torch.from_numpy(blocks[i:i + MICRO_BATCH]) for i in range(0, args.samples, MICRO_BATCH)]
    modes = {
        "trunk forward": lambda: [model.base_model(input_ids=x, use_cache=False) for x in batches],
        "causal-LM forward": lambda: [model(input_ids=x, use_cache=False).logits for x in batches],
        "calibration pass": lambda: collect_activation_stats(model, adapter_for(model.config), blocks,
                                                             MICRO_BATCH, LocalGang(), torch.device("cpu")),
    }
    modes["trunk forward"]()  # warm-up
    best = {name: float("inf") for name in modes}
    for _ in range(args.rounds):
        for name, run in modes.items():
            t0 = time.perf_counter()
            run()
            best[name] = min(best[name], time.perf_counter() - t0)
    return {"params": sum(p.numel() for p in model.parameters()), "seconds": best}


def measure_memory_child(teacher: str, corpus: str, out: str, ffn: int, micro_batch: int) -> None:
    """Runs in its own process; prints JSON with the baseline and peak RSS."""
    from omegaconf import OmegaConf

    from minitron.config import PruneJobConfig
    from minitron.data.packing import build_or_load
    from minitron.distributed.gang import init_gang
    from minitron.prune.job import run_prune_job

    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(PruneJobConfig), {
        "output_dir": out, "model": {"path": teacher}, "data": {"path": corpus, "tokenizer": teacher},
        "prune": {"export": {"ffn_hidden_size": ffn},
                  "calibration": {"num_samples": 64, "micro_batch_size": micro_batch},
                  "depth": {"eval_blocks": 16}, "scores_dir": out + ".importance"}}))  # never reused
    build_or_load(cfg.data, init_gang(), cfg.seed)  # opens the cache the parent built (memory-mapped)
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    MODEL_FOR_CAUSAL_LM_MAPPING[type(AutoConfig.from_pretrained(teacher))]  # imports the model's code
    # ru_maxrss survives fork and exec (it would report the parent's peak): use this process's
    # own high-water mark, reset to the current RSS now (Linux >= 4.0).
    Path("/proc/self/clear_refs").write_text("5")
    baseline = _status_kib("VmRSS")
    summary = run_prune_job(cfg, "")
    print(json.dumps({"baseline_kib": baseline, "peak_kib": _status_kib("VmHWM"),
                      "student_params": summary["student_params"], "teacher_params": summary["teacher_params"]}))


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def measure_memory(args) -> list:
    from minitron.config import DataConfig
    from minitron.data.packing import build_or_load
    from minitron.data.tokenizer import train_bpe_tokenizer
    from minitron.distributed.gang import LocalGang

    work = Path(tempfile.mkdtemp(prefix="prune_cost_"))
    corpus = work / "corpus"
    corpus.mkdir()
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    docs = [p.read_text(encoding="utf-8", errors="replace") for p in sorted(stdlib.glob("*.py"))[:80]]
    for i, doc in enumerate(docs):
        (corpus / f"{i:03d}.txt").write_text(doc)
    teacher = work / "teacher"
    random_teacher(args).save_pretrained(teacher)
    train_bpe_tokenizer(docs, args.vocab).save_pretrained(teacher)
    env = {**os.environ, "MINITRON_CACHE": str(work / "cache")}
    os.environ["MINITRON_CACHE"] = env["MINITRON_CACHE"]
    build_or_load(DataConfig(path=str(corpus), tokenizer=str(teacher), seq_len=SEQ_LEN), LocalGang())
    results = []
    for micro_batch in args.memory_micro_batches:
        out = work / f"out{micro_batch}"
        proc = subprocess.run([sys.executable, __file__, "--child-memory", str(teacher), str(corpus), str(out),
                               str(args.ffn // 2), str(micro_batch)], env=env, capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit(proc.stderr[-3000:])
        results.append({"micro_batch": micro_batch, **json.loads(proc.stdout.strip().splitlines()[-1])})
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--ffn", type=int, default=2048)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--memory-micro-batches", type=int, nargs="+", default=[8, 2],
                   help="calibration micro-batch sizes for the memory runs")
    p.add_argument("--child-memory", nargs=5, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child_memory:
        teacher, corpus, out, ffn, micro_batch = args.child_memory
        return measure_memory_child(teacher, corpus, out, int(ffn), int(micro_batch))

    timing = time_calibration(args)
    s = timing["seconds"]
    tokens = args.samples * SEQ_LEN
    print(f"model: {timing['params']:,} parameters; {args.samples} blocks x {SEQ_LEN} tokens, micro batch {MICRO_BATCH}")
    print("| pass | seconds | tokens/s | ratio to trunk forward |\n| --- | ---: | ---: | ---: |")
    for name, sec in s.items():
        print(f"| {name} | {sec:.2f} | {tokens / sec:.0f} | {sec / s['trunk forward']:.3f} |")

    runs = measure_memory(args)
    first = runs[0]
    model_mib = (first["teacher_params"] + first["student_params"]) * 4 / 2**20  # fp32
    print(f"\npruning job (ffn {args.ffn} -> {args.ffn // 2}): teacher {first['teacher_params']:,} + student "
          f"{first['student_params']:,} parameters = {model_mib:.0f} MiB in fp32")
    print("| calibration micro batch | baseline RSS MiB | peak RSS MiB | peak - baseline | ratio to teacher + student |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    for run in runs:
        delta = (run["peak_kib"] - run["baseline_kib"]) / 1024
        print(f"| {run['micro_batch']} x {SEQ_LEN} | {run['baseline_kib'] / 1024:.0f} | {run['peak_kib'] / 1024:.0f} "
              f"| {delta:.0f} | **{delta / model_mib:.3f}** |")


if __name__ == "__main__":
    main()
