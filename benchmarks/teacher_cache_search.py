"""A search with and without the teacher cache (distill.teacher_cache=true): the same 6
candidates, the flat protocol (every candidate distilled for the same steps, so all 6 are ranked
on equal terms), each run in fresh directories with its own data and importance caches, so each
pays for everything it needs (the cached one for filling its cache with its first candidate).

    minitron-train                      # the embedded teacher, in runs/train/model
    python benchmarks/teacher_cache_search.py [--teacher runs/train/model] [--params 3e6]
                                              [--candidates 6] [--steps 32] [--k 64]

Reports each run's wall time, winner and every candidate's distilled validation loss (always the
full-vocabulary next-token loss), the speedup, and Kendall's tau between the two rankings. Without
the cache the divergence is over the whole vocabulary (the default); with it, over the teacher's
top-k. The last line is a JSON object of both runs.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from minitron.search.ranking import kendall_tau


def run_search(args, root: Path, cached: bool) -> dict:
    out = root / "search"
    cmd = [sys.executable, "-m", "minitron.cli.search", f"model.path={args.teacher}", f"output_dir={out}",
           "logger=none", "search=wide", f"search.params={args.params}", f"search.max_candidates={args.candidates}",
           "search.halving=false", f"train.max_steps={args.steps}", "prune.calibration.num_samples=64",
           "prune.depth.eval_blocks=16", "search.eval_blocks=32", "train.eval_blocks=32",
           *(["distill.teacher_cache=true", f"distill.teacher_cache_k={args.k}"] if cached else [])]
    started = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   env={**os.environ, "MINITRON_CACHE": str(root / "cache")})
    seconds = time.perf_counter() - started
    summary = json.loads((out / "summary.json").read_text())
    candidates = json.loads((out / "search.json").read_text())["candidates"]
    return {"seconds": seconds, "winner": summary["winner"]["name"],
            "val_loss": {c["name"]: c["distill_val_loss"] for c in candidates},
            "order": [c["name"] for c in candidates]}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default="runs/train/model")
    parser.add_argument("--params", type=float, default=3e6)
    parser.add_argument("--candidates", type=int, default=6)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--k", type=int, default=64)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="teacher_cache_search-"))
    runs = {name: run_search(args, root / name, cached) for name, cached in (("uncached", False), ("cached", True))}
    plain, cached = runs["uncached"], runs["cached"]
    names = plain["order"]
    tau = kendall_tau([plain["val_loss"][n] for n in names], [cached["val_loss"][n] for n in names])
    print(f"{args.candidates} candidates, {args.steps} steps each (flat), teacher cache k={args.k}")
    print("| candidate | val loss, uncached | val loss, cached | cached / uncached |\n|---|---:|---:|---:|")
    for n in names:
        print(f"| {n} | {plain['val_loss'][n]:.4f} | {cached['val_loss'][n]:.4f} "
              f"| {cached['val_loss'][n] / plain['val_loss'][n]:.4f} |")
    print(f"| **wall s** | {plain['seconds']:.0f} | {cached['seconds']:.0f} | "
          f"**{cached['seconds'] / plain['seconds']:.3f}** |")
    shown = "undefined" if tau is None else f"{tau:.3f}"
    print(f"winner: uncached {plain['winner']}, cached {cached['winner']}; Kendall tau {shown}")
    print(json.dumps({"speedup": plain["seconds"] / cached["seconds"], "kendall_tau": tau,
                      "same_winner": plain["winner"] == cached["winner"], **runs}))


if __name__ == "__main__":
    main()
