"""Checkpoints through the DeepSpeed engine (model, optimizer, scheduler) plus what DeepSpeed does
not keep: the step (which fixes the data position, see data/sampler.py) and each rank's RNG."""
import logging
import os
import random
import shutil
from pathlib import Path
from typing import Optional

import numpy as np
import torch

log = logging.getLogger(__name__)


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def save(engine, root: Path, step: int, rank: int, keep: int) -> None:
    tag_dir = root / tag_for(step)
    tag_dir.mkdir(parents=True, exist_ok=True)
    # `latest` is written last, atomically, once every rank has finished (save_checkpoint ends in a
    # barrier): a kill at any moment leaves it naming a complete checkpoint. DeepSpeed's own
    # `latest` is opened before it is written, and a kill in between left an empty file.
    torch.save(_rng_state(), tag_dir / f"rng_rank{rank}.pt")
    engine.save_checkpoint(str(root), tag=tag_for(step), client_state={"step": step}, save_latest=False)
    if rank == 0:
        tmp = root / ".latest.tmp"
        tmp.write_text(tag_for(step))
        os.replace(tmp, root / "latest")
    if rank == 0 and keep > 0:
        for old in sorted(root.glob("step_*"))[:-keep]:
            shutil.rmtree(old, ignore_errors=True)


def resume(engine, root: Path, mode: str, rank: int) -> int:
    """The step to start from: the newest checkpoint's with resume=auto (restored into the
    engine), else 0."""
    step = load_latest(engine, root, rank) if mode == "auto" else None
    if step:
        log.info("resumed from %s at step %d", root, step)
    return step or 0


def load_latest(engine, root: Path, rank: int) -> Optional[int]:
    """Restore the newest checkpoint under `root`; return its step, or None if there is none."""
    if not (root / "latest").is_file():
        return None
    tag = (root / "latest").read_text().strip()
    if not tag:
        return None
    path, client_state = engine.load_checkpoint(str(root), tag=tag)
    if path is None:
        return None
    rng_file = root / tag / f"rng_rank{rank}.pt"
    if rng_file.is_file():
        _set_rng_state(torch.load(rng_file, weights_only=False))
    return int(client_state["step"])


def _rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
