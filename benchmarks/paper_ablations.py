"""The Minitron papers' ablations at small scale, over several seeds (arXiv 2407.14679, 2408.11796).

One teacher, equal token budgets within each comparison:

  (a) retraining a pruned student (depth and FFN cut to half the non-embedding parameters):
      distillation (distill=logits) against LM-loss retraining (distill=lm) against the same
      architecture trained from scratch (distill=lm student.init=random); 2407.14679 Table 14.
  (b) width against depth pruning: two students of about the same size, one with only
      hidden/FFN/heads cut, one with half the layers; LM loss right after pruning and after the
      same distillation; 2407.14679 Best practice 4.
  (c) importance aggregation (prune.importance.{seq_agg, batch_agg}) and a random ranking, for
      the width-pruned student of (b); LM loss right after pruning; 2407.14679 Table 11.
  (d) logits-only against logits plus hidden-state losses for the depth-pruned student of (b);
      2407.14679 Table 17.
  (e) teacher correction: the teacher knows Python source; the distillation data is English (the
      Python docs' help topics, pydoc_data.topics). The (a) shape pruned from the original teacher
      and distilled from it, against the same shape pruned from a corrected teacher (continued
      LM training on the English data) and distilled from that; 2408.11796 section 3.1.

Every run is the real CLI (`python -m minitron.cli.train|prune|distill`, logger=none) in its own
directory under the work directory, and is skipped when its summary.json exists (rerun with the
same --work-dir to resume). One tokenizer (the teacher's) for all runs, so they share one data
cache per corpus; one importance cache per teacher, so each (teacher, seed, seq_agg) calibrates
once. Validation losses are measured on the same first --eval-blocks validation blocks right
after pruning and after retraining. Shapes come from the teacher's config.json.

    minitron-train                      # the embedded teacher, in runs/train/model
    python benchmarks/paper_ablations.py [--teacher runs/train/model] [--seeds 0 1 2] [--steps 120]
        [--correct-steps 40] [--only a b c d e] [--work-dir DIR]
    python benchmarks/paper_ablations.py --quick       # smoke test: a tiny teacher of its own, 4 steps

Prints a markdown table for benchmarks/RESULTS.md (mean +- std over seeds and each seed's value);
the last line is a JSON object with every number.
"""
import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import torch

# (seq_agg, batch_agg): the default (the paper's best) first.
AGGREGATIONS = [("mean", "l2"), ("mean", "mean"), ("l2", "l2"), ("l2", "mean"), ("var", "mean")]

ABLATIONS = {"a": "retraining", "b": "width_vs_depth", "c": "aggregation", "d": "hidden_losses",
             "e": "teacher_correction"}
PAPER = {
    "a": "distillation < LM-loss retraining < training from scratch, at equal tokens (2407.14679 Table 14; "
         "Best practice 5: retrain with distillation only)",
    "b": "width pruning beats depth pruning after retraining at the same size (2407.14679 Best practice 4: "
         "prefer width over depth for models of up to 15B)",
    "c": "(seq=mean, batch=L2) is the best aggregation for width importance (2407.14679 Table 11, Best practice 2)",
    "d": "adding intermediate-state losses to the logit loss helps when depth is cut significantly; logits "
         "alone suffice otherwise (2407.14679 Table 17, Best practices 6-7)",
    "e": "distilling from a corrected teacher gives the student a lower LM loss on the distillation data "
         "(2408.11796 section 3.1, teacher correction)",
}


@dataclass
class Budget:
    steps: int
    lr: float
    correct_steps: int
    correct_lr: float
    batch: int
    seq_len: int
    calibration: int
    eval_blocks: int
    max_bytes: Optional[int] = None
    """Cut the embedded corpus (--quick), so its cache builds in seconds."""

    @property
    def tokens(self) -> int:
        return self.steps * self.batch * self.seq_len

    @property
    def correction_tokens(self) -> int:
        return self.correct_steps * self.batch * self.seq_len


@dataclass
class Runner:
    """Runs the CLIs as subprocesses, each once: a run whose summary.json exists is read back."""
    root: Path
    seconds: Dict[str, float] = field(default_factory=dict)

    def run(self, command: str, name: str, overrides: List[str]) -> dict:
        out = self.root / name
        if (out / "summary.json").is_file():
            return json.loads((out / "summary.json").read_text())
        log = self.root / "logs" / f"{name.replace('/', '_')}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", f"minitron.cli.{command}", f"output_dir={out}", "logger=none", *overrides]
        print(f"[{time.strftime('%H:%M:%S')}] {command} {name}", flush=True)
        started = time.perf_counter()
        with open(log, "w") as fh:
            fh.write(" ".join(cmd) + "\n")
            fh.flush()
            done = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT)
        self.seconds[name] = round(time.perf_counter() - started, 1)
        if done.returncode:
            sys.exit(f"{command} {name} failed (exit {done.returncode}); its output:\n"
                     + "\n".join(log.read_text().splitlines()[-30:]))
        return json.loads((out / "summary.json").read_text())


def step_of(value: int) -> int:
    """A width granularity: the power of two at or below value / 16 (384 -> 16, 1024 -> 64)."""
    return 2 ** int(math.log2(max(value / 16, 1)))


def plan_shapes(teacher: str) -> Dict[str, dict]:
    """The students' shapes from the teacher's config.json, sized exactly (minitron.search.sizing):
    `half` cuts a third of the layers and the FFN to about half the teacher's non-embedding
    parameters (half of all of them would leave a small teacher, whose embeddings are 40% of it,
    almost no FFN); `depth` keeps half the layers; `width` keeps every layer and cuts hidden, FFN
    and heads by about the same ratio to within 3% of `depth`'s size."""
    from transformers import AutoConfig

    from minitron.config import AxisRange, SearchSpaceConfig
    from minitron.models.adapters import adapter_for
    from minitron.prune.shape import Shape, teacher_shape
    from minitron.search.sizing import Sizer
    from minitron.search.space import AXES, enumerate_shapes, shape_name

    config = AutoConfig.from_pretrained(teacher)
    adapter = adapter_for(config)
    full = teacher_shape(config)
    sizer = Sizer(config, adapter, "fp32", seq_len=1, batch_size=1)

    def params(s: Shape) -> int:
        return sizer.sizes(s).params

    def layer_params(s: Shape) -> int:
        return sizer.sizes(s).non_embedding_params

    def shapes(**axes) -> List[Shape]:  # axes not given keep the teacher's value
        fixed = {a: AxisRange(choices=[getattr(full, a)]) for a in AXES}
        return enumerate_shapes(full, SearchSpaceConfig(**{**fixed, **axes}), config, adapter)

    def ratios(s: Shape) -> List[float]:
        return [getattr(s, a) / getattr(full, a) for a in ("hidden_size", "ffn_hidden_size", "num_attention_heads")]

    ffn_step = step_of(full.ffn_hidden_size)
    half = min(shapes(num_layers=AxisRange(choices=[max(1, round(full.num_layers * 2 / 3))]),
                      ffn_hidden_size=AxisRange(min=ffn_step, step=ffn_step)),
               key=lambda s: abs(layer_params(s) - layer_params(full) / 2))
    depth = Shape(**{**full.as_dict(), "num_layers": max(1, full.num_layers // 2)})
    target = params(depth)
    widths = shapes(hidden_size=AxisRange(min_ratio=0.25, step=step_of(full.hidden_size)),
                    ffn_hidden_size=AxisRange(min_ratio=0.25, step=ffn_step),
                    num_attention_heads=AxisRange(min_ratio=0.25, step=1))
    widths.remove(full)
    near = [s for s in widths if abs(params(s) / target - 1) <= 0.03]
    near = near or [min(widths, key=lambda s: abs(params(s) - target))]
    width = min(near, key=lambda s: (max(ratios(s)) - min(ratios(s)), abs(params(s) - target)))
    return {"teacher": {"shape": full.as_dict(), "name": shape_name(full), "params": params(full)},
            **{k: {"shape": s.as_dict(), "name": shape_name(s), "params": params(s)}
               for k, s in (("half", half), ("depth", depth), ("width", width))}}


def write_english(path: Path, chunk_chars: int = 2000) -> Path:
    """The Python docs' English help topics (pydoc_data.topics, shipped with Python: 79 topics,
    ~465 KB) as JSON lines, each topic cut at paragraph boundaries into documents of about
    `chunk_chars`, so the hash split by data.val_fraction is near its fraction in characters."""
    from pydoc_data.topics import topics

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        for key in sorted(topics):
            chunk = ""
            for paragraph in topics[key].strip().split("\n\n"):
                if chunk and len(chunk) + len(paragraph) > chunk_chars:
                    fh.write(json.dumps({"text": chunk}) + "\n")
                    chunk = ""
                chunk = f"{chunk}\n\n{paragraph}" if chunk else paragraph
            if chunk:
                fh.write(json.dumps({"text": chunk}) + "\n")
    return path


class Ablations:
    """Each student is pruned once per seed and each retraining runs once, whatever the ablations
    that read them: (c)'s default aggregation is (b)'s width student, (d)'s logits arm is (b)'s
    depth arm, (e) prunes (a)'s shape."""

    def __init__(self, runner: Runner, teacher: str, budget: Budget, shapes: Dict[str, dict], english: Path,
                 english_val_fraction: float):
        self.r, self.teacher, self.b, self.shapes = runner, teacher, budget, shapes
        common = [f"data.tokenizer={teacher}", f"data.seq_len={budget.seq_len}"]
        self.code_data = common + ([f"data.max_bytes={budget.max_bytes}"] if budget.max_bytes else [])
        self.english_data = common + [f"data.path={english}", f"data.val_fraction={english_val_fraction}"]

    def prune(self, seed: int, name: str, shape: str, teacher: Optional[str] = None, data=None,
              scores: str = "original", extra=()) -> dict:
        b = self.b
        export = [f"prune.export.{k}={v}" for k, v in self.shapes[shape]["shape"].items()]
        return self.r.run("prune", f"seed{seed}/prune/{name}", [
            f"model.path={teacher or self.teacher}", f"seed={seed}", *(data or self.code_data), *export,
            f"prune.scores_dir={self.r.root / 'importance' / scores}",
            f"prune.calibration.num_samples={b.calibration}", f"prune.depth.eval_blocks={b.eval_blocks}", *extra])

    def _train(self, steps: int):
        b = self.b
        return [f"train.max_steps={steps}", f"train.micro_batch_size={b.batch}", f"train.global_batch_size={b.batch}",
                f"train.warmup_steps={min(10, max(1, steps // 10))}", "train.eval_every=0", "train.save_every=0",
                f"train.eval_blocks={b.eval_blocks}"]

    def distill(self, seed: int, name: str, student: dict, preset: str, teacher: Optional[str] = None, data=None,
                extra=()) -> dict:
        uses_teacher = [f"teacher.path={teacher or self.teacher}"] if preset != "lm" else []
        return self.r.run("distill", f"seed{seed}/distill/{name}", [
            f"student.path={student['output_model']}", f"distill={preset}", *uses_teacher, f"seed={seed}",
            *(data or self.code_data), *self._train(self.b.steps), f"train.lr={self.b.lr}", *extra])

    def correct(self, seed: int) -> dict:
        """Teacher correction (2408.11796 section 3.1): continued LM training on the English data
        at a lower rate."""
        return self.r.run("train", f"seed{seed}/correct", [
            f"model.path={self.teacher}", f"seed={seed}", *self.english_data, *self._train(self.b.correct_steps),
            f"train.lr={self.b.correct_lr}"])

    def retraining(self, seed: int) -> Dict[str, float]:
        half = self.prune(seed, "half", "half")
        return {"teacher (reference)": half["teacher_val_loss"], "zero-shot": half["student_val_loss"],
                "distill=logits": self.distill(seed, "half-logits", half, "logits")["val_loss"],
                "distill=lm": self.distill(seed, "half-lm", half, "lm")["val_loss"],
                "distill=lm, random init": self.distill(seed, "half-lm-random", half, "lm",
                                                        extra=["student.init=random"])["val_loss"]}

    def width_vs_depth(self, seed: int) -> Dict[str, float]:
        out = {}
        for kind in ("width", "depth"):
            pruned = self.prune(seed, kind, kind)
            out[f"{kind}, zero-shot"] = pruned["student_val_loss"]
            out[f"{kind}, distilled"] = self.distill(seed, f"{kind}-logits", pruned, "logits")["val_loss"]
        return out

    def aggregation(self, seed: int) -> Dict[str, float]:
        out = {}
        for seq_agg, batch_agg in AGGREGATIONS:
            default = (seq_agg, batch_agg) == AGGREGATIONS[0]
            name = "width" if default else f"width-seq_{seq_agg}-batch_{batch_agg}"
            pruned = self.prune(seed, name, "width", extra=[f"prune.importance.seq_agg={seq_agg}",
                                                            f"prune.importance.batch_agg={batch_agg}"])
            out[f"seq={seq_agg}, batch={batch_agg}"] = pruned["student_val_loss"]
        out["random ranking"] = self.prune(seed, "width-random", "width",
                                           extra=["prune.importance.ranking=random"])["student_val_loss"]
        return out

    def hidden_losses(self, seed: int) -> Dict[str, float]:
        depth = self.prune(seed, "depth", "depth")
        return {f"distill={preset}": self.distill(seed, f"depth-{preset}", depth, preset)["val_loss"]
                for preset in ("logits", "logits_hidden")}

    def teacher_correction(self, seed: int) -> Dict[str, float]:
        corrected = self.correct(seed)["output_model"]
        out = {}
        for arm, teacher, scores in (("original", self.teacher, "original"),
                                     ("corrected", corrected, f"corrected-seed{seed}")):
            pruned = self.prune(seed, f"en-half-{arm}", "half", teacher=teacher, data=self.english_data,
                                scores=scores)
            run = self.distill(seed, f"en-{arm}", pruned, "logits", teacher=teacher, data=self.english_data)
            tokens = f" (+{self.b.correction_tokens:,} tokens)" if arm == "corrected" else ""
            out[f"{arm} teacher{tokens}"] = run["teacher_val_loss"]
            out[f"student from {arm}, zero-shot"] = pruned["student_val_loss"]
            out[f"student from {arm}, distilled"] = run["val_loss"]
        return out


def holds(per_seed: Dict[str, List[float]], *order: str) -> int:
    """Seeds in which the arms' losses rise strictly in `order`."""
    return sum(all(x < y for x, y in zip(losses, losses[1:])) for losses in zip(*(per_seed[k] for k in order)))


def agreement(name: str, per_seed: Dict[str, List[float]]) -> str:
    """In how many seeds the paper's finding holds here."""
    n = len(next(iter(per_seed.values())))
    if name == "a":
        order = ("distill=logits", "distill=lm", "distill=lm, random init")
        return f"logits < lm < scratch in {holds(per_seed, *order)}/{n} seeds"
    if name == "b":
        wins = holds(per_seed, "width, distilled", "depth, distilled")
        return f"width < depth after distillation in {wins}/{n} seeds"
    if name == "c":
        default, *others = [k for k in per_seed if k != "random ranking"]
        lowest = sum(all(per_seed[default][i] <= per_seed[o][i] for o in others) for i in range(n))
        return (f"{default} the lowest of the aggregations in {lowest}/{n} seeds; "
                f"below the random ranking in {holds(per_seed, default, 'random ranking')}/{n}")
    if name == "d":
        return f"logits_hidden < logits in {holds(per_seed, 'distill=logits_hidden', 'distill=logits')}/{n} seeds"
    return (f"student from the corrected teacher < from the original in "
            f"{holds(per_seed, 'student from corrected, distilled', 'student from original, distilled')}/{n} seeds")


def format_table(results: Dict[str, Dict[str, List[float]]], labels: Dict[str, str], seeds: List[int]) -> str:
    rows = ["| ablation | arm | val loss (mean ± std) | " + " | ".join(f"seed {s}" for s in seeds) + " |",
            "| --- | --- | ---: | " + " | ".join("---:" for _ in seeds) + " |"]
    for name, arms in results.items():
        for i, (arm, values) in enumerate(arms.items()):
            std = statistics.stdev(values) if len(values) > 1 else 0.0
            label = f"({name}) {labels[name]}" if i == 0 else ""
            rows.append(f"| {label} | {arm} | {statistics.mean(values):.4f} ± {std:.4f} | "
                        + " | ".join(f"{v:.4f}" for v in values) + " |")
    return "\n".join(rows)


def report(args, budget: Budget, teacher: str, shapes: Dict[str, dict], results, seconds: float) -> str:
    """The caption (setup, what the papers found), the table and the per-seed agreement."""
    s = {k: f"{v['name']} ({v['params'] / 1e6:.2f}M)" for k, v in shapes.items()}
    labels = {"a": f"retraining {s['half']}", "b": f"width {s['width']} vs depth {s['depth']}",
              "c": f"aggregation, width {s['width']}, zero-shot", "d": f"hidden-state losses, depth {s['depth']}",
              "e": f"teacher correction, {s['half']}, English val"}
    lines = [
        f"Teacher `{teacher}`: {s['teacher']}. Every retraining: {budget.steps} steps x {budget.batch} x "
        f"{budget.seq_len} = {budget.tokens:,} tokens, lr {budget.lr}; teacher correction (e): "
        f"{budget.correct_steps} steps, {budget.correction_tokens:,} tokens at lr {budget.correct_lr}. "
        f"Calibration {budget.calibration} blocks. Losses on the first {budget.eval_blocks} validation blocks, "
        "right after pruning (zero-shot) and after retraining: the embedded corpus (Python source) for a-d, "
        f"English (pydoc_data.topics, data.val_fraction={args.english_val_fraction}) for e, where both teachers "
        "are calibrated and distilled on the English data. A seed sets the calibration sample, the data order "
        "and any random init; depth zero-shot losses do not vary with it (layers are ranked by the validation "
        "loss without them). (a) and (e) prune to half the teacher's non-embedding parameters.",
        "", "What the papers found:", *[f"- ({name}) {PAPER[name]}" for name in results], "",
        f"Machine: {os.cpu_count()}-core {platform.machine()} CPU, no GPU (torch {torch.__version__}).",
        f"Command: `python benchmarks/{Path(__file__).name} {' '.join(sys.argv[1:])}` "
        f"({time.strftime('%Y-%m-%d')}, {seconds / 60:.0f} min)", "",
        format_table(results, labels, args.seeds), "",
        *[f"- ({name}) {agreement(name, arms)}" for name, arms in results.items()]]
    return "\n".join(lines)


def find_teacher(args, runner: Runner, budget: Budget) -> str:
    """--teacher; else runs/train/model or the pipeline's embedded teacher; with --quick, a tiny
    teacher pretrained here."""
    if args.teacher:
        return str(Path(args.teacher).resolve())
    if args.quick:
        summary = runner.run("train", "teacher", [
            "model=tiny", "model.num_hidden_layers=4", "data.vocab_size=1024", f"data.max_bytes={budget.max_bytes}",
            f"data.seq_len={budget.seq_len}", "train.max_steps=20", f"train.micro_batch_size={budget.batch}",
            f"train.global_batch_size={budget.batch}", "train.eval_every=0", "train.save_every=0",
            f"train.eval_blocks={budget.eval_blocks}"])
        return summary["output_model"]
    found = [Path("runs/train/model"), *sorted(Path("runs/pipeline/teacher").glob("*/model"),
                                               key=lambda p: p.stat().st_mtime, reverse=True)]
    for path in found:
        if (path / "config.json").is_file():
            return str(path.resolve())
    sys.exit("error: --teacher: no teacher found (runs/train/model, runs/pipeline/teacher/*/model); "
             "run minitron-train first, or pass --teacher")


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", help="HF checkpoint dir with a tokenizer (default: runs/train/model)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=120, help="distillation steps of every retraining")
    parser.add_argument("--lr", type=float, default=1e-3, help="peak lr of every retraining")
    parser.add_argument("--correct-steps", type=int, help="teacher correction steps (default: steps // 3)")
    parser.add_argument("--correct-lr", type=float, default=3e-4)
    parser.add_argument("--batch", type=int, default=8, help="sequences per step")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--calibration", type=int, default=128, help="prune.calibration.num_samples")
    parser.add_argument("--eval-blocks", type=int, default=64, help="validation blocks of every loss")
    parser.add_argument("--english-val-fraction", type=float, default=0.1)
    parser.add_argument("--only", nargs="+", choices=list(PAPER), default=list(PAPER))
    parser.add_argument("--work-dir", help="runs go here (default: a new temp dir); rerun to resume")
    parser.add_argument("--quick", action="store_true", help="smoke test: tiny teacher, 4 steps, tiny budgets")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.calibration, args.eval_blocks, args.batch, args.seq_len = 4, 16, 8, 4, 128
    return args


def main():
    args = parse_args()
    started = time.perf_counter()
    budget = Budget(steps=args.steps, lr=args.lr, correct_steps=args.correct_steps or max(1, args.steps // 3),
                    correct_lr=args.correct_lr, batch=args.batch, seq_len=args.seq_len, calibration=args.calibration,
                    eval_blocks=args.eval_blocks, max_bytes=1_000_000 if args.quick else None)
    root = Path(args.work_dir or tempfile.mkdtemp(prefix="paper_ablations-")).resolve()
    runner = Runner(root)
    print(f"work dir {root}", flush=True)
    teacher = find_teacher(args, runner, budget)
    shapes = plan_shapes(teacher)
    english = write_english(root / "english" / "pydoc_topics.jsonl")
    ablations = Ablations(runner, teacher, budget, shapes, english, args.english_val_fraction)

    results: Dict[str, Dict[str, List[float]]] = {}
    for seed in args.seeds:
        for name in args.only:
            for arm, value in getattr(ablations, ABLATIONS[name])(seed).items():
                results.setdefault(name, {}).setdefault(arm, []).append(value)

    print(report(args, budget, teacher, shapes, results, time.perf_counter() - started))
    print(json.dumps({"teacher": teacher, "seeds": args.seeds, "shapes": shapes, "budget": vars(budget),
                      "distill_tokens": budget.tokens, "correction_tokens": budget.correction_tokens,
                      "results": results, "agreement": {k: agreement(k, v) for k, v in results.items()},
                      "seconds": runner.seconds, "wall_s": round(time.perf_counter() - started, 1),
                      "work_dir": str(root)}))


if __name__ == "__main__":
    main()
