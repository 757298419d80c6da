"""DeepSpeed engines: the config derived from `train` + `deepspeed`, and engine construction."""
import contextlib
from typing import Any, Dict

import deepspeed
import torch

from minitron.config import DeepSpeedConfig, TrainConfig


def deepspeed_config(train: TrainConfig, ds: DeepSpeedConfig, world_size: int) -> Dict[str, Any]:
    """Batch sizes, precision and clipping come from `train`, so DeepSpeed can never disagree with
    the sampler about what a step is; `deepspeed.extra` may add or override any other key."""
    config = {
        "train_batch_size": train.global_batch_size,
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": train.global_batch_size // (train.micro_batch_size * world_size),
        "gradient_clipping": train.grad_clip,
        "zero_optimization": dict(ds.zero_optimization),
        "bf16": {"enabled": train.precision == "bf16"},
        # minitron passes a torch.optim.AdamW instance (nothing to JIT-compile); ZeRO accepts it.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    config.update(ds.extra)
    return config


def initialize(model: torch.nn.Module, optimizer, lr_scheduler, config: Dict[str, Any]):
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                           lr_scheduler=lr_scheduler, config=config)
    _record_fp32_clip_norm(engine)
    return engine


def _record_fp32_clip_norm(engine) -> None:
    """Without ZeRO or mixed precision DeepSpeed clips through a helper that drops the norm it
    computed, so `get_global_grad_norm()` would be None; keep it like the other stages do."""
    from deepspeed.runtime.utils import clip_grad_norm_

    def clip_and_record():
        engine._global_grad_norm = clip_grad_norm_(parameters=engine.module.parameters(),
                                                   max_norm=engine.gradient_clipping(), mpu=engine.mpu)

    engine.clip_fp32_gradients = clip_and_record


def gathered_parameters(engine):
    """Context in which every parameter holds its full value (ZeRO-3 partitions them)."""
    if engine.zero_optimization_stage() == 3:
        return deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None)
    return contextlib.nullcontext()
