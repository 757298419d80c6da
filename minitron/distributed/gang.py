"""The "gang": the few collectives the rest of minitron needs, behind one small object.

`LocalGang` is the single-process implementation (tests use it directly); `TorchGang` wraps an
initialised torch.distributed process group. Code outside minitron/distributed/ only sees these methods.
"""
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class LocalGang:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def broadcast_object(self, obj):
        return obj

    def barrier(self) -> None:
        pass


@dataclass
class TorchGang:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        out = tensor.detach().to(self.device, copy=True)
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out.cpu()

    def broadcast_object(self, obj):
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        dist.barrier()


def launcher_env() -> dict:
    """RANK / WORLD_SIZE / LOCAL_RANK / MASTER_* as torch.distributed wants them, from whichever
    launcher started us: torchrun and deepspeed set them, SLURM's srun sets SLURM_*, and a plain
    `python`/console-script run is a world of one."""
    env = dict(os.environ)
    if "RANK" not in env and "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        env["RANK"] = env["SLURM_PROCID"]
        env["WORLD_SIZE"] = env["SLURM_NTASKS"]
        env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
        env.setdefault("MASTER_ADDR", env.get("SLURM_LAUNCH_NODE_IPADDR", "127.0.0.1"))
        env.setdefault("MASTER_PORT", "29500")
    if "RANK" not in env:
        # Port 0: the store takes any free port itself. Choosing one here and binding it later
        # races with other processes (seen as EADDRINUSE when tests start runs back to back).
        env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="0")
    return {k: env[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}


def world_size_from_env() -> int:
    return int(launcher_env()["WORLD_SIZE"])


def init_gang() -> TorchGang:
    """Initialise the process group (gloo on CPU, nccl on GPU), once. Plain torch.distributed, so
    that commands without a DeepSpeed engine (prune, eval) never import DeepSpeed; an engine made
    later joins this group."""
    os.environ.update(launcher_env())
    local_rank = int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", init_method="env://")
    return TorchGang(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank,
                     device=device)
