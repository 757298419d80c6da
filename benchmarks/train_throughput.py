"""Training-step throughput and peak memory: minitron's loop (DeepSpeed engine, sampler, logging
all-reduce, tracker) against a plain PyTorch loop on the same model, batch and optimizer.

    python benchmarks/train_throughput.py [--model small] [--steps 20] [--rounds 2]

Each measurement runs in its own process (so peak RSS is its own); the modes alternate for
`--rounds` rounds and the best tokens/s of each is kept, since these machines are noisy.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np
import torch

VOCAB, SEQ_LEN, MICRO_BATCH = 4096, 256, 8


def build(model_name: str):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from minitron.cli.common import conf_dir
    from minitron.config import register_schemas
    from minitron.models.build import build_model, resolve_hf_config

    register_schemas()
    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
        job = OmegaConf.to_object(compose(config_name="train", overrides=[
            f"model={model_name}", f"train.micro_batch_size={MICRO_BATCH}",
            f"train.global_batch_size={MICRO_BATCH}", "train.eval_every=0", "train.save_every=0"]))
    model = build_model(job.model, resolve_hf_config(job.model, VOCAB), seed=0)
    blocks = np.random.default_rng(0).integers(0, VOCAB, size=(4096, SEQ_LEN), dtype=np.int64)
    return job, model, blocks


def run_plain(model_name: str, steps: int) -> float:
    from minitron.data.sampler import BlockSampler
    from minitron.train.schedule import build_optimizer

    job, model, blocks = build(model_name)
    optimizer, scheduler = build_optimizer(model, job.train)
    sampler = BlockSampler(blocks, MICRO_BATCH, MICRO_BATCH, 0, 1, seed=0)
    model.train()
    for step in range(steps + 1):
        if step == 1:  # the first step pays one-off costs
            t0 = time.perf_counter()
        x = sampler.micro_batch(step, 0)
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), job.train.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()
    return steps * MICRO_BATCH * SEQ_LEN / (time.perf_counter() - t0)


def run_minitron(model_name: str, steps: int) -> float:
    from minitron.data.sampler import BlockSampler
    from minitron.distributed.engine import deepspeed_config, initialize
    from minitron.distributed.gang import init_gang
    from minitron.train.loop import lm_loss, train_loop
    from minitron.train.schedule import build_optimizer
    from minitron.train.tracking import NullTracker

    job, model, blocks = build(model_name)
    job.train.max_steps = steps + 1
    gang = init_gang()
    optimizer, scheduler = build_optimizer(model, job.train)
    engine = initialize(model, optimizer, scheduler, deepspeed_config(job.train, job.deepspeed, 1))
    sampler = BlockSampler(blocks, MICRO_BATCH, MICRO_BATCH, 0, 1, seed=0)
    result = train_loop(engine, lm_loss, sampler, blocks[:8], job.train, gang, NullTracker(), 0,
                        save_checkpoint=lambda step: None, device=engine.device)
    return result.tokens_per_s  # excludes the first step, like run_plain


def child(mode: str, model_name: str, steps: int) -> None:
    torch.manual_seed(0)
    tps = (run_plain if mode == "plain" else run_minitron)(model_name, steps)
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"mode": mode, "tokens_per_s": tps, "peak_rss_mib": peak_mib}))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="small")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--child", choices=["plain", "minitron"])
    args = parser.parse_args()
    if args.child:
        return child(args.child, args.model, args.steps)
    best = {}
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    for _ in range(args.rounds):
        for mode in ("plain", "minitron"):
            out = subprocess.run([sys.executable, __file__, "--child", mode, "--model", args.model,
                                  "--steps", str(args.steps)], capture_output=True, text=True, env=env,
                                 check=True).stdout
            row = json.loads(out.strip().splitlines()[-1])
            if mode not in best or row["tokens_per_s"] > best[mode]["tokens_per_s"]:
                best[mode] = row
    plain, ours = best["plain"], best["minitron"]
    print(f"model={args.model} micro_batch={MICRO_BATCH} seq_len={SEQ_LEN} steps={args.steps} "
          f"rounds={args.rounds} threads={torch.get_num_threads()}")
    print(f"{'loop':<10}{'tokens/s':>12}{'peak RSS MiB':>15}")
    for name, row in (("plain", plain), ("minitron", ours)):
        print(f"{name:<10}{row['tokens_per_s']:>12.0f}{row['peak_rss_mib']:>15.0f}")
    print(f"ratio minitron/plain tokens/s: {ours['tokens_per_s'] / plain['tokens_per_s']:.3f}  "
          f"peak memory: {ours['peak_rss_mib'] / plain['peak_rss_mib']:.3f}")


if __name__ == "__main__":
    main()
