"""Data cache build: tokens/s and peak memory for generated corpora of two sizes, tokenised on one
process and on several, in one run.

    python benchmarks/data_throughput.py --sizes-mb 100 1000 --procs 1 2

Each build runs in a fresh child process with a fresh cache directory; the parent samples the
memory of the child and its workers every 0.2 s. Peak memory is the sum over the process tree of
PSS (shared pages counted once, split among the processes that map them) and, for comparison, of
RSS. The tokenizer is trained once, beforehand, so every build tokenises with the same one.
"""
import argparse
import json
import random
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import psutil


def write_corpus(path: Path, megabytes: int, seed: int = 0) -> None:
    """JSON lines of documents cut from the standard library's source (20-200 lines each)."""
    lines = []
    for file in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:200]:
        lines += file.read_text(encoding="utf-8", errors="replace").splitlines()
    rng = random.Random(seed)
    written, target = 0, megabytes * 1_000_000
    with path.open("w") as f:
        while written < target:
            k = rng.randint(20, 200)
            start = rng.randrange(len(lines) - k)
            record = json.dumps({"text": "\n".join(lines[start:start + k])}) + "\n"
            f.write(record)
            written += len(record)


def tree_memory(proc: psutil.Process):
    pss = rss = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            info = p.memory_full_info()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        pss += info.pss
        rss += info.rss
    return pss, rss


def measure(corpus: Path, tokenizer: Path, procs: int, work: Path) -> dict:
    cache = Path(tempfile.mkdtemp(dir=work, prefix="cache-"))
    child = subprocess.Popen([sys.executable, __file__, "--child", str(corpus), str(tokenizer), str(cache), str(procs)])
    proc = psutil.Process(child.pid)
    peak_pss = peak_rss = 0
    while child.poll() is None:
        pss, rss = tree_memory(proc)
        peak_pss, peak_rss = max(peak_pss, pss), max(peak_rss, rss)
        time.sleep(0.2)
    if child.returncode:
        raise SystemExit(f"build failed with exit code {child.returncode}")
    meta = json.loads(next(cache.glob("*/meta.json")).read_text())
    tokens = meta["train_tokens"] + meta["val_tokens"]
    return {"tokens": tokens, "documents": meta["train_documents"] + meta["val_documents"],
            "seconds": meta["build_seconds"], "tokens_per_s": tokens / meta["build_seconds"],
            "peak_pss_gb": peak_pss / 2**30, "peak_rss_gb": peak_rss / 2**30}


def child(corpus: str, tokenizer: str, cache: str, procs: str) -> None:
    from minitron.config import DataConfig
    from minitron.data.packing import build_or_load
    from minitron.distributed.gang import LocalGang

    build_or_load(DataConfig(path=corpus, tokenizer=tokenizer, cache_dir=cache, num_proc=int(procs)), LocalGang())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes-mb", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--work", default=None, help="scratch directory (default: a temporary one)")
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="data-throughput-"))
    work.mkdir(parents=True, exist_ok=True)
    from minitron.data.tokenizer import train_bpe_tokenizer

    sample = work / "sample.jsonl"
    write_corpus(sample, 5, seed=1)
    docs = [json.loads(line)["text"] for line in sample.read_text().splitlines()]
    train_bpe_tokenizer(docs, args.vocab).save_pretrained(work / "tokenizer")
    rows = []
    for size in args.sizes_mb:
        corpus = work / f"corpus-{size}mb.jsonl"
        if not corpus.exists():
            write_corpus(corpus, size)
        for procs in args.procs:
            r = measure(corpus, work / "tokenizer", procs, work)
            rows.append((size, procs, r))
            print(f"{size:>6} MB  procs={procs}  {r['tokens']:>12,} tokens  {r['seconds']:>7.1f} s  "
                  f"{r['tokens_per_s']:>10,.0f} tok/s  peak PSS {r['peak_pss_gb']:.2f} GB  "
                  f"RSS {r['peak_rss_gb']:.2f} GB", flush=True)
    print("\n| corpus | processes | tokens | build s | tokens/s | vs 1 process | peak PSS (tree) | peak RSS (tree) |")
    print("|---|---|---|---|---|---|---|---|")
    for size, procs, r in rows:
        base = next(x for s, p, x in rows if s == size and p == min(args.procs))
        print(f"| {size} MB | {procs} | {r['tokens']:,} | {r['seconds']:.1f} | {r['tokens_per_s']:,.0f} | "
              f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x | {r['peak_pss_gb']:.2f} GB | {r['peak_rss_gb']:.2f} GB |")
    small, large = min(args.sizes_mb), max(args.sizes_mb)
    for procs in args.procs:
        a = next(x for s, p, x in rows if s == small and p == procs)
        b = next(x for s, p, x in rows if s == large and p == procs)
        print(f"procs={procs}: peak PSS {large} MB / {small} MB = {b['peak_pss_gb'] / a['peak_pss_gb']:.2f}x")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(*sys.argv[2:6])
    else:
        main()
