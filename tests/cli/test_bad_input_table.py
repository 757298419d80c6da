"""Issue 13's table: every command against every class of mistake (missing, unreadable and
wrong-type paths; corrupt checkpoint files; out-of-range numbers; a bad output_dir; unknown keys
and presets). Each case runs the real entry point in this process and must end in one line
`error: <key>: ...` with exit status 2 (for a key that does not exist, Hydra's own message naming
it), with no traceback, before a process group, data or a model is touched, and with the disk as
it was before the run.

In-process, not one interpreter per case: a case then costs its checks (well under a second), not
the imports of torch, transformers and deepspeed again.
"""
import dataclasses
import importlib
import logging
import os
import shutil
import sys
from pathlib import Path
from typing import Callable, List

import pytest
import torch
from omegaconf import OmegaConf

from conftest import compose_job, tiny_args

COMMANDS = ("train", "prune", "distill", "eval", "search", "pipeline")
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


class Reached(BaseException):
    """Raised by the stand-ins for the first expensive step; a BaseException so that neither the
    CLI's error handling nor Hydra's reports it as the user's mistake."""


@dataclasses.dataclass
class Inputs:
    """What a case's overrides are made from; `out` is the base arguments' output_dir."""
    teacher: Path
    corpus: Path
    pruned: Path
    tmp: Path

    @property
    def out(self) -> Path:
        return self.tmp / "out"

    def copy(self, src: Path, name: str) -> Path:
        return Path(shutil.copytree(src, self.tmp / name, symlinks=True))

    def broken(self, how: Callable[[Path], None], name: str = "broken") -> Path:
        """A copy of the sound teacher checkpoint, broken by `how(copy)`."""
        root = self.copy(self.teacher, name)
        how(root)
        return root

    def file(self, name: str = "notes.txt") -> Path:
        (self.tmp / name).write_text("a file, not a directory\n")
        return self.tmp / name

    def binary_corpus(self) -> Path:
        """Not text, though named as if it were."""
        (self.tmp / "weights.txt").write_bytes(bytes(range(256)) * 4)
        return self.tmp / "weights.txt"

    def train_run(self) -> Path:
        """A finished minitron-train run (summary.json, config.yaml, model/): the teacher's own."""
        return self.copy(self.teacher.parent, "train_run")

    def prune_output(self) -> Path:
        """A finished minitron-prune output (a checkpoint with pruning.json and summary.json)."""
        return self.copy(self.pruned, "pruned")

    def read_only_dir(self) -> Path:
        """An output_dir that cannot be created. Root may write into any directory, so as root
        it is a path below a regular file; otherwise below a directory without write permission."""
        if IS_ROOT:
            return self.file("plain_file") / "out"
        (self.tmp / "locked").mkdir()
        (self.tmp / "locked").chmod(0o555)
        return self.tmp / "locked" / "out"


# -- ways to break a copy of the teacher checkpoint -------------------------------------------

def truncate_weights(root: Path) -> None:
    weights = root / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:4096])


def garbage_config(root: Path) -> None:
    (root / "config.json").write_text('{"architectures": ["LlamaForCausalLM"], "hidden_')


def list_config(root: Path) -> None:
    (root / "config.json").write_text("[1, 2]")


def garbage_tokenizer(root: Path) -> None:
    tokenizer = root / "tokenizer.json"
    tokenizer.write_bytes(tokenizer.read_bytes()[:300])


def garbage_tokenizer_config(root: Path) -> None:
    (root / "tokenizer_config.json").write_text("not json")


def html_weights(root: Path) -> None:
    """What a failed download leaves: an error page under the weights' name."""
    (root / "model.safetensors").write_bytes(b"<html>Not Found</html>" * 10)


def unreadable_weights(root: Path) -> None:
    """Weights that cannot be read: a link to a blob that is gone, as in a Hugging Face cache whose
    blobs were deleted (as root, a file without read permission is still readable)."""
    weights = root / "model.safetensors"
    if IS_ROOT:
        weights.unlink()
        weights.symlink_to(root / "blobs" / "deleted")
    else:
        weights.chmod(0)


def no_weights(root: Path) -> None:
    (root / "model.safetensors").unlink()


# -- each command's sound arguments; a case appends its mistake (Hydra: the last value wins) --

def base_args(command: str, x: Inputs) -> List[str]:
    t, c, out = x.teacher, x.corpus, x.out
    return {
        "train": lambda: tiny_args(c, out),
        "prune": lambda: [f"model.path={t}", f"data.path={c}", "data.seq_len=64", f"output_dir={out}",
                          "prune.calibration.num_samples=8", "prune.calibration.micro_batch_size=4",
                          "prune.depth.eval_blocks=2", "prune.export.ffn_hidden_size=96"],
        "distill": lambda: [f"teacher.path={t}", f"student.path={x.pruned}", f"data.path={c}", f"output_dir={out}",
                            "logger=none", "data.seq_len=64", "train.micro_batch_size=4",
                            "train.global_batch_size=8", "train.max_steps=4", "train.eval_blocks=8"],
        "eval": lambda: [f"model.path={t}", f"data.path={c}", "data.seq_len=64", f"output_dir={out}",
                         "eval.blocks=8"],
        "search": lambda: [f"model.path={t}", f"data.path={c}", "data.seq_len=64", f"output_dir={out}",
                           "logger=none", "search=wide", "search.params=1e5", "search.tolerance=0.1",
                           "search.space.hidden_size.step=16", "search.max_candidates=4", "search.eval_blocks=8",
                           "prune.calibration.num_samples=8", "prune.calibration.micro_batch_size=4",
                           "prune.depth.eval_blocks=2", "train.max_steps=4", "train.micro_batch_size=4",
                           "train.global_batch_size=8", "train.eval_blocks=8"],
        "pipeline": lambda: [f"model.path={t}", f"data.path={c}", "data.seq_len=64", f"output_dir={out}",
                             "logger=none", "search_steps=2", "search.max_candidates=2", "search.eval_blocks=8",
                             "prune.calibration.num_samples=8", "prune.calibration.micro_batch_size=4",
                             "prune.depth.eval_blocks=2", "train.micro_batch_size=4", "train.global_batch_size=8",
                             "train.max_steps=4", "train.eval_blocks=8", "eval.blocks=8",
                             "targets=[{name: half, fraction: 0.5}, {name: shallow, shape: {num_layers: 1}}]"],
    }[command]()


@dataclasses.dataclass(frozen=True)
class Case:
    command: str
    name: str
    overrides: Callable[[Inputs], List[str]]
    expect: str
    """What follows `error: ` in the line: its start, then each part after a `...` in order. For
    a `hydra` case (a key the schema does not have), the key Hydra's own message must name."""
    hydra: bool = False

    def matches(self, line: str) -> bool:
        first, *rest = self.expect.split("...")
        if not line.startswith(f"error: {first}"):
            return False
        at = len(f"error: {first}")
        for part in rest:
            at = line.find(part, at)
            if at < 0:
                return False
            at += len(part)
        return True


def case(command, name, overrides, expect, hydra=False):
    return pytest.param(Case(command, name, overrides, expect, hydra), id=f"{command}-{name}")


CASES = [
    # -- minitron-train ----------------------------------------------------------------------
    case("train", "missing-data", lambda x: [f"data.path={x.tmp / 'none'}"], "data.path: no such file"),
    case("train", "missing-model", lambda x: [f"model.path={x.tmp / 'none'}"], "model.path: no such directory"),
    case("train", "missing-val-data", lambda x: [f"data.val_path={x.tmp / 'none.jsonl'}"], "data.val_path: no such"),
    case("train", "data-below-a-file", lambda x: [f"data.path={x.file()}/c.jsonl"], "data.path: no such file"),
    case("train", "data-is-weights", lambda x: [f"data.path={x.teacher / 'model.safetensors'}"],
         "data.path: ...is not one of .txt"),
    case("train", "binary-corpus", lambda x: [f"data.path={x.binary_corpus()}"], "data.path: ...is a binary file"),
    case("train", "model-is-a-file", lambda x: [f"model.path={x.teacher / 'config.json'}"],
         "model.path: ...is not a Hugging Face checkpoint"),
    case("train", "model-is-a-corpus", lambda x: [f"model.path={x.corpus}"],
         "model.path: ...is not a Hugging Face checkpoint"),
    case("train", "corrupt-config", lambda x: [f"model.path={x.broken(garbage_config)}"],
         "model.path: ...config.json is not valid JSON"),
    case("train", "truncated-weights", lambda x: [f"model.path={x.broken(truncate_weights)}"],
         "model.path: ...model.safetensors is truncated (4,096 of"),
    case("train", "unreadable-weights", lambda x: [f"model.path={x.broken(unreadable_weights)}"],
         "model.path: ...model.safetensors cannot be read"),
    case("train", "corrupt-tokenizer", lambda x: [f"model.path={x.broken(garbage_tokenizer)}"],
         "data.tokenizer: ...tokenizer.json is not valid JSON"),
    case("train", "lr", lambda x: ["train.lr=0"], "train.lr: must be positive"),
    case("train", "lr-not-a-number", lambda x: ["train.lr=fast"], "train.lr", hydra=True),
    case("train", "max-steps", lambda x: ["train.max_steps=0"], "train.max_steps: must be at least 1"),
    case("train", "schedule-steps", lambda x: ["train.schedule_steps=2"], "train.schedule_steps: 2 is below"),
    case("train", "warmup", lambda x: ["train.warmup_steps=-5"], "train.warmup_steps: must be at least 0"),
    case("train", "micro-batch", lambda x: ["train.micro_batch_size=0"], "train.micro_batch_size: must be at least 1"),
    case("train", "global-batch", lambda x: ["train.global_batch_size=6", "train.micro_batch_size=4"],
         "train.global_batch_size: 6 is not"),
    case("train", "weight-decay", lambda x: ["train.weight_decay=-1"], "train.weight_decay: must be at least 0"),
    case("train", "beta2", lambda x: ["train.beta2=1.5"], "train.beta2: must be in [0, 1)"),
    case("train", "min-lr-ratio", lambda x: ["train.min_lr_ratio=1.5"], "train.min_lr_ratio: must be in [0, 1]"),
    case("train", "eval-blocks", lambda x: ["train.eval_blocks=0"], "train.eval_blocks: must be at least 1"),
    case("train", "precision", lambda x: ["train.precision=fp8"], "train.precision: must be fp32 or bf16"),
    case("train", "val-fraction", lambda x: ["data.val_fraction=1.5"], "data.val_fraction: must be in (0, 1)"),
    case("train", "blend-weight", lambda x: [f"data.sources=[{{path: {x.corpus}, weight: -1}}]", "data.path=null"],
         "data.sources[0].weight: must be positive"),
    case("train", "seq-len", lambda x: ["data.seq_len=1"], "data.seq_len: must be at least 2"),
    case("train", "seq-len-above-positions", lambda x: ["data.seq_len=4096"], "data.seq_len: 4096 exceeds"),
    case("train", "num-proc", lambda x: ["data.num_proc=0"], "data.num_proc: must be at least 1"),
    case("train", "vocab-too-small", lambda x: ["data.vocab_size=100"], "data.vocab_size: must be at least 300"),
    case("train", "max-bytes", lambda x: ["data.max_bytes=0"], "data.max_bytes: must be positive"),
    case("train", "missing-tokenizer", lambda x: [f"data.tokenizer={x.tmp / 'nope'}"], "data.tokenizer: no such directory"),
    case("prune", "tokenizer-is-a-file", lambda x: [f"data.tokenizer={x.file()}"], "data.tokenizer: ...is a file"),
    case("train", "output-is-a-file", lambda x: [f"output_dir={x.file()}"], "output_dir: ...is a file"),
    case("train", "output-not-writable", lambda x: [f"output_dir={x.read_only_dir()}"], "output_dir: cannot create"),
    case("train", "output-of-prune", lambda x: [f"output_dir={x.prune_output()}"],
         "output_dir: ...holds the finished output of another command"),
    case("train", "output-of-other-run", lambda x: [f"output_dir={x.train_run()}", "train.lr=1e-3"],
         "output_dir: ...holds a finished run with other settings"),
    case("train", "unknown-key", lambda x: ["train.lrr=1e-3"], "train.lrr", hydra=True),
    case("train", "unknown-model", lambda x: ["model=gigantic"], "model: unknown preset 'gigantic'"),
    case("train", "unknown-logger", lambda x: ["logger=tensorboard"], "logger: unknown preset 'tensorboard'"),
    # -- minitron-prune ----------------------------------------------------------------------
    case("prune", "no-model", lambda x: ["model.path=null"], "model.path: set it"),
    case("prune", "missing-model", lambda x: [f"model.path={x.tmp / 'none'}"], "model.path: no such directory"),
    case("prune", "missing-data", lambda x: [f"data.path={x.tmp / 'none'}"], "data.path: no such file"),
    case("prune", "model-without-weights", lambda x: [f"model.path={x.broken(no_weights)}"],
         "model.path: ...has a config.json but no weights"),
    case("prune", "truncated-weights", lambda x: [f"model.path={x.broken(truncate_weights)}"],
         "model.path: ...model.safetensors is truncated"),
    case("prune", "config-is-a-list", lambda x: [f"model.path={x.broken(list_config)}"],
         "model.path: ...holds a JSON list, not an object"),
    case("prune", "corrupt-tokenizer-config", lambda x: [f"model.path={x.broken(garbage_tokenizer_config)}"],
         "data.tokenizer: ...tokenizer_config.json is not valid JSON"),
    case("prune", "num-samples", lambda x: ["prune.calibration.num_samples=0"],
         "prune.calibration.num_samples: the calibration set is empty"),
    case("prune", "micro-batch", lambda x: ["prune.calibration.micro_batch_size=0"],
         "prune.calibration.micro_batch_size: must be at least 1"),
    case("prune", "depth-eval-blocks", lambda x: ["prune.depth.eval_blocks=0"],
         "prune.depth.eval_blocks: must be at least 1"),
    case("prune", "ffn-above-teacher", lambda x: ["prune.export.ffn_hidden_size=500"],
         "prune.export.ffn_hidden_size: 500 must be between 1 and"),
    case("prune", "hidden-zero", lambda x: ["prune.export.hidden_size=0"], "prune.export.hidden_size: 0 must be"),
    case("prune", "seq-len-above-positions", lambda x: ["data.seq_len=100000"], "data.seq_len: 100000 exceeds"),
    case("prune", "output-is-a-file", lambda x: [f"output_dir={x.file()}"], "output_dir: ...is a file"),
    case("prune", "output-of-train", lambda x: [f"output_dir={x.train_run()}"],
         "output_dir: ...holds the finished output of another command"),
    case("prune", "unknown-key", lambda x: ["prune.export.hidden=32"], "prune.export.hidden", hydra=True),
    case("prune", "unknown-deepspeed", lambda x: ["deepspeed=zero9"], "deepspeed: unknown preset 'zero9'"),
    # -- minitron-distill --------------------------------------------------------------------
    case("distill", "offload-without-zero3", lambda x: ["teacher.offload=cpu"],
         "teacher.offload: cpu offloads ZeRO-3 partitions, but deepspeed.zero_optimization.stage is 0"),
    case("distill", "offload-unknown", lambda x: ["teacher.offload=nvme"], "teacher.offload: must be none or cpu"),
    case("distill", "shard-size", lambda x: ["export.max_shard_size=huge"], "export.max_shard_size: must be a size"),
    case("distill", "cache-top-k", lambda x: ["distill.teacher_cache=true", "distill.logits.top_k=100"],
         "distill.logits.top_k: 100 is more than the cache keeps (distill.teacher_cache_k=64)"),
    case("distill", "cache-dtype", lambda x: ["distill.teacher_cache=true", "distill.teacher_cache_dtype=int8"],
         "distill.teacher_cache_dtype: must be one of fp16, bf16, fp32"),
    case("distill", "cache-with-hidden", lambda x: ["distill=logits_hidden", "distill.teacher_cache=true"],
         "distill.teacher_cache: it keeps logits only"),
    case("train", "shard-size-zero", lambda x: ["export.max_shard_size=0"], "export.max_shard_size: must be a size"),
    case("distill", "missing-teacher", lambda x: [f"teacher.path={x.tmp / 'none'}"], "teacher.path: no such directory"),
    case("distill", "no-student", lambda x: ["student.path=null"], "student.path: set it"),
    case("distill", "student-is-a-corpus", lambda x: [f"student.path={x.corpus}"],
         "student.path: ...is not a Hugging Face checkpoint"),
    case("distill", "missing-tokenizer", lambda x: [f"data.tokenizer={x.tmp / 'none'}"],
         "data.tokenizer: no such directory"),
    case("distill", "tokenizer-is-a-corpus", lambda x: [f"data.tokenizer={x.corpus}"], "data.tokenizer: cannot load"),
    case("distill", "corrupt-teacher-config", lambda x: [f"teacher.path={x.broken(garbage_config)}"],
         "teacher.path: ...config.json is not valid JSON"),
    case("distill", "student-html-weights", lambda x: [f"student.path={x.broken(html_weights)}"],
         "student.path: ...is not a safetensors file"),
    case("distill", "student-corrupt-tokenizer", lambda x: [f"student.path={x.broken(garbage_tokenizer)}"],
         "student.path: ...tokenizer.json is not valid JSON"),
    case("distill", "temperature", lambda x: ["distill.logits.temperature=0"],
         "distill.logits.temperature: must be positive"),
    case("distill", "top-k", lambda x: ["distill.logits.top_k=-1"], "distill.logits.top_k: must be 0 (all tokens)"),
    case("distill", "beta", lambda x: ["distill.logits.beta=1.5"], "distill.logits.beta: must be in (0, 1)"),
    case("distill", "ce-weight", lambda x: ["distill.logits.ce_weight=-1"], "distill.logits.ce_weight: must be at"),
    case("distill", "hidden-weight", lambda x: ["distill.intermediate.weight=-1"],
         "distill.intermediate.weight: must be at least 0"),
    case("distill", "chunk-tokens", lambda x: ["distill.logits.chunk_tokens=0"],
         "distill.logits.chunk_tokens: must be at least 1"),
    case("distill", "grad-clip", lambda x: ["train.grad_clip=-1"], "train.grad_clip: must be at least 0"),
    case("distill", "output-of-train", lambda x: [f"output_dir={x.train_run()}"],
         "output_dir: ...holds the finished output of another command"),
    case("distill", "output-not-writable", lambda x: [f"output_dir={x.read_only_dir()}"],
         "output_dir: cannot create or write"),
    case("distill", "unknown-key", lambda x: ["distill.logits.temp=2"], "distill.logits.temp", hydra=True),
    case("distill", "unknown-loss", lambda x: ["distill=kl"], "distill: unknown preset 'kl'"),
    # -- minitron-eval -----------------------------------------------------------------------
    case("eval", "missing-model", lambda x: [f"model.path={x.tmp / 'none'}"], "model.path: no such directory"),
    case("eval", "missing-data", lambda x: [f"data.path={x.tmp / 'none'}"], "data.path: no such file"),
    case("eval", "truncated-weights", lambda x: [f"model.path={x.broken(truncate_weights)}"],
         "model.path: ...model.safetensors is truncated"),
    case("eval", "corrupt-config", lambda x: [f"model.path={x.broken(garbage_config)}"],
         "model.path: ...config.json is not valid JSON"),
    case("eval", "corrupt-tokenizer", lambda x: [f"model.path={x.broken(garbage_tokenizer)}"],
         "data.tokenizer: ...tokenizer.json is not valid JSON"),
    case("eval", "blocks", lambda x: ["eval.blocks=0"], "eval.blocks: must be at least 1"),
    case("eval", "seq-len-above-positions", lambda x: ["data.seq_len=100000"], "data.seq_len: 100000 exceeds"),
    case("eval", "micro-batch", lambda x: ["eval.micro_batch_size=0"], "eval.micro_batch_size: must be at least 1"),
    case("eval", "batch-size", lambda x: ["eval.batch_size=0"], "eval.batch_size: must be at least 1"),
    case("eval", "limit", lambda x: ["eval.limit=0"], "eval.limit: must be at least 1"),
    case("eval", "output-is-a-file", lambda x: [f"output_dir={x.file()}"], "output_dir: ...is a file"),
    case("eval", "output-is-a-checkpoint", lambda x: [f"output_dir={x.copy(x.teacher, 'ckpt')}"],
         "output_dir: ...holds a checkpoint"),
    case("eval", "output-of-prune", lambda x: [f"output_dir={x.prune_output()}"],
         "output_dir: ...holds the finished output of another command"),
    case("eval", "unknown-key", lambda x: ["eval.block=8"], "eval.block", hydra=True),
    # -- minitron-search ---------------------------------------------------------------------
    case("search", "missing-data", lambda x: [f"data.path={x.tmp / 'none'}"], "data.path: no such file"),
    case("search", "truncated-weights", lambda x: [f"model.path={x.broken(truncate_weights)}"],
         "model.path: ...model.safetensors is truncated"),
    case("search", "params", lambda x: ["search.params=-5"], "search.params: must be positive"),
    case("search", "memory-budget", lambda x: ["search.memory_gb=-1"], "search.memory_gb: must be positive"),
    case("search", "tolerance", lambda x: ["search.tolerance=1.5"], "search.tolerance: must be in [0, 1)"),
    case("search", "min-ratio", lambda x: ["search.space.hidden_size.min_ratio=1.5"],
         "search.space.hidden_size.min_ratio: must be in (0, 1]"),
    case("search", "step", lambda x: ["search.space.hidden_size.step=0"],
         "search.space.hidden_size.step: must be at least 1"),
    case("search", "choices", lambda x: ["search.space.hidden_size.choices=[0]"],
         "search.space.hidden_size.choices: [0] outside"),
    case("search", "kv-cache-length", lambda x: ["search.memory.seq_len=0"], "search.memory.seq_len: "),
    case("search", "max-candidates", lambda x: ["search.max_candidates=0"], "search.max_candidates: must be at least"),
    case("search", "eval-blocks", lambda x: ["search.eval_blocks=0"], "search.eval_blocks: must be at least 1"),
    case("search", "lr", lambda x: ["train.lr=-1"], "train.lr: must be positive"),
    case("search", "offload-without-zero3", lambda x: ["teacher.offload=cpu"],
         "teacher.offload: cpu offloads ZeRO-3 partitions, but deepspeed.zero_optimization.stage is 0"),
    case("search", "shard-size", lambda x: ["export.max_shard_size=huge"], "export.max_shard_size: must be a size"),
    case("search", "output-of-train", lambda x: [f"output_dir={x.train_run()}"],
         "output_dir: ...is not a minitron search"),
    case("search", "unknown-key", lambda x: ["search.budget=1e5"], "search.budget", hydra=True),
    case("search", "unknown-preset", lambda x: ["search=narrow"], "search: unknown preset 'narrow'"),
    # -- minitron-pipeline -------------------------------------------------------------------
    case("pipeline", "missing-model", lambda x: [f"model.path={x.tmp / 'none'}"], "model.path: no such directory"),
    case("pipeline", "missing-data", lambda x: [f"data.path={x.tmp / 'none'}"], "data.path: no such file"),
    case("pipeline", "truncated-weights", lambda x: [f"model.path={x.broken(truncate_weights)}"],
         "model.path: ...model.safetensors is truncated"),
    case("pipeline", "corrupt-tokenizer", lambda x: [f"model.path={x.broken(garbage_tokenizer)}"],
         "data.tokenizer: ...tokenizer.json is not valid JSON"),
    case("pipeline", "fraction", lambda x: ["targets=[{fraction: 1.5}]"], "targets[0].fraction: must be between"),
    case("pipeline", "params", lambda x: ["targets=[{params: -5}]"], "targets[0].params: must be positive"),
    case("pipeline", "search-steps", lambda x: ["search_steps=0"], "search_steps: must be at least 1"),
    case("pipeline", "pretrain-batch", lambda x: ["model.path=null", "model=tiny", "pretrain.micro_batch_size=0"],
         "pretrain.micro_batch_size: must be at least 1"),
    case("pipeline", "pretrain-beta1", lambda x: ["pretrain.beta1=1.5"], "pretrain.beta1: must be in [0, 1)"),
    case("pipeline", "correct-lr", lambda x: ["correct.lr=0"], "correct.lr: must be positive"),
    case("pipeline", "temperature", lambda x: ["distill.logits.temperature=-1"],
         "distill.logits.temperature: must be positive"),
    case("pipeline", "eval-blocks", lambda x: ["eval.blocks=0"], "eval.blocks: must be at least 1"),
    case("pipeline", "offload-without-zero3", lambda x: ["teacher.offload=cpu"],
         "teacher.offload: cpu offloads ZeRO-3 partitions, but deepspeed.zero_optimization.stage is 0"),
    case("pipeline", "offload-unknown", lambda x: ["teacher.offload=nvme"], "teacher.offload: must be none or cpu"),
    case("pipeline", "shard-size", lambda x: ["export.max_shard_size=0"], "export.max_shard_size: must be a size"),
    case("pipeline", "output-is-a-file", lambda x: [f"output_dir={x.file()}"], "output_dir: ...is a file"),
    case("pipeline", "output-of-train", lambda x: [f"output_dir={x.train_run()}"],
         "output_dir: ...is not a minitron pipeline"),
    case("pipeline", "unknown-stage", lambda x: ["stages=[importance,prune,distil]"], "stages: unknown stage 'distil'"),
    case("pipeline", "unknown-key", lambda x: ["stagez=[eval]"], "stagez", hydra=True),
]


# -- running an entry point in this process ---------------------------------------------------

def tree(root: Path) -> dict:
    """Every path under `root` with its size and time: what a run may not add to or change."""
    return {str(p.relative_to(root)): (p.lstat().st_size, p.lstat().st_mtime_ns) for p in sorted(root.rglob("*"))}


@pytest.fixture
def run_entry_point(monkeypatch, capfd):
    """run(command, argv) -> (exit status, stderr): the console script's main() in this process.
    The process group, the data and the models are replaced by stand-ins that raise Reached: a
    mistake must be found before any of them (and this process must stay a single-process one)."""
    from hydra.core.global_hydra import GlobalHydra

    from minitron import logs

    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(var, raising=False)

    def reached(what):
        def stand_in(*args, **kwargs):
            raise Reached(what)
        return stand_in

    for module, names in (("minitron.run", ["init_gang", "build_or_load"]),
                          ("minitron.train.job", ["build_for_engine"]),
                          ("minitron.prune.job", ["init_gang", "build_or_load", "build_model"]),
                          ("minitron.distill.job", ["build_for_engine"]),
                          ("minitron.eval.job", ["init_gang", "build_or_load", "build_model"]),
                          ("minitron.search.job", ["init_gang", "build_or_load", "scoring_teacher"]),
                          ("minitron.pipeline.job", ["init_gang", "build_or_load", "build_model"])):
        for name in names:
            monkeypatch.setattr(f"{module}.{name}", reached(f"{module}.{name}"))

    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level

    def run(command: str, argv: List[str]):
        main = importlib.import_module(f"minitron.cli.{command}").main
        monkeypatch.setattr(sys, "argv", [f"minitron-{command}", *map(str, argv)])
        capfd.readouterr()
        try:
            main()
            status = 0
        except SystemExit as e:
            status = e.code
        finally:
            GlobalHydra.instance().clear()
            logs.teardown()  # the job's log file and minitron's terminal handler and level
            # Hydra configured logging for the job: put the test session's back.
            for handler in root.handlers:
                if handler not in handlers:
                    handler.close()
            root.handlers[:] = handlers
            root.setLevel(level)
        return status, capfd.readouterr().err

    return run


@pytest.fixture(scope="module")
def pruned(tmp_path_factory, tiny_teacher, corpus_dir) -> Path:
    """A finished minitron-prune output of the tiny teacher (also the distillation's student):
    the prune job run here on a single-process gang, not in a process group of its own."""
    from minitron.distributed.gang import LocalGang
    from minitron.prune.job import run_prune_job

    @dataclasses.dataclass
    class CpuGang(LocalGang):
        device: torch.device = torch.device("cpu")

    out = tmp_path_factory.mktemp("bad_input_table") / "pruned"
    cfg = compose_job("prune", f"model.path={tiny_teacher}", f"data.path={corpus_dir}", "data.seq_len=64",
                      f"output_dir={out}", "prune.calibration.num_samples=8", "prune.calibration.micro_batch_size=4",
                      "prune.export.ffn_hidden_size=96", "prune.export.num_attention_heads=2", "logger=none")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("minitron.prune.job.init_gang", CpuGang)
        run_prune_job(cfg, OmegaConf.to_yaml(OmegaConf.structured(cfg)))
    assert (out / "summary.json").is_file() and (out / "pruning.json").is_file()
    return out


@pytest.fixture
def inputs(tmp_path, tiny_teacher, corpus_dir, pruned, monkeypatch) -> Inputs:
    work = tmp_path / "cwd"  # Hydra's working directory: a run may not leave files there either
    work.mkdir()
    monkeypatch.chdir(work)
    return Inputs(teacher=tiny_teacher, corpus=corpus_dir, pruned=pruned, tmp=tmp_path)


@pytest.mark.parametrize("bad", CASES)
def test_bad_input_is_one_line_before_any_work_and_leaves_nothing(bad, inputs, run_entry_point):
    argv = [*base_args(bad.command, inputs), *bad.overrides(inputs)]
    before = tree(inputs.tmp)
    teacher_before = tree(inputs.teacher.parent)

    status, stderr = run_entry_point(bad.command, argv)

    assert "Traceback" not in stderr, stderr[-3000:]
    if bad.hydra:
        assert status not in (0, None) and bad.expect in stderr, (status, stderr[-3000:])
    else:
        lines = [line for line in stderr.splitlines() if line.startswith("error:")]
        assert status == 2 and len(lines) == 1, (status, stderr[-3000:])
        assert bad.matches(lines[0]), lines[0]
    after = tree(inputs.tmp)
    assert after == before, {"added": sorted(set(after) - set(before)), "removed": sorted(set(before) - set(after)),
                             "changed": sorted(k for k in set(after) & set(before) if after[k] != before[k])}
    assert tree(inputs.teacher.parent) == teacher_before


@pytest.mark.parametrize("command, key", [("train", "train"), ("distill", "train"), ("search", "train"),
                                          ("pipeline", "pretrain")])
def test_a_world_size_that_does_not_split_the_batch_is_one_line_naming_the_key(command, key, inputs,
                                                                             run_entry_point, monkeypatch):
    """As launched by torchrun with 3 processes (rank 0's view): the batch keys left at their
    defaults (8 sequences, the micro batch derived) do not split over 3, found before any work."""
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    argv = [a for a in base_args(command, inputs) if "batch_size=" not in a or "calibration" in a]
    before = tree(inputs.tmp)

    status, stderr = run_entry_point(command, argv)

    lines = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert status == 2 and lines == [f"error: {key}.global_batch_size: 8 sequences do not split evenly over 3 "
                                     "processes; make it a multiple of 3"], (status, stderr[-3000:])
    assert tree(inputs.tmp) == before


@pytest.mark.parametrize("command", COMMANDS)
def test_the_base_arguments_pass_the_checks(command, inputs):
    """The arguments every case starts from pass every check: a case fails on its own mistake."""
    from minitron.distill.job import check_distill_inputs
    from minitron.eval.job import check_eval_inputs
    from minitron.pipeline.plan import plan_pipeline
    from minitron.prune.job import check_prune_inputs
    from minitron.search.job import check_run_inputs, plan_search
    from minitron.train.job import check_inputs

    cfg = compose_job(command, *base_args(command, inputs))
    {"train": lambda: check_inputs(cfg, world_size=1),
     "prune": lambda: check_prune_inputs(cfg),
     "distill": lambda: check_distill_inputs(cfg, world_size=1),
     "eval": lambda: check_eval_inputs(cfg),
     "search": lambda: check_run_inputs(cfg, plan_search(cfg)),
     "pipeline": lambda: plan_pipeline(cfg)}[command]()


def test_the_table_covers_every_command():
    counts = {command: sum(p.values[0].command == command for p in CASES) for command in COMMANDS}
    assert sum(counts.values()) >= 40 and min(counts.values()) >= 5, counts
