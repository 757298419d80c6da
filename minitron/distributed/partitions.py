"""How much of a model this rank holds: all of it, or its ZeRO-3 partitions (read from the
attributes DeepSpeed puts on a partitioned parameter, so nothing here imports DeepSpeed unless a
model is partitioned)."""
import contextlib

import torch


def full_shape(param: torch.nn.Parameter) -> torch.Size:
    """A parameter's shape; ZeRO-3 leaves a partitioned one an empty 1-d tensor and keeps its
    shape as ds_shape."""
    return getattr(param, "ds_shape", param.shape)


def is_partitioned(model: torch.nn.Module) -> bool:
    """Whether ZeRO-3 partitions `model`: its forward passes then gather parameters collectively,
    so every rank must run as many."""
    return any(hasattr(p, "ds_id") for p in model.parameters())


def local_numel(param: torch.nn.Parameter) -> int:
    """Elements this rank holds for `param`: its ZeRO-3 partition (plus the whole of it when
    ZeRO-3 keeps a small parameter resident), else all of it."""
    if not hasattr(param, "ds_id"):
        return param.numel()
    return param.ds_tensor.numel() + (param.ds_numel if getattr(param, "ds_persist", False) else 0)


def full_values(*params: torch.nn.Parameter):
    """Context in which `params` hold their full values: gathered if ZeRO-3 partitioned them
    (DeepSpeed is imported only then), else as they are."""
    if not any(hasattr(p, "ds_id") for p in params):
        return contextlib.nullcontext()
    from minitron.distributed.engine import full_parameters

    return full_parameters(params)


def release(model: torch.nn.Module) -> None:
    """Let a ZeRO-3-partitioned model be freed once the caller drops it. DeepSpeed puts each
    engine's top module on a module-level stack (parameter_offload.FWD_MODULE_STACK) and never
    takes it off, so without this a frozen teacher's partitions stay allocated for the rest of
    the process (measured: all of a 119M teacher's, while pruning built the student beside it)."""
    if not is_partitioned(model):
        return
    from deepspeed.runtime.zero import parameter_offload

    stack = getattr(parameter_offload, "FWD_MODULE_STACK", None)
    if isinstance(stack, list):
        stack[:] = [m for m in stack if m is not model]


def teacher_memory(model, gang) -> dict:
    """A frozen model's parameters in total, and the parameters and bytes each rank holds (about
    1/world each under ZeRO-3). Collective: every rank calls it."""
    per_rank = torch.zeros(gang.world_size, dtype=torch.float64)
    per_rank[gang.rank] = float(sum(local_numel(p) * p.element_size() for p in model.parameters()))
    per_rank = gang.all_reduce_sum(per_rank)
    counts = torch.zeros(gang.world_size, dtype=torch.float64)
    counts[gang.rank] = float(sum(local_numel(p) for p in model.parameters()))
    counts = gang.all_reduce_sum(counts)
    total = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    return {"teacher_params": int(total), "teacher_params_per_rank": [int(c) for c in counts.tolist()],
            "teacher_bytes_per_rank": [int(b) for b in per_rank.tolist()]}
