"""Why a training run stops before its last step, and how.

Preemption: SIGTERM (how SLURM and Kubernetes preempt a job, and what torchrun and the deepspeed
launcher forward to their workers) and SIGUSR1 (what `sbatch --signal=B:USR1@<grace>` sends before
the time limit) only set a flag. The loop finishes its optimizer step, every rank agrees through
the step's metric all-reduce to stop at the same step, saves a checkpoint, writes a summary that
says so and exits with EXIT_INTERRUPTED; `resume=auto` continues from that step. A second signal
during the save sets the flag again and changes nothing, so it cannot corrupt the save.

Divergence: a non-finite loss or gradient norm stops every rank at the same step (both values
are global), before anything is saved over the last good checkpoint.
"""
import contextlib
import signal
import threading
from typing import Iterator, Optional

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
EXIT_INTERRUPTED = 75  # EX_TEMPFAIL, "try again later": what a requeued job should do
EXIT_DIVERGED = 1


class Interrupted(Exception):
    """The run stopped on a signal after saving a checkpoint; the message says where."""


class TrainingDiverged(Exception):
    """The loss or gradient norm stopped being finite; the message names the keys to change."""


class StopRequest:
    """The signal received since the loop started, if any."""

    def __init__(self):
        self.signum: Optional[int] = None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else "a signal on another rank"


@contextlib.contextmanager
def stop_on_signals() -> Iterator[StopRequest]:
    """While inside, STOP_SIGNALS are recorded in the yielded request instead of ending the
    process; once one has arrived, they are ignored from then on."""
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():  # Python only signals the main thread
        yield request
        return

    def record(signum, frame):
        request.signum = signum

    previous = {sig: signal.signal(sig, record) for sig in STOP_SIGNALS}
    try:
        yield request
    finally:
        # After a stop request the process is on its way out (summary, exit), and a repeated
        # signal must not cut that short: ignored, which (unlike a Python handler) the
        # interpreter keeps while it shuts down. Otherwise in-process callers (the pipeline, the
        # search) get their handlers back.
        for sig, handler in previous.items():
            signal.signal(sig, handler if request.signum is None else signal.SIG_IGN)
