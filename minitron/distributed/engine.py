"""DeepSpeed engines: the config derived from `train` + `deepspeed`, and engine construction."""
import contextlib
import copy
from typing import Any, Dict

import torch

from minitron.config import DeepSpeedConfig, TrainConfig
from minitron.distributed.sharded import build_for_engine, zero3
from minitron.logs import captured_output

with captured_output():  # its import prints which accelerator it picked, bypassing logging
    import deepspeed


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
    with captured_output():  # the first start on a CPU compiles DeepSpeed's comm op; config dumps
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                               lr_scheduler=lr_scheduler, config=config)
    _record_fp32_clip_norm(engine)
    if engine.zero_optimization_stage() == 0 and engine.dp_world_size == 1:
        # Nothing to average over one process, yet DeepSpeed would copy every gradient into flat
        # buckets and back each step: time, and a copy of the gradients on top of the step's peak.
        engine.enable_backward_allreduce = False
    return engine


def _record_fp32_clip_norm(engine) -> None:
    """Without ZeRO or mixed precision DeepSpeed clips through a helper that drops the norm it
    computed, so `get_global_grad_norm()` would be None; keep it like the other stages do."""
    from deepspeed.runtime.utils import clip_grad_norm_

    def clip_and_record():
        engine._global_grad_norm = clip_grad_norm_(parameters=engine.module.parameters(),
                                                   max_norm=engine.gradient_clipping(), mpu=engine.mpu)

    engine.clip_fp32_gradients = clip_and_record


def full_parameters(params):
    """Context in which `params` hold their full values; a no-op for parameters ZeRO-3 does not
    partition."""
    partitioned = [p for p in params if hasattr(p, "ds_id")]
    if not partitioned:
        return contextlib.nullcontext()
    return deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None)


def frozen_config(train_config: Dict[str, Any], offload: str = "none") -> Dict[str, Any]:
    """The DeepSpeed config of a frozen model next to a trained one (train_config's): its batch,
    precision and ZeRO keys, no optimizer; with offload=cpu its ZeRO-3 partitions live in CPU
    memory (`offload_param`) and each module is fetched to the device for its forward pass."""
    keep = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
            "zero_optimization", "bf16", "steps_per_print", "wall_clock_breakdown")
    config = {k: copy.deepcopy(train_config[k]) for k in keep if k in train_config}
    zero = config["zero_optimization"]
    # A frozen forward-only model has no reuse worth keeping a gathered layer for (DeepSpeed keeps
    # one whose next use is within 1e9 parameters, more than most teachers hold).
    zero.setdefault("stage3_max_reuse_distance", 0)
    if not torch.cuda.is_available():
        # Prefetching overlaps gathering the next layers with this one's compute on a GPU; over
        # gloo there is nothing to overlap, and measured on 2 CPU ranks it gathered a 300M teacher
        # whole during its forward pass from the second step on.
        zero.setdefault("stage3_prefetch_bucket_size", 0)
    if offload == "cpu":
        config["zero_optimization"]["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    return config


def frozen_model(cfg, hf_config, seed: int, dtype: torch.dtype, ds: DeepSpeedConfig, world_size: int,
                 device: torch.device, key: str = "model") -> torch.nn.Module:
    """A model for forward passes only, outside any training (pruning's calibration): with
    deepspeed.zero_optimization.stage=3 created partitioned, loaded tensor by tensor and run by a
    DeepSpeed engine without optimizer, so each rank holds 1/world of it and gathers one layer at
    a time; otherwise whole on every rank."""

    frozen = frozen_config({"train_batch_size": world_size, "train_micro_batch_size_per_gpu": 1,
                            "gradient_accumulation_steps": 1, "zero_optimization": dict(ds.zero_optimization),
                            "bf16": {"enabled": dtype == torch.bfloat16}, **ds.extra})
    model = build_for_engine(cfg, hf_config, seed, dtype, frozen, key).eval().requires_grad_(False)
    return place_frozen(model, frozen, device)[1]


def place_frozen(model: torch.nn.Module, frozen: Dict[str, Any], device: torch.device):
    """(run, model) for a frozen model: under ZeRO-3 (`frozen`, from frozen_config) it is
    partitioned by a DeepSpeed engine of its own with no optimizer (DeepSpeed-Chat's
    reference-model recipe), so each rank holds 1/world of it; otherwise it is replicated. `run`
    does a forward pass."""
    if not zero3(frozen):
        model = model.to(device)
        return model, model
    with captured_output():
        engine, _, _, _ = deepspeed.initialize(model=model, config=frozen)
    return engine, engine.module
