"""Successive halving against the paper's flat protocol, on the same search: the same candidates,
the same per-candidate budget, one run of `minitron-search` each (halving first, then flat, in
fresh output directories sharing one importance cache). Reports each protocol's winner,
distillation tokens, ranking and wall time, and the ratios halving / flat.

    minitron-train                      # the embedded teacher, in runs/train/model
    python benchmarks/search_halving.py [--teacher runs/train/model] [--params 3e6]
                                        [--candidates 8] [--steps 32]

The last line is a JSON object with both protocols' figures.
"""
import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run_search(args, out: Path, halving: bool) -> dict:
    cmd = [sys.executable, "-m", "minitron.cli.search", f"model.path={args.teacher}", f"output_dir={out}",
           "logger=none", "search=wide", f"search.params={args.params}", f"search.max_candidates={args.candidates}",
           f"search.halving={str(halving).lower()}", f"train.max_steps={args.steps}",
           "prune.calibration.num_samples=64", "prune.depth.eval_blocks=16", "search.eval_blocks=32",
           "train.eval_blocks=32"]
    started = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    seconds = time.perf_counter() - started
    summary = json.loads((out / "summary.json").read_text())
    order = [c["name"] for c in json.loads((out / "search.json").read_text())["candidates"]]
    return {"winner": summary["winner"]["name"], "winner_val_loss": summary["winner"]["distill_val_loss"],
            "distill_tokens": summary["distill_tokens"], "seconds": seconds, "order": order,
            "rounds": summary["rounds"], "kendall_tau": summary["kendall_tau"]}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default="runs/train/model")
    parser.add_argument("--params", type=float, default=3e6)
    parser.add_argument("--candidates", type=int, default=8)
    parser.add_argument("--steps", type=int, default=32)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="search_halving-"))
    results = {name: run_search(args, root / name, halving) for name, halving in (("halving", True), ("flat", False))}
    h, f = results["halving"], results["flat"]
    print(f"| protocol | winner | winner val loss | distillation tokens | wall s |")
    print(f"| --- | --- | ---: | ---: | ---: |")
    for name, r in results.items():
        print(f"| {name} | {r['winner']} | {r['winner_val_loss']:.4f} | {r['distill_tokens']:,} | {r['seconds']:.0f} |")
    print(f"| **halving / flat** | {'same' if h['winner'] == f['winner'] else 'DIFFERENT'} | | "
          f"**{h['distill_tokens'] / f['distill_tokens']:.3f}** | **{h['seconds'] / f['seconds']:.3f}** |")
    print("flat ranking:", " > ".join(f["order"]))
    print("halving ranking:", " > ".join(h["order"]), "rounds", h["rounds"])
    print(json.dumps({"same_winner": h["winner"] == f["winner"],
                      "token_ratio": h["distill_tokens"] / f["distill_tokens"], **results}))


if __name__ == "__main__":
    main()
