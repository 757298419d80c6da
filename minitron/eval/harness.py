"""lm-evaluation-harness tasks on an in-memory model: the checks a CLI runs before loading
anything, and the run itself, returning plain floats.

Besides lm-eval's own tasks there is one local task, `python_next_line` (tasks/), whose data
ships with the package, so every machine can run a zero-shot benchmark offline.

Each task is evaluated by its own `simple_evaluate` call, reseeded with `seed`: a task's score
does not depend on which other tasks are in the list, and a task whose data cannot be loaded is
named in the error.
"""
import contextlib
import copy
import difflib
import functools
import importlib.util
import logging
from pathlib import Path

import yaml

from minitron.config import ConfigError
from minitron.logs import captured_output

LOCAL_TASKS = ("python_next_line",)
TASKS_DIR = Path(__file__).with_name("tasks")
INSTALL_HINT = 'pip install -e ".[eval]"'


def available() -> bool:
    """Whether lm-eval and its Hugging Face backend are installed, found without importing them.
    The backend (`lm-eval[hf]`) needs accelerate, which plain `pip install lm-eval` leaves out."""
    return all(importlib.util.find_spec(name) is not None for name in ("lm_eval", "accelerate"))


def check_tasks(tasks: list) -> None:
    """Fail before any model loads: lm-eval missing, or a name neither local nor known to lm-eval
    (a task, group or tag). An empty list needs nothing, not even lm-eval."""
    if not tasks:
        return
    if not available():
        raise ConfigError(f"eval.tasks: lm-eval with its Hugging Face backend (lm-eval[hf]) is not installed; "
                          f"{INSTALL_HINT}")
    for name in tasks:
        if not isinstance(name, str) or not name:
            raise ConfigError(f"eval.tasks: expected task names, got {name!r}")
    unknown = [name for name in tasks if name not in LOCAL_TASKS]
    if not unknown:
        return
    known = set(_task_manager(True).all_tasks)
    for name in unknown:
        if name not in known:
            close = difflib.get_close_matches(name, sorted(known | set(LOCAL_TASKS)), n=3)
            hint = f"; close names: {', '.join(close)}" if close else ""
            raise ConfigError(f"eval.tasks: unknown task {name!r}: neither local ({', '.join(LOCAL_TASKS)}) "
                              f"nor an lm-eval task, group or tag{hint}")


def run_tasks(model, tokenizer, tasks: list, *, batch_size: int = 8, limit=None, device="cpu",
              seed: int = 0) -> dict:
    """{task or group name: {metric: float}} for each task (a group also lists its subtasks).

    `model` is a transformers causal LM already on `device` and in eval mode (lm-eval's wrapper
    takes the device from the model and ignores its own `device` argument for an in-memory model).
    `limit` (an int, or a fraction below 1)
    takes the first items of each task, as lm-eval does. Metrics of lm-eval's default filter keep
    their names (`acc`, `acc_stderr`); other filters become `metric/filter`.
    """
    check_tasks(tasks)
    if not tasks:
        return {}
    scores = {}
    with _quiet():
        lm = _wrap(model, tokenizer, batch_size, device)
        manager = _task_manager(any(name not in LOCAL_TASKS for name in tasks))
        for name in tasks:
            scores.update(_scores(_evaluate(lm, manager, name, limit=limit, seed=seed)))
    return scores


def local_task_config(name: str) -> dict:
    """The task's YAML with its data file made absolute: lm-eval hands `data_files` to
    `datasets.load_dataset`, which resolves relative paths against the working directory."""
    config = yaml.safe_load((TASKS_DIR / f"{name}.yaml").read_text())
    files = config["dataset_kwargs"]["data_files"]
    config["dataset_kwargs"]["data_files"] = {split: str(TASKS_DIR / path) for split, path in files.items()}
    return config


@functools.lru_cache(maxsize=2)
def _task_manager(include_defaults: bool):
    """lm-eval's task index. Building it parses every task YAML it ships (thousands: seconds), so
    it is built once per process, and not at all when only local tasks run."""
    from lm_eval.tasks import TaskManager

    with _quiet():
        return TaskManager(include_defaults=include_defaults)


def _wrap(model, tokenizer, batch_size: int, device):
    """lm-eval's HF wrapper around the in-memory model. The tokenizer is copied because HFLM sets
    a pad token on the one it gets. HFLM warns that most of its arguments are ignored for an
    in-memory model, which is what we want, so its construction runs at ERROR level."""
    from lm_eval.models.huggingface import HFLM

    with _log_level(logging.ERROR):
        return HFLM(pretrained=model, tokenizer=copy.deepcopy(tokenizer), batch_size=batch_size, device=str(device))


def _evaluate(lm, manager, name: str, *, limit=None, seed: int = 0, log_samples: bool = False) -> dict:
    """lm-eval's raw results for one task, group or tag. Its data is loaded first, on its own, so
    that a missing download becomes a one-line error naming the task."""
    import lm_eval

    return lm_eval.simple_evaluate(
        model=lm, tasks=_load(manager, name), task_manager=manager, limit=limit, log_samples=log_samples,
        random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed)


def _load(manager, name: str) -> list:
    """The built task objects for `name` (its data loaded): [group], or the tasks of a task or tag."""
    spec = local_task_config(name) if name in LOCAL_TASKS else name
    try:
        loaded = manager.load([spec])
    except OSError as e:  # datasets/hub: ConnectionError, OfflineModeIsEnabled, DatasetNotFoundError
        raise ConfigError(f"eval.tasks: {name}: its data is not available (offline or not downloaded): "
                          f"{_first_line(e)}") from None
    except Exception as e:  # a missing optional dependency, a task needing metadata, ...
        raise ConfigError(f"eval.tasks: {name}: lm-eval cannot load it: {type(e).__name__}: {_first_line(e)}") from None
    groups = loaded.get("groups") or {}
    return [groups[name]] if name in groups else list(loaded["tasks"].values())


def _scores(results: dict) -> dict:
    """Plain floats from lm-eval's `results` section, whose keys read `metric,filter`."""
    scores = {}
    for task, metrics in results["results"].items():
        row = {}
        for key, value in metrics.items():
            metric, _, filter_name = key.partition(",")
            if filter_name and isinstance(value, (int, float)) and not isinstance(value, bool):
                row[metric if filter_name == "none" else f"{metric}/{filter_name}"] = float(value)
        scores[task] = row
    return scores


def _first_line(error: Exception) -> str:
    lines = str(error).strip().splitlines()
    return lines[0][:300] if lines else type(error).__name__


@contextlib.contextmanager
def _quiet():
    """lm-eval at WARNING (it logs every step at INFO) and no `datasets` progress bars, restored
    afterwards: the caller's terminal shows its own progress, not the harness's internals. Its
    own tqdm bars and its `git describe` stderr go to the run's log file."""
    import datasets

    bars = not datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        with _log_level(logging.WARNING), captured_output():
            yield
    finally:
        if bars:
            datasets.enable_progress_bars()


@contextlib.contextmanager
def _log_level(level: int):
    logger = logging.getLogger("lm_eval")
    before = logger.level
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(before)
