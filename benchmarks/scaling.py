"""How the cost of pruning and distillation grows: time and peak memory of (1) the calibration pass,
(2) the whole pruning job and (3) one distillation step, as the model grows and as the tokens grow,
with the growth exponent b of time ~ a * x^b and memory ~ a * x^b fitted to each.

    python benchmarks/scaling.py [--rounds 2]   # about 5-10 minutes on a 2-core CPU
    python benchmarks/scaling.py --tiny         # smoke test (one round), under a minute; figures meaningless

Random Llamas: 8 query heads, 4 KV heads, FFN 3 x hidden, vocabulary 4096 (a BPE trained on the
standard library), untied embeddings, blocks of 256 tokens. Three series of three points each:
- params_width: hidden 256, 368, 512 (x sqrt(2) a step, rounded to 16) at 8 layers:
  8.4M, 16.0M, 29.4M parameters;
- params_depth: 4, 8, 16 layers (doubled a step) at hidden 368: 9.5M, 16.0M, 29.0M;
- tokens: the 16.0M model (368 x 8) with 16, 32, 64 calibration blocks (4K, 8K, 16K tokens) and
  distillation batches of 2, 4, 8 blocks (0.5K, 1K, 2K tokens a step).
The size series hold calibration at 32 blocks and the distillation batch at 4. Exponents are fitted
by least squares on log-log against the measured parameter count (the teacher's) or the tokens.
The middle point is shared by the three series: one measurement, shown in each.

What runs:
1. calibration: `collect_activation_stats` (the hooked trunk forward) over the blocks, micro batch 8.
2. prune: `run_prune_job` on a saved checkpoint, to FFN halved and a quarter of the layers dropped
   (depth by the default loss-when-removed, on 8 validation blocks): load, content hash,
   calibration, depth evaluations, slicing, the student's evaluation, export. Scores never reused.
3. distill_step: one optimizer step of the training loop (train/loop.py's `_accumulate`) on
   minitron's DeepSpeed engine (ZeRO-0, fp32): the frozen teacher's forward, the Distiller's student
   forward with the fused forward-KL and its backward, clipping, AdamW. The student has the shape
   that 2 exports (random weights). Time: the best of steps 2 and 3 (step 1 allocates AdamW state).

Each (quantity, point) runs in a child process of its own, forked from multiprocessing's forkserver,
which has imported everything but run nothing: no import cost per child and none of the parent's
memory. The child warms up on a tiny model, then its peak memory is the resident set's high-water
mark (VmHWM, reset by clear_refs as prune_cost.py does) above its RSS before the models: the
teacher's fp32 weights (4 bytes a parameter) included, and for the step the student's gradients and
AdamW state. Time is time.perf_counter around the work alone. Rounds alternate over all children;
the best time and the lowest peak of each are kept.

Superlinear by design, which the depth series shows:
- Depth importance by loss-when-removed (prune.depth.metric=loss, the default) evaluates the
  teacher once per candidate layer (or contiguous block): L evaluations of an L-layer model, so
  O(L^2 x depth.eval_blocks). Linear in width, independent of calibration tokens, quadratic in
  depth; depth.metric=block_importance evaluates only the teacher itself. At the defaults (1024
  calibration blocks, 64 eval blocks) a 32-layer teacher's depth evaluations read 2x the tokens
  the calibration pass does, and logits too: not a small term.
- The calibration pass's block-importance table is an [L+1, L+1] Gram matrix of the layer
  boundaries per micro batch, O(L^2 x tokens x hidden): quadratic in depth too, but about
  L / (12 x hidden) of the forward pass's FLOPs, too small to see here.
Not measured: sequence length (attention is quadratic in it, whoever runs it); the token series
grows the number of blocks. The job's loading, hashing, depth evaluations and export do not depend
on calibration tokens: its time is affine in them, so its exponent against tokens is below 1.
"""
import argparse
import json
import multiprocessing
import os
import shutil
import sysconfig
import tempfile
import time
import traceback
from dataclasses import dataclass, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Dict, List, Tuple

import numpy as np
import torch

from prune_cost import _status_kib, random_teacher

HEADS, KV_HEADS = 8, 4
QUANTITIES = ("calibration", "prune", "distill_step")
DISTILL_STEPS = 3  # the first allocates AdamW's state; the best of the others is the step's time
# Imported once by the forkserver; every child is forked from it with these already loaded.
PRELOAD = ["__main__", "minitron.prune.job", "minitron.distill.job", "minitron.train.loop",
           "transformers.models.llama.modeling_llama"]
# Not plain fork: the parent has run torch (checkpoints, tokenizer), and an OpenMP pool does not
# survive a fork. The server is a fresh process that only imports.
CTX = multiprocessing.get_context("forkserver")


@dataclass(frozen=True)
class Scale:
    vocab: int
    seq_len: int
    base_width: int
    """Hidden size of the narrowest model; the width series multiplies it by sqrt(2) twice."""
    layers: int
    """Depth of the width and token series; the depth series halves and doubles it."""
    samples: Tuple[int, int, int]
    """Calibration blocks of the token series; the middle one in the size series."""
    batches: Tuple[int, int, int]
    """Distillation blocks per step of the token series; the middle one in the size series."""
    micro_batch: int
    """Calibration blocks per forward pass (prune.calibration.micro_batch_size)."""
    eval_blocks: int
    """Validation blocks per depth evaluation (prune.depth.eval_blocks)."""
    docs: int
    """Standard-library files in the pruning job's corpus."""
    depth_metric: str = "loss"
    """The pruning job's prune.depth.metric."""


SCALES = {
    "default": Scale(vocab=4096, seq_len=256, base_width=256, layers=8, samples=(16, 32, 64), batches=(2, 4, 8),
                     micro_batch=8, eval_blocks=8, docs=40),
    "tiny": Scale(vocab=512, seq_len=64, base_width=64, layers=4, samples=(4, 8, 16), batches=(1, 2, 4),
                  micro_batch=4, eval_blocks=4, docs=10),
}


@dataclass(frozen=True)
class Point:
    hidden: int
    layers: int
    samples: int
    """Calibration blocks (calibration and prune)."""
    batch: int
    """Blocks per distillation step."""


def widths(s: Scale) -> List[int]:
    """x sqrt(2) a step (about x2 parameters), rounded to 16: 8 heads of an even head_dim (RoPE)."""
    return [int(round(s.base_width * 2 ** (i / 2) / 16)) * 16 for i in range(3)]


def series(s: Scale) -> Dict[str, List[Point]]:
    mid = widths(s)[1]
    return {
        "params_width": [Point(w, s.layers, s.samples[1], s.batches[1]) for w in widths(s)],
        "params_depth": [Point(mid, n, s.samples[1], s.batches[1]) for n in (s.layers // 2, s.layers, 2 * s.layers)],
        "tokens": [Point(mid, s.layers, n, b) for n, b in zip(s.samples, s.batches)],
    }


def teacher_args(p: Point, s: Scale) -> SimpleNamespace:
    """What prune_cost.random_teacher reads."""
    return SimpleNamespace(vocab=s.vocab, hidden=p.hidden, ffn=3 * p.hidden, layers=p.layers, heads=HEADS,
                           kv_heads=KV_HEADS)


def student_args(p: Point, s: Scale) -> SimpleNamespace:
    """The pruning target: FFN halved, a quarter of the layers dropped (Minitron prunes both)."""
    t = teacher_args(p, s)
    return SimpleNamespace(**{**vars(t), "ffn": t.ffn // 2, "layers": t.layers * 3 // 4})


def checkpoint_dir(work: Path, p: Point) -> Path:
    return work / f"teacher_{p.hidden}x{p.layers}"


def prepare(work: Path, s: Scale, points: List[Point]) -> None:
    """The pruning job's inputs: a corpus, one tokenizer, a checkpoint per model shape, and the data
    cache, built here once so that no child pays for it."""
    from minitron.config import DataConfig
    from minitron.data.packing import build_or_load
    from minitron.data.tokenizer import train_bpe_tokenizer
    from minitron.distributed.gang import LocalGang

    corpus = work / "corpus"
    corpus.mkdir()
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    docs = [p.read_text(encoding="utf-8", errors="replace") for p in sorted(stdlib.glob("*.py"))[:s.docs]]
    for i, doc in enumerate(docs):
        (corpus / f"{i:03d}.txt").write_text(doc)
    train_bpe_tokenizer(docs, s.vocab).save_pretrained(work / "tokenizer")
    for p in points:
        if not checkpoint_dir(work, p).exists():
            random_teacher(teacher_args(p, s)).save_pretrained(checkpoint_dir(work, p))
    build_or_load(DataConfig(path=str(corpus), tokenizer=str(work / "tokenizer"), seq_len=s.seq_len), LocalGang())


def reset_peak_rss() -> None:
    """Restart VmHWM at the current RSS (Linux >= 4.0): a forked child's would hold the server's."""
    Path("/proc/self/clear_refs").write_text("5")


def warm_up() -> None:
    """A tiny model's forward and backward before anything is measured: the thread pool starts and
    the kernels' code is paged in (a forked child faults in again what the server had mapped)."""
    model = random_teacher(SimpleNamespace(vocab=97, hidden=32, ffn=64, layers=2, heads=4, kv_heads=2))
    x = torch.randint(0, 97, (2, 16))
    model(input_ids=x, labels=x).loss.backward()


def measure_calibration(p: Point, s: Scale, work: Path) -> dict:
    from minitron.distributed.gang import LocalGang
    from minitron.models.adapters import adapter_for
    from minitron.prune.importance import collect_activation_stats

    baseline = _status_kib("VmRSS")
    model = random_teacher(teacher_args(p, s))
    blocks = np.random.default_rng(0).integers(0, s.vocab, size=(p.samples, s.seq_len))
    reset_peak_rss()  # from_config's transients are not the pass's; the weights still count
    t0 = time.perf_counter()
    collect_activation_stats(model, adapter_for(model.config), blocks, s.micro_batch, LocalGang(),
                             torch.device("cpu"))
    return {"params": sum(t.numel() for t in model.parameters()), "seconds": time.perf_counter() - t0,
            "peak_mib": (_status_kib("VmHWM") - baseline) / 1024, "tokens": p.samples * s.seq_len}


def prune_config(p: Point, s: Scale, work: Path, out: Path):
    from omegaconf import OmegaConf

    from minitron.config import PruneJobConfig

    student = student_args(p, s)
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(PruneJobConfig), {
        "output_dir": str(out / "student"), "logger": {"backend": "none"},
        "model": {"path": str(checkpoint_dir(work, p))},
        "data": {"path": str(work / "corpus"), "tokenizer": str(work / "tokenizer"), "seq_len": s.seq_len},
        "prune": {"export": {"ffn_hidden_size": student.ffn, "num_layers": student.layers},
                  "calibration": {"num_samples": p.samples, "micro_batch_size": s.micro_batch},
                  "depth": {"eval_blocks": s.eval_blocks, "metric": s.depth_metric},
                  "scores_dir": str(out / "importance")}}))  # fresh: scores are never reused


def measure_prune(p: Point, s: Scale, work: Path) -> dict:
    from minitron.data.packing import build_or_load
    from minitron.distributed.gang import init_gang
    from minitron.prune.job import run_prune_job

    out = Path(tempfile.mkdtemp(dir=work, prefix="prune_"))
    cfg = prune_config(p, s, work, out)
    build_or_load(cfg.data, init_gang(), cfg.seed)  # opens the cache the parent built (memory-mapped)
    reset_peak_rss()  # the job resets it again before the teacher loads; nothing before holds more
    baseline = _status_kib("VmRSS")
    t0 = time.perf_counter()
    summary = run_prune_job(cfg, "")
    seconds, peak = time.perf_counter() - t0, _status_kib("VmHWM")
    shutil.rmtree(out)
    return {"params": summary["teacher_params"], "seconds": seconds, "peak_mib": (peak - baseline) / 1024,
            "tokens": p.samples * s.seq_len}


def measure_distill_step(p: Point, s: Scale, work: Path) -> dict:
    from minitron.config import DeepSpeedConfig, LogitLossConfig, TrainConfig
    from minitron.data.sampler import BlockSampler
    from minitron.distill.distiller import Distiller
    from minitron.distill.job import distillation_loss
    from minitron.distill.teacher import Teacher, freeze
    from minitron.distributed.engine import deepspeed_config, full_parameters, initialize
    from minitron.distributed.gang import init_gang
    from minitron.train.loop import _accumulate
    from minitron.train.schedule import build_optimizer

    init_gang()  # the engine joins this (gloo) group, as in minitron-distill
    baseline = _status_kib("VmRSS")
    teacher = freeze(random_teacher(teacher_args(p, s)))
    logits = LogitLossConfig()
    distiller = Distiller(random_teacher(student_args(p, s)), logits, s.vocab, logits.chunk_tokens)
    train = TrainConfig(max_steps=DISTILL_STEPS, micro_batch_size=p.batch, global_batch_size=p.batch,
                        warmup_steps=1, eval_every=0, save_every=0)
    optimizer, scheduler = build_optimizer(distiller, train)
    engine = initialize(distiller, optimizer, scheduler, deepspeed_config(train, DeepSpeedConfig(), 1))
    loss_fn = distillation_loss(Teacher(teacher, teacher, [], full_parameters))
    blocks = np.random.default_rng(0).integers(0, s.vocab, size=(p.batch * DISTILL_STEPS, s.seq_len))
    sampler = BlockSampler(blocks, p.batch, p.batch, 0, 1, seed=0)
    reset_peak_rss()  # the models' initialisation transients are not the step's
    seconds = []
    for step in range(DISTILL_STEPS):
        t0 = time.perf_counter()
        _accumulate(engine, loss_fn, sampler, step, engine.device)  # ends in a sync: it reads the loss
        seconds.append(time.perf_counter() - t0)
    return {"params": sum(t.numel() for t in teacher.parameters()), "seconds": min(seconds[1:]),
            "peak_mib": (_status_kib("VmHWM") - baseline) / 1024, "tokens": p.batch * s.seq_len}


MEASURES = {"calibration": measure_calibration, "prune": measure_prune, "distill_step": measure_distill_step}


def child_main(conn, quantity: str, p: Point, s: Scale, work: str) -> None:
    """A measuring child: its output (progress bars, library noise) goes to children.log, its
    result or its traceback back through `conn`."""
    with open(Path(work) / "children.log", "a") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
    try:
        warm_up()
        conn.send(MEASURES[quantity](p, s, Path(work)))
    except BaseException:
        conn.send({"error": traceback.format_exc()})


def in_child(quantity: str, p: Point, s: Scale, work: Path) -> dict:
    receive, send = CTX.Pipe(duplex=False)
    proc = CTX.Process(target=child_main, args=(send, quantity, p, s, str(work)))
    proc.start()
    send.close()
    try:
        result = receive.recv()
    except EOFError:  # killed (out of memory?) before it could answer
        result = {"error": "no answer; the end of children.log:\n" + (work / "children.log").read_text()[-3000:]}
    proc.join()
    if "error" in result:
        raise SystemExit(f"{quantity} at {p} failed (exit code {proc.exitcode}):\n{result['error']}")
    return result


def measure(plan: Dict[str, List[Point]], s: Scale, work: Path, rounds: int) -> Dict[Tuple[str, Point], dict]:
    """Best time and lowest peak of each (quantity, point) over `rounds` rounds, each round one pass
    over all of them, so a slow spell of the machine touches every point alike."""
    from minitron import progress

    points = list(dict.fromkeys(p for pts in plan.values() for p in pts))
    jobs = [(q, p) for p in points for q in QUANTITIES]
    CTX.set_forkserver_preload(PRELOAD)
    best = {}
    with progress.bar(rounds * len(jobs), "measuring", unit="run") as bar:
        for _ in range(rounds):
            for job in jobs:
                r = in_child(*job, s, work)
                old = best.setdefault(job, r)
                best[job] = {**r, "seconds": min(r["seconds"], old["seconds"]),
                             "peak_mib": min(r["peak_mib"], old["peak_mib"])}
                bar.update(1)
    return best


def growth_exponent(x: List[float], y: List[float]) -> float:
    """b of y ~ a * x^b, by least squares on log-log."""
    return float(np.polyfit(np.log(x), np.log(y), 1)[0])


def exponents(plan: Dict[str, List[Point]], best) -> Dict[str, float]:
    out = {}
    for q in QUANTITIES:
        for name, points in plan.items():
            rows = [best[(q, p)] for p in points]
            x = [r["tokens" if name == "tokens" else "params"] for r in rows]
            out[f"{q}_time_vs_{name}"] = round(growth_exponent(x, [r["seconds"] for r in rows]), 3)
            out[f"{q}_memory_vs_{name}"] = round(growth_exponent(x, [r["peak_mib"] for r in rows]), 3)
    return out


def report(plan: Dict[str, List[Point]], best, s: Scale, scale: str, rounds: int) -> None:
    print(f"scale {scale}, prune.depth.metric={s.depth_metric}: vocabulary {s.vocab}, blocks of {s.seq_len} "
          f"tokens, calibration micro batch "
          f"{s.micro_batch}, depth eval blocks {s.eval_blocks}; best of {rounds} rounds; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print("| quantity | series | hidden | layers | teacher params | tokens | seconds | peak MiB |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for q in QUANTITIES:
        for name, points in plan.items():
            for p in points:
                r = best[(q, p)]
                print(f"| {q} | {name} | {p.hidden} | {p.layers} | {r['params']:,} | {r['tokens']:,} "
                      f"| {r['seconds']:.3f} | {r['peak_mib']:.1f} |")
    fitted = exponents(plan, best)
    print("\ngrowth exponent b of y ~ a * x^b (x: teacher parameters, or tokens for the token series)")
    print("| quantity | series | time | memory |\n| --- | --- | ---: | ---: |")
    for q in QUANTITIES:
        for name in plan:
            print(f"| {q} | {name} | {fitted[f'{q}_time_vs_{name}']:.2f} | {fitted[f'{q}_memory_vs_{name}']:.2f} |")
    print(json.dumps(fitted))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=None, help="default 2 (1 with --tiny)")
    ap.add_argument("--depth-metric", default="loss", choices=["loss", "block_importance"],
                    help="prune.depth.metric of the pruning job (loss, the default, is quadratic in depth)")
    ap.add_argument("--tiny", action="store_true", help="tiny models and token counts, one round: a smoke test")
    args = ap.parse_args()
    scale = "tiny" if args.tiny else "default"
    args.rounds = args.rounds or (1 if args.tiny else 2)
    s = replace(SCALES[scale], depth_metric=args.depth_metric)
    plan = series(s)
    with tempfile.TemporaryDirectory(prefix="scaling_") as tmp:
        work = Path(tmp)
        os.environ["MINITRON_CACHE"] = str(work / "cache")  # before the forkserver starts: it inherits it
        prepare(work, s, [p for pts in plan.values() for p in pts])
        best = measure(plan, s, work, args.rounds)
    report(plan, best, s, scale, args.rounds)


if __name__ == "__main__":
    main()
