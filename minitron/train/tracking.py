"""Metrics sinks: W&B (offline by default) or nothing, plus a metrics.jsonl that is always written.
Only rank 0 tracks; the other ranks get a tracker that does nothing."""
import json
import os
from pathlib import Path
from typing import Optional

from minitron.config import LoggerConfig
from minitron.logs import captured_output


class NullTracker:
    def log(self, metrics: dict, step: int) -> None:
        pass

    def log_table(self, name: str, columns: list, rows: list) -> None:
        pass

    def log_image(self, name: str, path: Path) -> None:
        pass

    def finish(self) -> None:
        pass


class JsonlTracker:
    """One JSON object per logged step in <output_dir>/metrics.jsonl. A run resumed at step N
    first drops the rows after N (the steps it is about to repeat), so no step appears twice."""

    def __init__(self, path: Path, inner, resumed_at: Optional[int] = None):
        self.path = path
        self.inner = inner
        if resumed_at is not None and path.is_file():
            rows = path.read_text().splitlines(keepends=True)
            kept = [row for row in rows if (step := _step_of(row)) is not None and step <= resumed_at]
            if len(kept) != len(rows):
                tmp = path.with_name(f".{path.name}.tmp")
                tmp.write_text("".join(kept))
                os.replace(tmp, path)

    def log(self, metrics: dict, step: int) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        self.inner.log(metrics, step)

    def log_table(self, name: str, columns: list, rows: list) -> None:
        self.inner.log_table(name, columns, rows)

    def log_image(self, name: str, path: Path) -> None:
        self.inner.log_image(name, path)

    def finish(self) -> None:
        self.inner.finish()


class WandbTracker:
    def __init__(self, cfg: LoggerConfig, run_dir: Path, config: dict):
        # wandb also writes under $HOME unless told otherwise; keep everything in the run dir.
        wandb_dir = run_dir / "wandb"
        wandb_dir.mkdir(parents=True, exist_ok=True)
        for var in ("WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_CONFIG_DIR"):
            os.environ.setdefault(var, str(wandb_dir / ".wandb"))
        import wandb

        with captured_output():  # its banner and sync hints (its service process inherits the file)
            self.run = wandb.init(project=cfg.wandb.project, entity=cfg.wandb.entity, name=cfg.wandb.name,
                                  mode=cfg.wandb.mode, dir=str(run_dir), config=config)

    def log(self, metrics: dict, step: int) -> None:
        self.run.log(metrics, step=step)

    def log_table(self, name: str, columns: list, rows: list) -> None:
        import wandb

        self.run.log({name: wandb.Table(columns=columns, data=rows)})

    def log_image(self, name: str, path: Path) -> None:
        import wandb

        self.run.log({name: wandb.Image(str(path))})

    def finish(self) -> None:
        with captured_output():
            self.run.finish()


def _step_of(row: str) -> Optional[int]:
    """A metrics.jsonl row's step; None for a line a kill cut short."""
    try:
        return int(json.loads(row)["step"])
    except (ValueError, KeyError, TypeError):
        return None


def make_tracker(cfg: LoggerConfig, run_dir: Path, config: dict, rank: int, resumed_at: Optional[int] = None):
    """`resumed_at`: the step a training run starts from (0 for a fresh one), whose later rows
    in metrics.jsonl are dropped; None keeps every row (jobs that are not resumed)."""
    if rank != 0:
        return NullTracker()
    inner = WandbTracker(cfg, run_dir, config) if cfg.backend == "wandb" else NullTracker()
    return JsonlTracker(run_dir / "metrics.jsonl", inner, resumed_at)
