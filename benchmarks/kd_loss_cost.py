"""The fused chunked logit loss against the naive one: forward KL(teacher || student) plus
backward, from final hidden states and the two lm_head weights, at a Llama-3 vocabulary.

    python benchmarks/kd_loss_cost.py [--vocab 128256 --hidden 2048 --tokens 4096]
                                      [--chunk 256] [--rounds 2]

naive: full [tokens x vocab] float32 logits for both models, `F.kl_div` on their log-softmaxes
(`reduction="batchmean"`, log_target), autograd backward. fused: `chunked_logit_loss` (the path
minitron-distill runs). Each measurement runs in a fresh child process: peak RSS (VmHWM after
the inputs are built, minus RSS then) is the loss's own memory, weight gradient included; time is
the best of --rounds forward+backward passes after one warm-up. The modes alternate.
"""
import argparse
import json
import subprocess
import sys
import time

import torch


def rss_kib(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(field)


def child(mode: str, vocab: int, hidden: int, tokens: int, chunk: int) -> dict:
    import torch.nn.functional as F
    from types import SimpleNamespace

    from minitron.distill.fused import chunked_logit_loss

    g = torch.Generator().manual_seed(0)
    student_hidden = torch.randn(tokens, hidden, generator=g).requires_grad_()
    student_weight = (torch.randn(vocab, hidden, generator=g) * hidden ** -0.5).requires_grad_()
    teacher_hidden = torch.randn(tokens, hidden, generator=g)
    teacher_weight = torch.randn(vocab, hidden, generator=g) * hidden ** -0.5
    targets = torch.randint(0, vocab, (tokens,), generator=g)
    spec = SimpleNamespace(divergence="forward_kl", temperature=1.0, top_k=0, beta=0.5, scale_by_t2=False,
                           ce_weight=0.0, kernel="auto")

    def step():
        student_hidden.grad = student_weight.grad = None
        if mode == "naive":
            logq = F.log_softmax(student_hidden @ student_weight.T, dim=-1)
            with torch.no_grad():
                logp = F.log_softmax(teacher_hidden @ teacher_weight.T, dim=-1)
            loss = F.kl_div(logq, logp, reduction="batchmean", log_target=True)
        else:
            loss, _ = chunked_logit_loss(student_hidden, student_weight, teacher_hidden, teacher_weight, targets,
                                         vocab, spec, chunk_tokens=chunk)
        loss.backward()
        return loss.item()

    # Peak from here on: reset the high-water mark to the current RSS (inputs built).
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = rss_kib("VmRSS")
    loss = step()
    peak = rss_kib("VmHWM") - base
    t0 = time.perf_counter()
    step()
    return {"mode": mode, "loss": loss, "peak_mib": peak / 1024, "seconds": time.perf_counter() - t0}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--chunk", type=int, default=256)  # distill.logits.chunk_tokens default
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--child", default=None)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.vocab, args.hidden, args.tokens, args.chunk)))
        return
    results = {"naive": [], "fused": []}
    for _ in range(args.rounds):
        for mode in results:
            out = subprocess.run([sys.executable, __file__, "--child", mode, "--vocab", str(args.vocab), "--hidden",
                                  str(args.hidden), "--tokens", str(args.tokens), "--chunk", str(args.chunk)],
                                 capture_output=True, text=True, check=True).stdout
            results[mode].append(json.loads(out.strip().splitlines()[-1]))
    best = {m: {"seconds": min(r["seconds"] for r in rs), "peak_mib": min(r["peak_mib"] for r in rs),
                "loss": rs[0]["loss"]} for m, rs in results.items()}
    n, f = best["naive"], best["fused"]
    print(f"vocab {args.vocab}, hidden {args.hidden}, {args.tokens} tokens, chunk {args.chunk}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| loss | forward+backward s | peak MiB above inputs |\n| --- | ---: | ---: |")
    for name, r in (("naive F.kl_div, full logits", n), ("fused chunked", f)):
        print(f"| {name} | {r['seconds']:.2f} | {r['peak_mib']:.0f} |")
    print(f"| **fused / naive** | **{f['seconds'] / n['seconds']:.3f}** | **{f['peak_mib'] / n['peak_mib']:.3f}** "
          f"(naive / fused {n['peak_mib'] / f['peak_mib']:.1f}x) |")
    print(f"loss naive {n['loss']:.6f} fused {f['loss']:.6f}")


if __name__ == "__main__":
    main()
