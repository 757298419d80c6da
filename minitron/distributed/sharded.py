"""Models that no rank ever holds whole (ZeRO-3): created partitioned and filled from a checkpoint
one tensor at a time, and exported by gathering one parameter at a time into safetensors shards
that rank 0 writes as it goes.

Both move a single parameter's full value through each rank at once, so the transient cost is the
largest tensor (usually the embedding), not the model.
"""
import ctypes
import importlib
import json
import logging
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch
import torch.distributed as dist

from minitron.logs import captured_output

with captured_output():
    import deepspeed

log = logging.getLogger(__name__)


def _no_shared_memory_op_alone() -> None:
    """DeepSpeed builds its shared-memory collective op for the CPU whenever its comm starts
    (deepspeed/comm/torch.py), a 60 s compile whenever the torch-extensions cache was last written
    by another environment. One process has no peers to share memory with: skip it there."""
    from minitron.distributed.gang import world_size_from_env

    if torch.cuda.is_available() or world_size_from_env() != 1:
        return
    try:  # by its full name: `from deepspeed.comm import torch` is the torch package it re-exports
        ds_torch_comm = importlib.import_module("deepspeed.comm.torch")
    except ImportError:
        return
    if hasattr(ds_torch_comm, "build_shm_op"):
        ds_torch_comm.build_shm_op = lambda: None


_no_shared_memory_op_alone()


def zero3(ds_config: dict) -> bool:
    return ds_config["zero_optimization"].get("stage", 0) == 3


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def build_for_engine(cfg, hf_config, seed: int, dtype: torch.dtype, ds_config: dict, key: str) -> torch.nn.Module:
    """models.build.build_model's model; under ZeRO-3 a checkpoint's is instead created partitioned
    and loaded tensor by tensor (load_partitioned), so that no rank holds it whole."""
    from minitron.models.build import build_model

    if zero3(ds_config) and cfg.path and cfg.init == "pretrained":
        model = load_partitioned(cfg, hf_config, dtype, ds_config, key)
        if model is not None:
            return model
    return build_model(cfg, hf_config, seed=seed, dtype=dtype)


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number (malloc.h)


def return_freed_memory_to_the_os() -> None:
    """On the CPU, ZeRO-3 allocates and frees a full parameter every time it gathers one (at
    creation, loading, each forward). glibc serves such blocks (up to 32 MB once its adaptive
    threshold has risen) from its heap, whose freed holes between the partitions that stay are
    not returned: measured, a 300M-parameter teacher left each of 2 ranks holding 1.6x its share.
    Fixing the threshold at 1 MB makes every larger block a mapping of its own, unmapped when
    freed. A no-op where the C library has no mallopt (macOS)."""
    try:
        ctypes.CDLL(None).mallopt(M_MMAP_THRESHOLD, 1 << 20)
    except (AttributeError, OSError):
        pass


def load_partitioned(cfg, hf_config, dtype: torch.dtype, ds_config: dict, key: str) -> Optional[torch.nn.Module]:
    """The checkpoint at cfg.path, created under deepspeed.zero.Init (each parameter partitioned
    over the ranks as its module is constructed) and filled from its safetensors files one tensor
    at a time. None, with a warning, for a checkpoint this cannot read tensor by tensor (.bin
    files, code of its own, tensors named otherwise than the model's parameters, as transformers
    converts on load for some mixtures of experts): that one is loaded whole, then partitioned."""
    from transformers.initialization import no_init_weights
    from transformers.integrations.deepspeed import prevent_arange_dtype_change

    from minitron.config import ConfigError
    from minitron.models import build

    path = build.local_checkpoint(cfg.path, key)
    why = build.why_not_tensor_by_tensor(path, hf_config)
    if why:
        log.warning("%s.path: %s is loaded whole on each rank, then partitioned (%s)", key, path, why)
        return None
    model_class = build.causal_lm_class(hf_config)  # imported before zero.Init patches tensor creation
    if not torch.cuda.is_available():
        return_freed_memory_to_the_os()
    attn = build.choose_attn_implementation(cfg.attn_implementation)
    with captured_output():
        # zero.Init reads the world size from DeepSpeed's comm, which only an engine would otherwise
        # start; it joins the process group init_gang made.
        deepspeed.init_distributed(dist_backend=dist.get_backend() if dist.is_initialized() else None)
    # No random init (every weight is about to be read), and zero.Init kept from casting the
    # torch.arange behind RoPE's frequencies to a bf16 run's dtype (transformers' own recipe).
    # zero.Init's dtype comes from the config's precision section: its dtype= argument loses to
    # an operator-precedence slip in DeepSpeed 0.19 on a CPU without fp16 support (bf16 instead).
    init_config = {**ds_config, "bf16": {"enabled": dtype == torch.bfloat16},
                   "fp16": {"enabled": dtype == torch.float16}}
    with captured_output(), no_init_weights(), prevent_arange_dtype_change(), \
            deepspeed.zero.Init(config_dict_or_path=init_config):
        model = model_class._from_config(hf_config, dtype=dtype, attn_implementation=attn)
    missing = load_into_partitions(model, build.checkpoint_tensors(path))
    if missing:
        raise ConfigError(f"{key}.path: {path} holds no tensor for {len(missing)} parameter(s) "
                          f"({', '.join(missing[:3])}); re-export it")
    build.attach_generation_config(model, path)
    model.eval()  # as from_pretrained returns it
    return model


def load_into_partitions(model: torch.nn.Module,
                         tensors: Iterator[Tuple[str, Callable[[], torch.Tensor]]]) -> List[str]:
    """Copy a checkpoint's tensors, (name, read) one at a time, into a partitioned model: each
    parameter is gathered, rank 0 reads the tensor and writes it, and DeepSpeed re-partitions the
    new value to every rank. Returns the names of parameters the checkpoint did not hold (tied
    aliases of loaded ones excluded)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    buffers = dict(model.named_buffers())
    loaded = set()
    for name, read in tensors:
        if name in buffers:  # a persistent buffer: never partitioned, every rank reads it
            buffers[name].copy_(read())
            continue
        param = params[name]
        with deepspeed.zero.GatheredParameters([param], modifier_rank=0), torch.no_grad():
            if _rank() == 0:
                param.data.copy_(read())
        loaded.add(id(param))
    return [name for name, p in params.items() if id(p) not in loaded]


def export_configs(model: torch.nn.Module, out_dir: Path) -> None:
    """config.json and generation_config.json as save_pretrained writes them, which first records
    the weights' dtype and the model's class (`architectures`) in the config."""
    model.config.dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(out_dir)
    if model.can_generate() and model.generation_config is not None:
        model.generation_config.save_pretrained(out_dir)


def export_streamed(model: torch.nn.Module, out_dir: Path, max_shard_bytes: int) -> None:
    """Every rank calls this; rank 0 writes `model`'s parameters and persistent buffers into
    safetensors files under `out_dir` as save_pretrained names them (tied parameters once, a
    `model.safetensors.index.json` when there is more than one shard of at most
    `max_shard_bytes`), gathering one parameter at a time."""
    from safetensors.torch import save_file

    from minitron.models.build import SAFETENSORS_INDEX

    entries = _exported_tensors(model)
    shards = _plan_shards([(name, _numel(t) * t.element_size()) for name, t in entries], max_shard_bytes)
    files = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    tensors = dict(entries)
    weight_map: Dict[str, str] = {}
    for names, file in zip(shards, files):
        shard: Dict[str, torch.Tensor] = {}
        for name in names:
            with _full(tensors[name]):
                if _rank() == 0:
                    shard[name] = tensors[name].detach().to("cpu", copy=True).contiguous()
            weight_map[name] = file
        if _rank() == 0:
            save_file(shard, str(out_dir / file), metadata={"format": "pt"})
        del shard
    if _rank() == 0 and len(files) > 1:
        total = sum(_numel(t) * t.element_size() for _, t in entries)
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out_dir / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def _exported_tensors(model: torch.nn.Module) -> List[Tuple[str, torch.Tensor]]:
    """(name, tensor) as the model's state_dict names them, each shared tensor once (the tied
    lm_head goes, as save_pretrained drops it)."""
    persistent = set(model.state_dict().keys())
    seen, out = set(), []
    for name, tensor in [*model.named_parameters(remove_duplicate=False), *model.named_buffers()]:
        if name not in persistent or id(tensor) in seen:
            continue
        seen.add(id(tensor))
        out.append((name, tensor))
    return out


def _numel(tensor: torch.Tensor) -> int:
    return getattr(tensor, "ds_numel", tensor.numel())


def _full(tensor: torch.Tensor):
    if hasattr(tensor, "ds_id"):
        return deepspeed.zero.GatheredParameters([tensor], modifier_rank=None)
    return torch.no_grad()


def _plan_shards(sizes: List[Tuple[str, int]], max_shard_bytes: int) -> List[List[str]]:
    """Consecutive names grouped so that no group exceeds `max_shard_bytes` (a tensor larger than
    that is a group of its own). save_pretrained may group them otherwise (it puts an oversized
    tensor in a file of its own and goes on filling the open one); both load the same."""
    shards: List[List[str]] = [[]]
    size = 0
    for name, nbytes in sizes:
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards
