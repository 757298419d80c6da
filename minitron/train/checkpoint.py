"""Checkpoints through the DeepSpeed engine (model, optimizer, scheduler) plus what DeepSpeed does
not keep: the step (which fixes the data position, see data/sampler.py) and each rank's RNG.

Each checkpoint directory ends with a manifest.json of its files' sizes, written once every rank
has finished writing. `resume=auto` takes the newest checkpoint whose files all match their
manifest and open as torch archives, warning about each newer one it skips (a save cut short, a
truncated copy), so a bad checkpoint costs the steps since the previous one, not the run.
"""
import json
import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np
import torch

from minitron.config import ConfigError

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def save(engine, root: Path, step: int, gang, keep: int) -> None:
    tag_dir = root / tag_for(step)
    tag_dir.mkdir(parents=True, exist_ok=True)
    torch.save(_rng_state(), tag_dir / f"rng_rank{gang.rank}.pt")
    (tag_dir / MANIFEST).unlink(missing_ok=True)  # a resumed run saving this step again
    engine.save_checkpoint(str(root), tag=tag_for(step), client_state={"step": step}, save_latest=False)
    gang.barrier()  # every rank's files are complete before the manifest vouches for them
    # The manifest, then `latest`, each written atomically: a kill at any moment leaves either a
    # directory without a manifest (skipped on resume) or a complete checkpoint. DeepSpeed's own
    # `latest` is opened before it is written, and a kill in between left an empty file.
    if gang.rank == 0:
        files = {str(f.relative_to(tag_dir)): f.stat().st_size for f in sorted(tag_dir.rglob("*"))
                 if f.is_file() and f.name != MANIFEST}
        _write_atomic(tag_dir / MANIFEST, json.dumps({"step": step, "files": files}, indent=1))
        _write_atomic(root / "latest", tag_for(step))
        # Keep the newest `keep` at or before this step. Later ones are left from before a resume
        # (skipped as unusable, or past the resumed step); this run overwrites them as it gets there.
        if keep > 0:
            for _, old in [s for s in _steps(root) if s[0] <= step][:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    gang.barrier()


def tidy_finished(root: Path, keep: int, continues: bool, gang) -> None:
    """After a finished run's summary.json: its checkpoints serve only `resume=auto`, which has
    nothing left to do, so they go, unless a later segment continues from them (`continues`) or
    `train.keep_checkpoints=0` asked to keep every one. One line says what stayed or went."""
    if gang.rank == 0 and root.is_dir():
        tags = [tag_dir for _, tag_dir in _steps(root)]
        size = sum(f.stat().st_size for f in root.rglob("*") if f.is_file())
        what = f"{len(tags)} checkpoint{'s' if len(tags) != 1 else ''} ({size / 1e6:,.1f} MB)"
        if continues or keep == 0:
            why = "the next segment resumes from it" if continues else "train.keep_checkpoints=0"
            log.info("kept %s in %s (%s)", what, root, why)
        else:
            shutil.rmtree(root, ignore_errors=True)
            log.info("removed %s: the run is finished and the model exported (train.keep_checkpoints=0 "
                     "keeps them)", what)
    gang.barrier()


def resume(engine, root: Path, mode: str, gang) -> int:
    """The step to start from: with resume=auto, the newest usable checkpoint's (restored into the
    engine), else 0. resume=never removes the previous run's checkpoints, which would otherwise
    pass for this run's."""
    if mode != "auto":
        if gang.rank == 0:
            shutil.rmtree(root, ignore_errors=True)
        gang.barrier()
        return 0
    found = None
    if gang.rank == 0:
        try:
            found = ("ok", newest_usable(root))
        except ConfigError as e:  # every rank raises it, none waits forever for rank 0
            found = ("error", str(e))
    status, tag = gang.broadcast_object(found)
    if status == "error":
        raise ConfigError(tag)
    if tag is None:
        return 0
    _, client_state = engine.load_checkpoint(str(root), tag=tag)
    rng_file = root / tag / f"rng_rank{gang.rank}.pt"
    if rng_file.is_file():  # absent when resuming with more ranks than saved: those start fresh streams
        _set_rng_state(torch.load(rng_file, weights_only=False))
    step = int(client_state["step"])
    log.info("resumed from %s at step %d", root / tag, step)
    return step


def newest_usable(root: Path) -> Optional[str]:
    """The newest checkpoint tag under `root` that passes `problem`, warning about each newer one.
    None if there is no finished checkpoint: a directory without a manifest is a save that was cut
    short (a kill during the first save leaves only that), so the run starts over. A ConfigError
    naming `resume` if there are finished ones but all are damaged: starting over would silently
    throw away the steps they held."""
    steps = _steps(root)
    damaged = 0
    for _, tag_dir in reversed(steps):
        if not (tag_dir / MANIFEST).exists():
            log.warning("checkpoint %s was never finished (no %s: the save was cut short); ignoring it",
                        tag_dir, MANIFEST)
            continue
        why = problem(tag_dir)
        if why is None:
            return tag_dir.name
        damaged += 1
        log.warning("checkpoint %s is unusable (%s); trying the one before it", tag_dir, why)
    if damaged:
        raise ConfigError(f"resume: none of the {len(steps)} checkpoints in {root} is usable (see the warnings "
                          "above); remove them or set resume=never to start over")
    return None


def problem(tag_dir: Path) -> Optional[str]:
    """Why this checkpoint directory cannot be resumed from, or None if it can: a missing or
    unreadable manifest, files missing or of another size than written, a torch archive that does
    not open."""
    try:
        files = json.loads((tag_dir / MANIFEST).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"no readable {MANIFEST}"
    for name, size in files.items():
        path = tag_dir / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} is {path.stat().st_size:,} bytes, {size:,} when saved"
        if name.endswith(".pt"):
            try:  # mmap: reads the archive's index and pickled structure, not the tensor bytes
                torch.load(path, map_location="cpu", mmap=True, weights_only=False)
            except Exception as e:
                return f"{name} does not load: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
    return None


def _steps(root: Path) -> List[Tuple[int, Path]]:
    """(step, directory) of every checkpoint directory under root, oldest first."""
    found = [(int(m.group(1)), p) for p in root.glob("step_*") if (m := re.fullmatch(r"step_(\d+)", p.name))]
    return sorted(found)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
