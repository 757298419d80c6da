"""What a command does in an output_dir that is not empty, decided before Hydra writes anything:
a finished run of the same command with the same settings is reported and not redone; another
command's finished output, or (for training) a finished run with other settings, is refused;
and a run that fails on bad input removes whatever it created.
"""
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Set

import yaml

from minitron.config import ConfigError
from minitron.run import finished_summary

# Settings that change where results are reported or how a run restarts, not what it computes
# (output_dir: a run directory that was moved or copied is still the same run).
IGNORED = ("resume", "logger", "log_level", "output_dir")
# The run that continues a finished training segment: more steps on the same schedule.
CONTINUATION = "train.max_steps"


@dataclass
class Snapshot:
    """What existed under output_dir before the run, to remove exactly what the run added."""
    created: Optional[Path]
    """The outermost directory of output_dir's path that did not exist (all of it is new)."""
    entries: Set[str]


def compose(config_name: str, overrides: List[str], conf_dir: str):
    """The job config Hydra is about to run, or None where composing needs Hydra itself (its own
    errors are then Hydra's to report)."""
    from hydra import compose as hydra_compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    if any(o.startswith("-") for o in overrides):  # --multirun, --help, --cfg ...: Hydra's business
        return None
    try:
        with initialize_config_dir(config_dir=conf_dir, version_base="1.3"):
            cfg = hydra_compose(config_name=config_name,
                                overrides=[o for o in overrides if not o.startswith("hydra.")])
            return OmegaConf.to_container(cfg, resolve=True)
    except Exception:
        return None
    finally:
        GlobalHydra.instance().clear()


def finished_already(cfg: dict, saved_config: str) -> Optional[str]:
    """The line to print if output_dir holds this exact run, finished; None if there is work to
    do; a ConfigError if output_dir holds a finished run this one must not overwrite."""
    out = Path(cfg["output_dir"])
    summary = finished_summary(out / "summary.json")
    if summary is None or summary.get("dry_run"):
        return None
    try:
        saved = yaml.safe_load((out / saved_config).read_text())
    except (OSError, yaml.YAMLError):
        saved = None
    if not isinstance(saved, dict) or set(saved) != set(cfg):
        raise ConfigError(f"output_dir: {out} holds the finished output of another command; "
                          "choose another output_dir")
    differences = _differences(saved, cfg)
    if not differences:
        if cfg.get("resume") == "never":
            return None
        return f"{out}: already finished with these settings (summary.json); nothing to do" + (
            ", resume=never runs it again" if "resume" in cfg else "")
    if "resume" not in cfg or cfg.get("resume") == "never":  # prune and eval redo; resume=never starts over
        return None
    if differences == [CONTINUATION] and _get(cfg, CONTINUATION) > _get(saved, CONTINUATION):
        return None  # continues the finished segment from its last checkpoint
    key = differences[0]
    raise ConfigError(f"output_dir: {out} holds a finished run with other settings ({key}: {_get(saved, key)!r} "
                      f"here, {_get(cfg, key)!r} now); choose another output_dir, or set resume=never to replace it")


def _differences(saved: dict, cfg: dict) -> List[str]:
    flat_saved, flat_new = _flatten(saved), _flatten(cfg)
    keys = sorted(set(flat_saved) | set(flat_new))
    return [k for k in keys if not k.split(".")[0] in IGNORED and flat_saved.get(k) != flat_new.get(k)]


def _flatten(d: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in d.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _get(cfg: dict, dotted: str):
    for part in dotted.split("."):
        cfg = cfg.get(part) if isinstance(cfg, dict) else None
    return cfg


def snapshot(output_dir: str) -> Snapshot:
    out = Path(output_dir).absolute()
    missing = [p for p in (out, *out.parents) if not p.exists()]
    if missing:
        return Snapshot(created=missing[-1], entries=set())
    return Snapshot(created=None, entries={p.name for p in out.iterdir()} if out.is_dir() else set())


def remove_added(output_dir: str, before: Snapshot) -> None:
    """Undo a failed run's traces: the directories it created, or the entries it added to one
    that existed (Hydra's .hydra/ and log included)."""
    if before.created is not None:
        shutil.rmtree(before.created, ignore_errors=True)
        return
    out = Path(output_dir)
    for entry in (out.iterdir() if out.is_dir() else ()):
        if entry.name not in before.entries:
            shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)
