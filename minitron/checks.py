"""Checks of the shared config sections that need no data or model (cheap), so every entry point
runs them before any expensive work; each raises a ConfigError naming the key to fix."""
import os
import re
from pathlib import Path

from minitron.config import ConfigError


def check_train_config(cfg, world_size: int) -> None:
    """Checks that need neither data nor model weights; raise ConfigError naming the key.
    `cfg` is any job config with train, data, deepspeed, logger and resume (train or distill)."""
    t = cfg.train
    if t.max_steps < 1:
        raise ConfigError(f"train.max_steps: must be at least 1, got {t.max_steps}")
    if t.schedule_steps is not None and t.schedule_steps < t.max_steps:
        raise ConfigError(f"train.schedule_steps: {t.schedule_steps} is below train.max_steps={t.max_steps}; "
                          "unset it, or make it at least max_steps")
    if t.global_batch_size < 1:
        raise ConfigError(f"train.global_batch_size: must be at least 1, got {t.global_batch_size}")
    if t.micro_batch_size is None:
        t.micro_batch_size = auto_micro_batch_size(t.global_batch_size, world_size)
    if t.micro_batch_size < 1:
        raise ConfigError(f"train.micro_batch_size: must be at least 1, got {t.micro_batch_size}")
    per_step = t.micro_batch_size * world_size
    if t.global_batch_size < per_step or t.global_batch_size % per_step:
        raise ConfigError(
            f"train.global_batch_size: {t.global_batch_size} is not a multiple of "
            f"train.micro_batch_size ({t.micro_batch_size}) x {world_size} process(es) = {per_step}")
    if not t.lr > 0:
        raise ConfigError(f"train.lr: must be positive, got {t.lr}")
    if not 0 <= t.min_lr_ratio <= 1:
        raise ConfigError(f"train.min_lr_ratio: must be in [0, 1], got {t.min_lr_ratio}")
    for key in ("beta1", "beta2"):
        if not 0 <= getattr(t, key) < 1:
            raise ConfigError(f"train.{key}: must be in [0, 1), got {getattr(t, key)}")
    for key in ("warmup_steps", "weight_decay", "grad_clip", "eval_every", "save_every", "keep_checkpoints"):
        if getattr(t, key) < 0:
            raise ConfigError(f"train.{key}: must be at least 0, got {getattr(t, key)}")
    if t.eval_blocks < 1 or t.log_every < 1:
        key = "eval_blocks" if t.eval_blocks < 1 else "log_every"
        raise ConfigError(f"train.{key}: must be at least 1, got {getattr(t, key)}")
    check_output_dir(cfg.output_dir)
    if t.precision not in ("fp32", "bf16"):
        raise ConfigError(f"train.precision: must be fp32 or bf16, got {t.precision!r}")
    if cfg.resume not in ("auto", "never"):
        raise ConfigError(f"resume: must be auto or never, got {cfg.resume!r}")
    if cfg.logger.backend not in ("wandb", "none"):
        raise ConfigError(f"logger: must be wandb or none, got {cfg.logger.backend!r}")
    stage = cfg.deepspeed.zero_optimization.get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"deepspeed.zero_optimization.stage: must be 0-3, got {stage}")
    if hasattr(cfg, "export"):
        parse_size(cfg.export.max_shard_size, "export.max_shard_size")
    offload = getattr(getattr(cfg, "teacher", None), "offload", "none")
    if offload not in ("none", "cpu"):
        raise ConfigError(f"teacher.offload: must be none or cpu, got {offload!r}")
    if offload == "cpu" and stage != 3:
        raise ConfigError(f"teacher.offload: cpu offloads ZeRO-3 partitions, but deepspeed.zero_optimization.stage "
                          f"is {stage}; use deepspeed=zero3 or teacher.offload=none")


SIZE_UNITS = {None: 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text, key: str) -> int:
    """'5GB', '500MB', '2GiB' or a number of bytes (save_pretrained's max_shard_size) in bytes."""
    match = re.fullmatch(r"([0-9]*\.?[0-9]+)\s*([KMG]I?B|B)?", str(text).strip().upper())
    size = int(float(match.group(1)) * SIZE_UNITS[match.group(2)]) if match else 0
    if size < 1:
        raise ConfigError(f"{key}: must be a size such as 5GB, 500MB or a number of bytes, got {text!r}")
    return size


AUTO_MICRO_BATCH_MAX = 8
"""The most sequences per forward pass an unset train.micro_batch_size picks (the old default)."""


def auto_micro_batch_size(global_batch_size: int, world_size: int) -> int:
    """The micro batch for an unset train.micro_batch_size: each rank's share of the global batch,
    or its largest divisor up to AUTO_MICRO_BATCH_MAX, the rest by accumulation (DeepSpeed likewise
    derives the third of its batch keys from the other two)."""
    if global_batch_size % world_size:
        raise ConfigError(f"train.global_batch_size: {global_batch_size} sequences do not split evenly over "
                          f"{world_size} processes; make it a multiple of {world_size}")
    per_rank = global_batch_size // world_size
    return max(d for d in range(1, min(per_rank, AUTO_MICRO_BATCH_MAX) + 1) if per_rank % d == 0)


def check_output_dir(output_dir: str) -> None:
    """An output_dir must be a directory that exists or can be made: found now, not after the run."""
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output_dir: {out} is a file; choose a directory")
    parent = next((p for p in (out, *out.parents) if p.exists()), Path("."))
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"output_dir: cannot create or write {out} ({parent} is not a writable directory)")
