"""Run plumbing every job shares: start a run (process group, output directory, data), write
JSON atomically, export a plain transformers checkpoint. Train, distill, prune, search and the
pipeline use these, so an output directory looks the same whichever job wrote it."""
import json
import os
import shutil
from pathlib import Path
from typing import Optional

from minitron.data.packing import build_or_load
from minitron.distributed.gang import init_gang
from minitron.train.checkpoint import tag_for
from minitron.train.stopping import Interrupted


def start_run(cfg):
    """(gang, output dir, packed data) for a training-loop job (train or distill): the process
    group, the output directory (rank 0), the data."""
    gang = init_gang()
    out = Path(cfg.output_dir)
    if gang.rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    return gang, out, build_or_load(cfg.data, gang, cfg.seed)


def begin_training(out: Path, config_yaml: str, gang) -> None:
    """Once a run has resumed and is about to train: its resolved config in config.yaml, and the
    summary.json of the run it continues (a finished segment, an interrupted run) gone, so until
    this run writes its own the directory does not look finished. Not earlier: a run that fails
    before this point leaves the previous run's files as they were."""
    if gang.rank == 0:
        (out / "summary.json").unlink(missing_ok=True)
        (out / "config.yaml").write_text(config_yaml)


def finished_summary(path: Path) -> Optional[dict]:
    """The summary (summary.json, or a stage's marker) of a run that finished; None if there is
    none, it is unreadable or it records an interrupted run."""
    try:
        summary = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return None if not isinstance(summary, dict) or summary.get("interrupted") else summary


def stop_interrupted(result, out: Path, checkpoints: Path, max_steps: int, tracker, gang) -> None:
    """After a training loop that stopped on a signal: a summary.json that says so, then
    Interrupted (the CLI exits with EXIT_INTERRUPTED)."""
    checkpoint_dir = checkpoints / tag_for(result.steps)
    tracker.finish()
    if gang.rank == 0:
        write_json_atomic(out / "summary.json", {
            "interrupted": True, "signal": result.interrupted, "step": result.steps, "max_steps": max_steps,
            "train_loss": result.train_loss, "tokens_seen": result.tokens_seen,
            "checkpoint": str(checkpoint_dir.resolve())})
    gang.barrier()
    raise Interrupted(f"interrupted by {result.interrupted} at step {result.steps} of {max_steps}; saved "
                      f"{checkpoint_dir}; run the same command again (resume=auto) to continue")


def export_model(engine, tokenizer, model_dir: Path, gang, max_shard_size: str, model=None,
                 extra_files=None) -> Path:
    """A plain transformers checkpoint (safetensors + tokenizer) of `model` (default: the
    engine's whole module) plus `extra_files` {name: text}, renamed into place only once complete
    so a crash never leaves a directory that looks finished. Under ZeRO-3 rank 0 streams it out one
    gathered parameter at a time (no rank holds the whole model); otherwise save_pretrained."""
    from minitron.checks import parse_size
    from minitron.distributed.sharded import export_configs, export_streamed  # deepspeed: jobs with an engine

    model = model if model is not None else engine.module
    max_shard_bytes = parse_size(max_shard_size, "export.max_shard_size")
    tmp = model_dir.with_name(f".{model_dir.name}.tmp")
    if gang.rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    if engine.zero_optimization_stage() == 3:
        if gang.rank == 0:
            export_configs(model, tmp)
        export_streamed(model, tmp, max_shard_bytes)
    elif gang.rank == 0:
        model.save_pretrained(tmp, max_shard_size=max_shard_bytes)
    if gang.rank == 0:
        tokenizer.save_pretrained(tmp)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        follow_umask(tmp)
        shutil.rmtree(model_dir, ignore_errors=True)
        os.replace(tmp, model_dir)
    gang.barrier()
    return model_dir


def follow_umask(directory: Path) -> None:
    """Give `directory` and everything in it the modes the process umask allows (0644 / 0755 under
    the usual 022): mkdtemp and safetensors create theirs private (0700 / 0600), which would keep
    an exported model from a colleague on a shared filesystem."""
    umask = os.umask(0)
    os.umask(umask)
    for path in [directory, *directory.rglob("*")]:
        if path.is_symlink():
            continue
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)


def write_json_atomic(path: Path, obj: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # the jobs of one sweep may write at once
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)
