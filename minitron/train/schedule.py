"""AdamW with linear warmup then cosine decay."""
import math

import torch

from minitron.config import TrainConfig
from minitron.distributed.partitions import full_shape


def lr_multiplier(step: int, warmup_steps: int, max_steps: int, min_lr_ratio: float) -> float:
    """Multiplier of the peak lr for optimizer step `step` (0-based)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def schedule_length(cfg: TrainConfig) -> int:
    return cfg.schedule_steps or cfg.max_steps


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig):
    """Weight decay on matrices only: norms and biases are not decayed (the usual LLM recipe)."""
    params = [p for p in model.parameters() if p.requires_grad]
    matrix = [len(full_shape(p)) >= 2 for p in params]  # a partitioned parameter's own shape is empty
    groups = [
        {"params": [p for p, m in zip(params, matrix) if m], "weight_decay": cfg.weight_decay},
        {"params": [p for p, m in zip(params, matrix) if not m], "weight_decay": 0.0},
    ]
    # PyTorch's fused kernel: one pass over each parameter and no temporaries. Elsewhere a CPU
    # steps parameter by parameter through temporaries of each one's size: 10x slower on a 128k
    # vocabulary's embedding, and those temporaries sit on top of the step's peak.
    fused = all(p.device.type in ("cpu", "cuda") and p.dtype.is_floating_point for p in params)
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=fused)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_multiplier(s, cfg.warmup_steps, schedule_length(cfg), cfg.min_lr_ratio))
    return optimizer, scheduler
