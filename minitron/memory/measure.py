"""What this process's memory held: its device's peak (GPU: allocated tensors; CPU: the resident
set), and the same figure at a mark taken before the models are built, so that a run's peak minus
its mark is what the models, their optimizer and their activations took."""
import resource
import sys
from typing import Dict, List

import torch


def used_bytes(device: torch.device) -> int:
    """Memory in use now: allocated tensors on a GPU, the resident set on the CPU."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()
    except OSError:  # not Linux: the peak is the best figure there is
        return peak_bytes(device)


def peak_bytes(device: torch.device) -> int:
    """The most used since the last reset_peak (or since the process started)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    try:  # the resident set's high-water mark (VmHWM), which clear_refs resets
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        pass
    # Elsewhere getrusage, whose peak on Linux would include the parent's at the fork before exec.
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


def reset_peak(device: torch.device) -> int:
    """The mark before the models: memory in use now. The peak counter restarts here (on Linux
    by clear_refs, which resets the resident set's high-water mark), so the data preparation
    before it does not count."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:  # not Linux: the peak is the process's whole life's
            pass
    return used_bytes(device)


def per_rank(gang, mark: int, device: torch.device) -> Dict[str, List[int]]:
    """Every rank's mark and peak (collective: every rank calls it)."""
    values = torch.zeros(2, gang.world_size, dtype=torch.float64)
    values[0, gang.rank], values[1, gang.rank] = float(mark), float(peak_bytes(device))
    values = gang.all_reduce_sum(values)
    return {"device": device.type, "before_models_bytes": [int(v) for v in values[0].tolist()],
            "peak_bytes": [int(v) for v in values[1].tolist()]}
