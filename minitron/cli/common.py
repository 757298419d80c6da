"""What every Hydra entry point shares: launcher-argument handling, early checks of group choices
and of the output_dir, and turning a user's mistake, a preemption or a diverged run into one line
on stderr with its own exit status."""
import functools
import os
import sys
import time
from pathlib import Path
from typing import Callable, Optional

from minitron import progress
from minitron.cli import rerun
from minitron.checks import check_output_dir
from minitron.config import ConfigError
from minitron.train.stopping import EXIT_DIVERGED, EXIT_INTERRUPTED, Interrupted, TrainingDiverged

EXIT_CONFIG_ERROR = 2
# A quick try of any command: every step count and evaluation size is capped (tests/test_readme.py
# runs each README command this way). Unset in normal use.
STEP_CAP_ENV = "MINITRON_STEP_CAP"


def conf_dir() -> str:
    """conf/ of a source checkout (editable install), else the copy shipped as minitron.conf."""
    repo_conf = Path(__file__).resolve().parents[2] / "conf"
    if (repo_conf / "train.yaml").is_file():
        return str(repo_conf)
    import minitron.conf

    return str(Path(minitron.conf.__file__).parent)


def prepare_argv(argv: list) -> list:
    """The deepspeed launcher appends `--local_rank=N`, which Hydra would reject: move it to the
    environment. Ranks other than 0 do not write Hydra's output files (rank 0 does)."""
    kept, i = [], 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--local_rank="):
            os.environ["LOCAL_RANK"] = arg.split("=", 1)[1]
        elif arg == "--local_rank" and i + 1 < len(argv):
            os.environ["LOCAL_RANK"] = argv[i + 1]
            i += 1
        else:
            kept.append(arg)
        i += 1
    rank = os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))
    if rank != "0" and not any(a.startswith("hydra.output_subdir") for a in kept):
        kept.append("hydra.output_subdir=null")
    return kept


def check_group_choices(argv: list, config_root: str) -> None:
    """`model=nope` would otherwise get Hydra's multi-line listing; name the key in one line."""
    root = Path(config_root)
    for arg in argv:
        key, sep, value = arg.partition("=")
        key = key.lstrip("+~")
        if not sep or "." in key or "/" in key or not (root / key).is_dir() or "," in value:
            continue
        options = sorted(p.stem for p in (root / key).glob("*.yaml"))
        if value not in options:
            raise ConfigError(f"{key}: unknown preset {value!r}; choose one of {', '.join(options)}")


def check_output_dir_arg(argv: list) -> None:
    """Hydra makes `output_dir` its run directory before the job starts, and fails with its own
    traceback when that path is a file; a plain `output_dir=...` is checked first."""
    for arg in argv:
        key, sep, value = arg.partition("=")
        if key == "output_dir" and sep and "," not in value and "$" not in value:
            check_output_dir(value)


def exit_on_known_errors(fn: Callable, on_config_error: Callable[[], None] = lambda: None) -> Callable:
    """`fn`, with bad input (after `on_config_error()`), a preemption and a diverged loss each
    ending the process with one line and its own exit status instead of a traceback."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ConfigError as e:
            on_config_error()
            _exit(f"error: {e}", EXIT_CONFIG_ERROR)
        except TrainingDiverged as e:
            _exit(f"error: {e}", EXIT_DIVERGED)
        except Interrupted as e:
            _exit(str(e), EXIT_INTERRUPTED)
    return wrapper


def _exit(line: str, status: int) -> None:
    if os.environ.get("RANK", "0") == "0":  # every rank raises the same error: say it once
        print(line, file=sys.stderr, flush=True)
    sys.exit(status)


def run_hydra(config_name: str, job: Callable, saved_config: Optional[str] = None) -> None:
    """Run `job(cfg)` under Hydra with `config_name` from conf/. `saved_config`: the file in which
    the job keeps its resolved config beside its summary.json, for commands that recognise their
    own finished output (minitron/cli/rerun.py)."""
    import hydra

    sys.argv[1:] = args = prepare_argv(sys.argv[1:])
    register_resolvers()
    if "--help" in args or "-h" in args:  # this command's keys and groups, not Hydra's generic page
        from minitron.cli.help import command_help

        try:
            print(command_help(config_name, conf_dir()), flush=True)
        except BrokenPipeError:  # `minitron-train --help | head`
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(0)
    exit_on_known_errors(check_group_choices)(args, conf_dir())
    exit_on_known_errors(check_output_dir_arg)(args)
    cfg = rerun.compose(config_name, args, conf_dir())  # None for sweeps: each job has its own directory
    cleanup = lambda: None  # noqa: E731
    if cfg is not None:
        cap_steps(cfg)  # compared with a finished run's saved config as the job will see it
        if saved_config:
            done = exit_on_known_errors(rerun.finished_already)(cfg, saved_config)
            if done:
                print(done, flush=True)
                sys.exit(0)
        before = rerun.snapshot(cfg["output_dir"])
        if os.environ.get("RANK", "0") == "0":
            cleanup = lambda: rerun.remove_added(cfg["output_dir"], before)  # noqa: E731
    hydra.main(config_path=conf_dir(), config_name=config_name, version_base="1.3")(
        exit_on_known_errors(with_logging(job, config_name), on_config_error=cleanup))()


def cap_steps(cfg) -> None:
    """With $MINITRON_STEP_CAP=N: training steps (every section's), search budgets and candidates,
    calibration samples and evaluation sizes at most N or a small multiple of it, in place (a dict
    or a DictConfig)."""
    cap = int(os.environ.get(STEP_CAP_ENV, "0"))
    if cap <= 0:
        return
    limits = {"max_steps": cap, "search_steps": cap, "warmup_steps": cap // 2, "max_candidates": 2,
              "num_samples": 4 * cap, "eval_blocks": 4 * cap, "blocks": 4 * cap, "limit": 4 * cap}
    for key, value in list(cfg.items()):
        if hasattr(value, "items"):
            cap_steps(value)
        elif key in limits and isinstance(value, int) and not isinstance(value, bool):
            cfg[key] = min(value, limits[key])
        elif key == "limit" and value is None:
            cfg[key] = limits[key]


def register_resolvers() -> None:
    """The conf/ files' `${output_parent:...}` and `${output_name:...}`: a multirun job's directory
    is the parent of output_dir joined with its last component, i.e. output_dir itself."""
    from omegaconf import OmegaConf

    OmegaConf.register_new_resolver("output_parent", lambda path: str(Path(path).parent), replace=True)
    OmegaConf.register_new_resolver("output_name", lambda path: Path(path).name, replace=True)


def with_logging(job: Callable, command: str) -> Callable:
    """`job`, with this process's output routed (minitron/logs.py) into `<output_dir>/<command>.log`."""
    @functools.wraps(job)
    def wrapper(cfg):
        from minitron import logs

        rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))
        cap_steps(cfg)
        log_file = logs.log_file_for(cfg.output_dir, command, rank)
        logs.setup(cfg.log_level, log_file, rank)
        started = time.perf_counter()
        result = job(cfg)
        if rank == 0:
            print(f"{command.replace('_', ' ')} done in {progress.duration(time.perf_counter() - started)}: "
                  f"everything is in {cfg.output_dir}/ (log: {log_file.name})", flush=True)
        return result
    return wrapper
