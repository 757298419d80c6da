"""Where a command's output goes. minitron's own messages go to the terminal at `log_level`;
other libraries' (DeepSpeed's accelerator warning and config dumps, the JIT compiler's command
lines, transformers' and datasets' progress bars, Python warnings) go to the run's log file, and
to the terminal too with `log_level=debug`.

Library loggers are routed through the root logger, whose only handler is the file. Output that
bypasses logging (compiler subprocesses, `print`) is caught at the file-descriptor level by
`captured_output()` around the few calls that make it.
"""
import contextlib
import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import Optional

from minitron.config import ConfigError

LEVELS = ("debug", "info", "warning", "error")
# Libraries that install handlers of their own, so that their lines bypass the root logger.
_SELF_HANDLED = ("DeepSpeed", "deepspeed", "lm-eval", "lm_eval", "wandb")

_log_file: Optional[Path] = None
_debug = False
_replaced: list = []  # (logger, handlers it had, level, propagate) before setup, for teardown


class _LazyFileHandler(logging.FileHandler):
    """Appends to the log file, creating it (and output_dir) only when there is a line to write:
    a run refused on bad input before it logs anything leaves output_dir as it was."""
    def __init__(self, path: Path):
        super().__init__(path, mode="a", encoding="utf-8", delay=True)

    def _open(self):
        Path(self.baseFilename).parent.mkdir(parents=True, exist_ok=True)
        return super()._open()


class _TerminalFormat(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        return text if record.levelno < logging.WARNING else f"{record.levelname.lower()}: {text}"


def check_log_level(level: str) -> None:
    if level not in LEVELS:
        raise ConfigError(f"log_level: {level!r} is not one of {', '.join(LEVELS)}")


def log_file_for(output_dir: str, command: str, rank: int) -> Path:
    name = f"{command}.log" if rank == 0 else f"{command}.rank{rank}.log"
    return Path(output_dir) / name


def is_log_file(path: Path) -> bool:
    return path.is_file() and path.name.endswith(".log")


def setup(level: str, log_file: Path, rank: int) -> None:
    """Route this process's logging: minitron's to the terminal (rank 0 at `level`, other ranks
    warnings and errors only), everything to `log_file` (appended to, so a resumed run adds to it)."""
    global _log_file, _debug
    check_log_level(level)
    teardown()
    _log_file, _debug = log_file, level == "debug"
    root, ours = logging.getLogger(), logging.getLogger("minitron")
    for logger in (root, ours):
        _replaced.append((logger, list(logger.handlers), logger.level, logger.propagate))
        for handler in list(logger.handlers):  # Hydra's console handler on root among them
            logger.removeHandler(handler)
    root.setLevel(logging.DEBUG if _debug else logging.INFO)
    to_file = _LazyFileHandler(log_file)
    to_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(to_file)
    logging.captureWarnings(True)

    terminal_level = getattr(logging, level.upper())
    if rank != 0:
        terminal_level = max(terminal_level, logging.WARNING)
    if _debug:  # everything to the terminal, through root; minitron's lines with the rest
        everything = logging.StreamHandler(sys.stdout)
        everything.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        everything.setLevel(terminal_level)
        root.addHandler(everything)
    else:
        terminal = logging.StreamHandler(sys.stdout)
        terminal.setFormatter(_TerminalFormat("%(message)s"))
        terminal.setLevel(terminal_level)
        ours.addHandler(terminal)
    ours.setLevel(logging.DEBUG if _debug else logging.INFO)
    ours.propagate = True
    _quiet_libraries()


def teardown() -> None:
    """Undo `setup` (close the log file, give root and the minitron logger back their handlers
    and levels): for callers that run several commands in one process. A command's own process
    keeps the routing to its end, when libraries still log (W&B's shutdown)."""
    global _log_file, _debug
    while _replaced:
        logger, handlers, level, propagate = _replaced.pop()
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
            handler.close()
        for handler in handlers:
            logger.addHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate
    _log_file, _debug = None, False


def _quiet_libraries() -> None:
    """Send transformers' and datasets' loggers to the file and turn their bars off (they would
    write to the terminal directly); at debug, leave them as the libraries set them."""
    import datasets
    import transformers

    if _debug:
        return
    transformers.utils.logging.disable_default_handler()
    transformers.utils.logging.enable_propagation()
    transformers.utils.logging.disable_progress_bar()
    datasets.utils.logging.enable_propagation()
    datasets.disable_progress_bars()
    route_library_loggers()


def route_library_loggers() -> None:
    """Loggers that libraries create with handlers of their own (DeepSpeed's at import): their
    lines go to the file through root instead. Called again after such a library is imported."""
    if _debug or _log_file is None:
        return
    for name in _SELF_HANDLED:
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
        logger.propagate = True


@contextlib.contextmanager
def captured_output():
    """Within: whatever is written to stdout and stderr, by Python or by a subprocess, is appended
    to the log file afterwards (held in a temporary file meanwhile, so nothing is created for a run
    that ends up writing nothing). A no-op without a log file (in-process callers, tests) or at
    log_level=debug."""
    if _log_file is None or _debug:
        yield
        return
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 1)
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
            sink.seek(0)
            text = sink.read()
            if text:
                _log_file.parent.mkdir(parents=True, exist_ok=True)
                with open(_log_file, "ab") as log:
                    log.write(text)
    route_library_loggers()
