"""Distillation on one GPU: a Llama-3.2-1B-shaped teacher (1.24B parameters, vocabulary 128256)
and a student of about half, in bf16, through `minitron-distill` as a user runs it; then the
fused logit loss alone, the Triton kernel against the PyTorch chunked path.

    python benchmarks/gpu_distill.py [--steps 30 --seq-len 2048 --global-batch 16]
                                     [--tokenizer DIR]   # a saved 128k tokenizer, else one is trained

Prints, in order:
- the machine's own bf16 matmul throughput (8192^3 `torch.mm`, mean of 20 after warm-up), the
  measured limit that MFU is also given against (the data sheet's 989 TFLOP/s is the other);
- one row per logit-loss kernel (`distill.logits.kernel=triton`, then `torch`): tokens/s
  (summary.json, steps 2 on), model FLOP/s by `train/flops.py` (6 x student + 2 x teacher
  parameters per token plus attention, PaLM's count), MFU against both limits, peak allocated GiB;
- the loss alone (forward + backward of `chunked_logit_loss` on the run's token count and hidden
  size): each kernel at a few chunk sizes and a naive full-logit `F.kl_div`, time and peak memory.
Last line: a JSON object of the headline figures.

Random weights (nothing can be downloaded): the throughput of a step does not depend on them. The
corpus is this Python's standard library; the tokenizer a byte-level BPE trained on it to the
Llama 3 vocabulary size, so the loss really runs over 128256 columns.
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

import torch

TEACHER = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, head_dim=64, tie_word_embeddings=True)  # Llama 3.2 1B
STUDENT = dict(TEACHER, intermediate_size=5632, num_hidden_layers=8)  # depth and MLP pruned, ~0.5x
VOCAB = 128256


def matmul_tflops(n: int = 8192, repeats: int = 20) -> float:
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeats):
        a @ b
    torch.cuda.synchronize()
    return 2 * n ** 3 * repeats / (time.perf_counter() - t0) / 1e12


def checkpoint(out: Path, shape: dict, tokenizer: Path) -> int:
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(vocab_size=VOCAB, max_position_embeddings=8192, rope_theta=500000.0, **shape)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(out)
    for f in tokenizer.iterdir():
        (out / f.name).write_bytes(f.read_bytes())
    params = sum(p.numel() for p in model.parameters())
    del model
    torch.cuda.empty_cache()
    return params


def corpus(out: Path, chars: int) -> None:
    out.mkdir(parents=True)
    total = 0
    for i, path in enumerate(sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py"))):
        text = path.read_text(encoding="utf-8", errors="replace")
        (out / f"{i:05d}.txt").write_text(text)
        total += len(text)
        if total >= chars:
            return


def distill(work: Path, kernel: str, args) -> dict:
    out = work / f"distill_{kernel}"
    cmd = [sys.executable, "-m", "minitron.cli.distill", f"teacher.path={work / 'teacher'}",
           f"student.path={work / 'student'}", f"data.path={work / 'corpus'}", f"output_dir={out}", "logger=none",
           f"data.seq_len={args.seq_len}", f"train.global_batch_size={args.global_batch}",
           f"train.micro_batch_size={args.micro_batch}",
           f"train.max_steps={args.steps}", "train.eval_every=0", "train.eval_blocks=8", "train.save_every=0",
           "train.precision=bf16", f"distill.logits.kernel={kernel}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "MINITRON_CACHE": str(work / "cache")})
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-4000:]}")
    return json.loads((out / "summary.json").read_text())


def loss_alone(tokens: int, hidden: int, kernel: str, chunk: int) -> dict:
    """Forward + backward of the fused loss (or the naive one) on random bf16 inputs; the mean of
    5 after 2 warm-ups, and the peak allocated above the inputs."""
    import torch.nn.functional as F
    from types import SimpleNamespace

    from minitron.distill.fused import chunked_logit_loss

    g = torch.Generator(device="cuda").manual_seed(0)
    kw = dict(device="cuda", dtype=torch.bfloat16, generator=g)
    student_hidden = torch.randn(tokens, hidden, **kw).requires_grad_()
    student_weight = (torch.randn(VOCAB, hidden, **kw) * hidden ** -0.5).requires_grad_()
    teacher_hidden = torch.randn(tokens, hidden, **kw)
    teacher_weight = torch.randn(VOCAB, hidden, **kw) * hidden ** -0.5
    targets = torch.randint(0, VOCAB, (tokens,), device="cuda", generator=g)
    spec = SimpleNamespace(divergence="forward_kl", temperature=1.0, top_k=0, beta=0.5, scale_by_t2=False,
                           ce_weight=0.0, kernel=kernel)

    def step():
        student_hidden.grad = student_weight.grad = None
        if kernel == "naive":
            logq = F.log_softmax((student_hidden @ student_weight.T).float(), dim=-1)
            with torch.no_grad():
                logp = F.log_softmax((teacher_hidden @ teacher_weight.T).float(), dim=-1)
            loss = F.kl_div(logq, logp, reduction="batchmean", log_target=True)
        else:
            loss, _ = chunked_logit_loss(student_hidden, student_weight, teacher_hidden, teacher_weight, targets,
                                         VOCAB, spec, chunk_tokens=chunk)
        loss.backward()
        return loss

    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    for _ in range(2):
        loss = step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(5):
        step()
    torch.cuda.synchronize()
    return {"ms": (time.perf_counter() - t0) / 5 * 1e3, "peak_gib": (torch.cuda.max_memory_allocated() - base) / 2**30,
            "loss": loss.item()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--global-batch", type=int, default=16)
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--tokenizer", type=Path, default=None)
    ap.add_argument("--kernels", nargs="+", default=["triton", "torch"])
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gpu_distill.py needs a CUDA GPU")
    from minitron.distill import triton_kl
    from minitron.train.flops import flops_per_token

    kernels = [k for k in args.kernels if k != "triton" or triton_kl.available()]
    work = Path(tempfile.mkdtemp(prefix="gpu_distill_"))
    tokenizer = args.tokenizer
    if tokenizer is None:
        from minitron.data.tokenizer import train_bpe_tokenizer

        tokenizer = work / "tokenizer"
        stdlib = sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py"))
        train_bpe_tokenizer([p.read_text(encoding="utf-8", errors="replace") for p in stdlib],
                            VOCAB).save_pretrained(tokenizer)
    # The run's tokens, twice over, plus the validation split's share.
    corpus(work / "corpus", 4 * 3 * args.steps * args.global_batch * args.seq_len)
    teacher_params = checkpoint(work / "teacher", TEACHER, tokenizer)
    student_params = checkpoint(work / "student", STUDENT, tokenizer)
    from transformers import LlamaConfig

    per_token = flops_per_token(args.seq_len, student_params, LlamaConfig(vocab_size=VOCAB, **STUDENT),
                                teacher_params, LlamaConfig(vocab_size=VOCAB, **TEACHER))
    measured = matmul_tflops()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, teacher {teacher_params / 1e9:.2f}B, "
          f"student {student_params / 1e9:.2f}B, vocabulary {VOCAB}, {args.global_batch} x {args.seq_len} tokens "
          f"a step, {args.steps} steps; bf16 matmul measured {measured:.0f} TFLOP/s")
    print("| logit-loss kernel | attention | micro batch | tokens/s | model TFLOP/s | MFU (989 peak) "
          "| MFU (measured matmul) | peak GiB |\n|---|---|---|---:|---:|---:|---:|---:|")
    runs = {}
    for kernel in kernels:
        s = distill(work, kernel, args)
        achieved = s["tokens_per_s"] * per_token / 1e12
        peak = max(s["memory"]["peak_bytes"]) / 2**30
        runs[kernel] = {"tokens_per_s": s["tokens_per_s"], "tflops": achieved, "mfu": s["mfu"],
                        "mfu_measured": achieved / measured, "peak_gib": peak}
        print(f"| {kernel} | {s['attn_implementation']} | {args.micro_batch} "
              f"| {s['tokens_per_s']:,.0f} | {achieved:.0f} | {s['mfu'] or float('nan'):.3f} "
              f"| {achieved / measured:.3f} | {peak:.1f} |", flush=True)
    tokens = args.seq_len * args.micro_batch
    print(f"\nThe loss alone, {tokens} tokens x hidden {STUDENT['hidden_size']} x vocabulary {VOCAB}, bf16 inputs:")
    print("| loss | chunk tokens | forward+backward ms | peak GiB above inputs | loss |\n|---|---:|---:|---:|---:|")
    alone = {}
    for kernel, chunk in [(k, c) for k in kernels for c in (256, 1024, 4096)] + [("naive", 0)]:
        r = loss_alone(tokens, STUDENT["hidden_size"], kernel, chunk)
        alone[f"{kernel}_{chunk}"] = r
        print(f"| {kernel} | {chunk or 'all'} | {r['ms']:.1f} | {r['peak_gib']:.2f} | {r['loss']:.5f} |", flush=True)
        torch.cuda.empty_cache()
    best = runs.get("triton") or runs[kernels[0]]
    print(json.dumps({"device": torch.cuda.get_device_name(), "tokens_per_s": best["tokens_per_s"],
                      "mfu": best["mfu"], "mfu_measured_matmul": best["mfu_measured"],
                      "matmul_tflops": measured, "runs": runs, "loss_alone": alone}))


if __name__ == "__main__":
    main()
