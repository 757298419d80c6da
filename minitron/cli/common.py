"""What every Hydra entry point shares: launcher-argument handling, early checks of group choices,
and turning a user's mistake into one line on stderr with a non-zero exit."""
import functools
import os
import sys
from pathlib import Path
from typing import Callable

from minitron.config import ConfigError, check_output_dir

EXIT_CONFIG_ERROR = 2


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


def exit_on_config_error(fn: Callable) -> Callable:
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            sys.exit(EXIT_CONFIG_ERROR)
    return wrapper


def run_hydra(config_name: str, job: Callable) -> None:
    """Run `job(cfg)` under Hydra with `config_name` from conf/."""
    import hydra

    sys.argv[1:] = prepare_argv(sys.argv[1:])
    exit_on_config_error(check_group_choices)(sys.argv[1:], conf_dir())
    exit_on_config_error(check_output_dir_arg)(sys.argv[1:])
    hydra.main(config_path=conf_dir(), config_name=config_name, version_base="1.3")(
        exit_on_config_error(job))()
