"""minitron-distill against TRL's GKD trainer and two plain PyTorch loops, step by step.

    pip install -c launch/cpu-constraints.txt -e ".[bench]"
    python benchmarks/vs_trl.py [--vocabs 8192 128256] [--steps 30] [--skip 3]

The workload (the same for every system): a Llama teacher of 8 layers x 512 and a student of
4 layers x 256 (GQA, untied embeddings), sequences of 512 tokens, batch 4, fp32, forward KL on
the logits at temperature 1 and no cross-entropy, AdamW (lr 1e-4, betas 0.9/0.95, no weight
decay, constant rate), gradient clipping at 1, SDPA attention. Every system starts from the same
saved teacher and student checkpoints and reads the same blocks in the same order: the packed
data minitron-distill builds, in the order of its sampler.

The systems:
- minitron: the real `minitron-distill` command (its Hydra entry point, in a worker process),
  stage-0 DeepSpeed engine, fused chunked logit loss.
- trl: `GKDTrainer` configured for plain offline forward-KL distillation (lmbda=0: no on-policy
  generation; beta=0: forward KL; temperature 1; bf16=False; no gradient checkpointing), fed
  pre-tokenised blocks through a collator that stacks them.
- naive: a plain PyTorch loop, `F.kl_div` on full-vocabulary log-softmaxes of both models.
- chunked: the same loop with the KL computed over chunks of tokens, each under activation
  checkpointing, so full-vocabulary logits never exist for the whole batch.

These machines are noisy, so the systems run at once, each in its own process, and take turns
one optimizer step at a time (a coordinator hands a token round; each system's step time runs
from receiving the token to asking for the next one, so its data loading and logging count).
Ratios are medians of per-round ratios. The first --skip steps (warm-up) are not timed. Between
rounds the coordinator times a large fp32 `torch.mm` while every system waits: model FLOP/s
over that rate is the CPU stand-in for MFU (model FLOPs: 2 per teacher parameter and 6 per
student parameter per token, input embeddings excluded, attention included).

Peak memory is each process's peak RSS (VmHWM), everything included (libraries, both models,
the optimizer, the step's working set).

Prints a table per vocabulary; the last line is a JSON object with minitron's throughput ratio
and peak-memory ratio over TRL's, and its cpu_mfu, at the largest vocabulary.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from multiprocessing.connection import Client, Listener
from pathlib import Path

import numpy as np
import torch

SYSTEMS = ("minitron", "trl", "naive", "chunked")
SEQ_LEN, BATCH, LR, BETAS, CLIP, SEED = 512, 4, 1e-4, (0.9, 0.95), 1.0, 0
TEACHER = dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
               num_key_value_heads=2)
STUDENT = dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
               num_key_value_heads=1)
CHUNK_TOKENS = 512  # the chunked plain loop's chunk
AUTHKEY = b"vs_trl"


# ---------------------------------------------------------------- preparation (the coordinator)

def prepare(work: Path, vocab: int, steps: int) -> dict:
    """Tokenizer, corpus, both checkpoints, minitron's data cache and the order of the blocks."""
    from minitron.config import DataConfig
    from minitron.data.packing import build_or_load
    from minitron.data.sampler import BlockSampler
    from minitron.distributed.gang import LocalGang

    work.mkdir(parents=True, exist_ok=True)
    tokenizer = word_tokenizer(vocab)
    tokenizer.save_pretrained(work / "tokenizer")
    corpus = work / "corpus.txt"
    if not corpus.is_file():
        write_corpus(corpus, vocab, tokens=int((steps + 8) * BATCH * SEQ_LEN * 1.1))
    for name, shape in (("teacher", TEACHER), ("student", STUDENT)):
        if not (work / name / "config.json").is_file():
            random_llama(vocab, shape, seed=SEED + (name == "student")).save_pretrained(work / name)
            tokenizer.save_pretrained(work / name)
    data_cfg = DataConfig(path=str(corpus), tokenizer=str(work / "tokenizer"), seq_len=SEQ_LEN,
                          cache_dir=str(work / "cache"))
    data = build_or_load(data_cfg, LocalGang(), SEED)
    sampler = BlockSampler(data.train, BATCH, BATCH, 0, 1, SEED)
    order = np.concatenate([sampler.micro_batch(s, 0).numpy() for s in range(steps)])
    np.save(work / "order.npy", order)
    return {"work": str(work), "vocab": vocab, "steps": steps}


def word_tokenizer(vocab: int):
    """A word-level tokenizer of exactly `vocab` tokens (no BPE could learn 128k merges from a
    small corpus): every id is a real token the corpus uses, so the loss spans the whole vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"<|endoftext|>": 0, "<unk>": 1, **{f"w{i}": i for i in range(2, vocab)}}
    tok = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", unk_token="<unk>",
                                   pad_token="<|endoftext|>")


def write_corpus(path: Path, vocab: int, tokens: int) -> None:
    """Paragraphs of random words (uniform over the vocabulary), one blank line apart."""
    rng = np.random.default_rng(SEED)
    ids = rng.integers(2, vocab, size=tokens)
    paragraphs = [" ".join(f"w{i}" for i in ids[s:s + 300]) for s in range(0, tokens, 300)]
    path.write_text("\n\n".join(paragraphs) + "\n")


def random_llama(vocab: int, shape: dict, seed: int):
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, max_position_embeddings=SEQ_LEN, tie_word_embeddings=False,
                      bos_token_id=0, eos_token_id=0, pad_token_id=0, **shape)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")


def model_flops_per_step(work: Path) -> float:
    """2 FLOPs per teacher parameter and 6 per student parameter per token (input embeddings,
    a lookup, excluded; the lm_head included), plus attention (train/flops.py)."""
    from transformers import AutoConfig

    from minitron.train.flops import flops_per_token

    def arithmetic_params(name):
        cfg = AutoConfig.from_pretrained(work / name)
        with torch.device("meta"):
            model = random_llama(cfg.vocab_size, {k: getattr(cfg, k) for k in TEACHER}, SEED)
        return sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n), cfg

    (student, s_cfg), (teacher, t_cfg) = arithmetic_params("student"), arithmetic_params("teacher")
    return flops_per_token(SEQ_LEN, student, s_cfg, teacher, t_cfg) * BATCH * SEQ_LEN


def matmul_flops_per_s(n: int = 2048, reps: int = 8) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    t0 = time.perf_counter()
    for _ in range(reps):
        torch.mm(a, b)
    return 2 * n ** 3 * reps / (time.perf_counter() - t0)


# ---------------------------------------------------------------- turn-taking

class Gate:
    """A worker's side of the token: `begin()` before each step reports the previous step's
    seconds and loss and waits for the token; `finish()` reports the process's peak memory.
    With `profile_to`, the step numbered `profile_step` (a warm-up step, never timed) runs under
    torch.profiler and its table of top operators is written there."""

    def __init__(self, address, name: str, profile_step=None, profile_to=None):
        self.conn = Client(address, authkey=AUTHKEY)
        self.conn.send(("hello", name))
        self.loss, self.go, self.step = None, None, 0
        self.profile_step, self.profile_to, self.profiler = profile_step, profile_to, None

    def begin(self) -> None:
        now = time.perf_counter()
        if self.profiler is not None:
            self.profiler.stop()
            Path(self.profile_to).write_text(self.profiler.key_averages().table(sort_by="self_cpu_time_total",
                                                                                row_limit=25))
            self.profiler = None
        if self.go is None:
            self.conn.send(("ready", rss_bytes("VmRSS"), rss_bytes("VmHWM")))
        else:
            self.conn.send(("step", now - self.go, self.loss))
        assert self.conn.recv() == "go"
        if self.profile_to and self.step == self.profile_step:
            self.profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
            self.profiler.start()
        self.step += 1
        self.go = time.perf_counter()

    def finish(self) -> None:
        self.conn.send(("done", rss_bytes("VmHWM")))


def rss_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def coordinate(listener, procs: dict, steps: int, skip: int) -> dict:
    """Hand the token round until every worker is done; per system: step seconds, losses, peak."""
    conns = {}
    while len(conns) < len(procs):
        conn = listener.accept()
        _, name = conn.recv()
        conns[name] = conn
    results = {name: {"seconds": [], "losses": []} for name in procs}
    for name, conn in conns.items():
        kind, results[name]["start_rss"], results[name]["start_peak"] = conn.recv()
        assert kind == "ready", (name, kind)
    mm_rates = []
    for step in range(steps):
        names = list(conns)
        names = names[step % len(names):] + names[:step % len(names)]  # nobody always goes first
        for name in names:
            conns[name].send("go")
            message = conns[name].recv()
            if message[0] == "step":
                results[name]["seconds"].append(message[1])
                results[name]["losses"].append(message[2])
            else:
                assert message[0] == "done" and step == steps - 1, (name, message, step)
                results[name]["peak_rss"] = message[1]
        if step >= skip:
            mm_rates.append(matmul_flops_per_s())
    for name, conn in conns.items():
        if "peak_rss" not in results[name]:
            message = conn.recv()
            results[name]["peak_rss"] = message[1]
    for name, proc in procs.items():
        if proc.wait() != 0:
            raise SystemExit(f"the {name} worker failed (rc {proc.returncode}): see its log, {name}.log")
    for r in results.values():
        r["seconds"] = r["seconds"][skip:]
    return {"systems": results, "matmul_flops_per_s": statistics.median(mm_rates)}


# ---------------------------------------------------------------- the workers

def run_minitron(gate: Gate, work: Path, steps: int) -> None:
    """The real minitron-distill entry point; the loop's step function is wrapped with the gate."""
    import minitron.train.loop as loop

    step_fn = loop._accumulate

    def gated(*args, **kwargs):
        gate.begin()
        sums = step_fn(*args, **kwargs)
        gate.loss = sums["loss"]
        return sums

    loop._accumulate = gated
    sys.argv = ["minitron-distill", f"teacher.path={work / 'teacher'}", f"student.path={work / 'student'}",
                f"data.path={work / 'corpus.txt'}", f"data.tokenizer={work / 'tokenizer'}",
                f"data.cache_dir={work / 'cache'}", f"data.seq_len={SEQ_LEN}", f"output_dir={work / 'runs/minitron'}",
                f"seed={SEED}", "resume=never", "logger=none", f"train.max_steps={steps}",
                f"train.global_batch_size={BATCH}", f"train.micro_batch_size={BATCH}", f"train.lr={LR}",
                "train.warmup_steps=0", "train.min_lr_ratio=1.0", "train.weight_decay=0.0",
                f"train.beta1={BETAS[0]}", f"train.beta2={BETAS[1]}", f"train.grad_clip={CLIP}",
                "train.eval_every=0", "train.save_every=0", "train.eval_blocks=1", "train.precision=fp32",
                "student.attn_implementation=sdpa", "teacher.attn_implementation=sdpa"]
    from minitron.cli.distill import main

    try:
        main()
    except SystemExit as e:
        if e.code:
            raise


def load_pair(work: Path):
    from transformers import AutoModelForCausalLM

    def load(name):
        return AutoModelForCausalLM.from_pretrained(work / name, dtype=torch.float32, attn_implementation="sdpa")

    teacher = load("teacher").eval().requires_grad_(False)
    return teacher, load("student").train()


def run_trl(gate: Gate, work: Path, steps: int) -> None:
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    class GatedGKD(GKDTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            gate.loss = float((loss[0] if return_outputs else loss).detach())
            return loss

    class OnStepBegin(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            gate.begin()

    def stack(rows):
        ids = torch.tensor([row["input_ids"] for row in rows])
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}

    teacher, student = load_pair(work)
    order = np.load(work / "order.npy")
    args = GKDConfig(output_dir=str(work / "runs/trl"), per_device_train_batch_size=BATCH, max_steps=steps,
                     learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
                     adam_beta1=BETAS[0], adam_beta2=BETAS[1], max_grad_norm=CLIP, optim="adamw_torch",
                     lmbda=0.0, beta=0.0, temperature=1.0, seq_kd=False, bf16=False, fp16=False,
                     gradient_checkpointing=False, use_cpu=True, logging_steps=1, save_strategy="no",
                     report_to="none", disable_tqdm=True, dataloader_num_workers=0, max_length=SEQ_LEN,
                     train_sampling_strategy="sequential", seed=SEED)
    trainer = GatedGKD(model=student, teacher_model=teacher, args=args, data_collator=stack,
                       train_dataset=Dataset.from_dict({"input_ids": order.tolist()}),
                       processing_class=AutoTokenizer.from_pretrained(work / "tokenizer"),
                       callbacks=[OnStepBegin()])
    trainer.train()


def run_plain(gate: Gate, work: Path, steps: int, chunked: bool) -> None:
    import torch.nn.functional as F
    from torch.utils.checkpoint import checkpoint

    teacher, student = load_pair(work)
    optimizer = torch.optim.AdamW(student.parameters(), lr=LR, betas=BETAS, weight_decay=0.0)
    order = torch.from_numpy(np.load(work / "order.npy"))

    def kl(student_logits, teacher_logits):  # summed over tokens
        return F.kl_div(F.log_softmax(student_logits.float(), -1), F.log_softmax(teacher_logits.float(), -1),
                        reduction="sum", log_target=True)

    def chunk_kl(h_student, h_teacher):
        return kl(student.lm_head(h_student), teacher.lm_head(h_teacher))

    for step in range(steps):
        gate.begin()
        ids = order[step * BATCH:(step + 1) * BATCH]
        if chunked:
            with torch.no_grad():
                h_teacher = teacher.model(input_ids=ids).last_hidden_state[:, :-1].flatten(0, 1)
            h_student = student.model(input_ids=ids).last_hidden_state[:, :-1].flatten(0, 1)
            loss = sum(checkpoint(chunk_kl, h_student[s:s + CHUNK_TOKENS], h_teacher[s:s + CHUNK_TOKENS],
                                  use_reentrant=False)
                       for s in range(0, len(h_student), CHUNK_TOKENS)) / len(h_student)
        else:
            with torch.no_grad():
                teacher_logits = teacher(input_ids=ids).logits[:, :-1]
            student_logits = student(input_ids=ids).logits[:, :-1]
            loss = kl(student_logits, teacher_logits) / (student_logits.shape[0] * student_logits.shape[1])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), CLIP)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        gate.loss = loss.item()


def worker(system: str, address: str, work: Path, steps: int, profile_step) -> None:
    host, port = address.rsplit(":", 1)
    gate = Gate((host, int(port)), system, profile_step, work / f"{system}.profile.txt")
    if system == "minitron":
        run_minitron(gate, work, steps)
    elif system == "trl":
        run_trl(gate, work, steps)
    else:
        run_plain(gate, work, steps, chunked=system == "chunked")
    gate.finish()


# ---------------------------------------------------------------- the report

def compare(work: Path, systems, steps: int, skip: int, flops_per_step: float, profile: bool) -> dict:
    listener = Listener(("127.0.0.1", 0), authkey=AUTHKEY)
    address = "%s:%d" % listener.address
    procs = {}
    for name in systems:
        log = open(work / f"{name}.log", "w")
        procs[name] = subprocess.Popen(
            [sys.executable, __file__, "--worker", name, "--address", address, "--work", str(work),
             "--steps", str(steps + 1), *(["--profile-step", str(skip - 1)] if profile else [])],
            stdout=log, stderr=subprocess.STDOUT,
            env={**os.environ, "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false"})
    result = coordinate(listener, procs, steps + 1, skip)
    result["flops_per_step"] = flops_per_step
    return result


def summarise(result: dict, vocab: int) -> dict:
    systems = result["systems"]
    ours = systems["minitron"]
    tokens = BATCH * SEQ_LEN
    rows = {}
    for name, r in systems.items():
        ratio = statistics.median(o / t for o, t in zip(r["seconds"], ours["seconds"]))  # their time / ours
        losses = np.array(r["losses"], dtype=np.float64)
        ref = np.array(ours["losses"], dtype=np.float64)
        rows[name] = {
            "step_s": statistics.median(r["seconds"]),
            "tokens_per_s": tokens / statistics.median(r["seconds"]),
            "ours_speedup": ratio,
            "peak_gb": r["peak_rss"] / 1e9,
            "loaded_gb": r["start_rss"] / 1e9,
            "loading_peak_gb": r["start_peak"] / 1e9,
            "ours_memory_ratio": ours["peak_rss"] / r["peak_rss"],
            "final_loss": float(losses[-1]),
            "max_rel_loss_diff": float(np.max(np.abs(losses - ref) / np.abs(ref))),
        }
    mfu = result["flops_per_step"] / rows["minitron"]["step_s"] / result["matmul_flops_per_s"]
    print(f"\n### vocabulary {vocab}: {len(ours['seconds'])} timed steps of {tokens} tokens; "
          f"model arithmetic {result['flops_per_step'] / 1e12:.3f} TFLOP per step; "
          f"fp32 matmul {result['matmul_flops_per_s'] / 1e9:.0f} GFLOP/s\n")
    print("| system | median step s | tokens/s | minitron speedup (median per-step ratio) | RSS at step 1 GB "
          "| peak RSS before step 1 GB | peak RSS GB | minitron memory ratio | model GFLOP/s | final loss "
          "| max rel loss diff vs minitron |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, row in rows.items():
        print(f"| {name} | {row['step_s']:.2f} | {row['tokens_per_s']:.0f} | {row['ours_speedup']:.2f}x "
              f"| {row['loaded_gb']:.2f} | {row['loading_peak_gb']:.2f} | {row['peak_gb']:.2f} "
              f"| {row['ours_memory_ratio']:.2f}x "
              f"| {result['flops_per_step'] / row['step_s'] / 1e9:.0f} | {row['final_loss']:.6f} "
              f"| {row['max_rel_loss_diff']:.1e} |")
    print(f"\nminitron cpu_mfu (model FLOP/s over fp32 matmul FLOP/s): {mfu:.3f}")
    return {"rows": rows, "cpu_mfu": mfu}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocabs", type=int, nargs="+", default=[8192, 128256])
    parser.add_argument("--steps", type=int, default=30, help="timed steps plus the skipped ones")
    parser.add_argument("--skip", type=int, default=3, help="warm-up steps left out of the timing")
    parser.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=SYSTEMS)
    parser.add_argument("--profile", action="store_true",
                        help="profile each system's last warm-up step into <work>/v<vocab>/<system>.profile.txt")
    parser.add_argument("--work", help="where the models, data and runs go (default: a temporary directory)")
    parser.add_argument("--worker", choices=SYSTEMS, help=argparse.SUPPRESS)
    parser.add_argument("--address", help=argparse.SUPPRESS)
    parser.add_argument("--profile-step", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker, args.address, Path(args.work), args.steps, args.profile_step)
    if "minitron" not in args.systems or "trl" not in args.systems:
        parser.error("--systems: minitron and trl are both needed (the ratios are between them)")
    if args.profile and args.skip < 2:
        parser.error("--profile: needs --skip 2 or more (the last warm-up step is profiled; the first pays "
                     "one-off costs)")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {os.cpu_count()} CPUs; "
          f"python {sys.version.split()[0]}; {versions()}")
    root = Path(args.work or tempfile.mkdtemp(prefix="vs_trl-"))
    summary = {}
    for vocab in args.vocabs:
        work = root / f"v{vocab}"
        prepare(work, vocab, args.steps + 1)
        result = compare(work, args.systems, args.steps, args.skip, model_flops_per_step(work), args.profile)
        summary[vocab] = summarise(result, vocab)
    largest = summary[max(summary)]
    print(json.dumps({"vocab": max(summary),
                      "throughput_ratio": round(largest["rows"]["trl"]["ours_speedup"], 3),
                      "memory_ratio": round(largest["rows"]["trl"]["ours_memory_ratio"], 3),
                      "cpu_mfu": round(largest["cpu_mfu"], 3)}))


def versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    found = []
    for package in ("transformers", "deepspeed", "trl", "accelerate"):
        try:
            found.append(f"{package} {version(package)}")
        except PackageNotFoundError:
            found.append(f"{package} missing")
    return ", ".join(found)


if __name__ == "__main__":
    main()
