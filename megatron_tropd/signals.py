"""Stop signals, the requeue exit status and parent-death signals; standard library only.

This module imports nothing heavy on purpose: ``python -m megatron_tropd.train`` installs the handlers
before torch and Megatron load, so a pre-emption warning that arrives while the job starts is deferred
like one that arrives mid-step.

The contract (``slurm/tropd_8node.sh`` and ``recipes/launch.py`` rely on it):

* SIGUSR1 or SIGTERM asks the trainer to stop: it finishes the current step, saves a checkpoint and
  exits with ``REQUEUE_EXIT_CODE`` (75, ``EX_TEMPFAIL``: "try again later"). A run that reached
  ``train_steps`` exits 0 even when a signal came during its last step.
* Every rank dies with the process that started it (``set_parent_death_signal``): a killed torchrun
  takes its workers down instead of leaving them training on their own.
* Helper processes a rank starts for checkpoint writing ignore the stop signals
  (``ignore_stop_signals_in_helper``): Slurm signals every process of a step, and the helper must live
  on until the save that the signal asked for is written.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator
from typing import ClassVar

logger = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
"""Slurm's pre-emption / time-limit warning (``--signal=USR1``), and what scancel / requeue send."""
_HELPER_SIGNALS = frozenset({*STOP_SIGNALS, signal.SIGINT})
REQUEUE_EXIT_CODE = 75
"""Exit status of every rank that stopped on a signal after saving: resume me (``EX_TEMPFAIL``)."""
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


class StopSignals:
    """Records SIGUSR1 / SIGTERM instead of dying; one per process (``install``)."""

    _instance: ClassVar[StopSignals | None] = None

    def __init__(self) -> None:
        self.signum: int | None = None
        self.honoured = False  # set when the loop stopped early on the signal (the trainer sets it)

    @classmethod
    def install(cls) -> StopSignals:
        """The process's instance, installing the handlers on the first call (from the main thread)."""
        if cls._instance is None:
            instance = cls()
            if threading.current_thread() is threading.main_thread():
                for signum in STOP_SIGNALS:
                    signal.signal(signum, instance._handle)
            cls._instance = instance
        return cls._instance

    @property
    def requested(self) -> bool:
        """A stop signal arrived."""
        return self.signum is not None

    def _handle(self, signum: int, frame: object) -> None:
        first = self.signum is None
        self.signum = signum
        if first:
            # stderr, not logging: the handler may run before logging is configured.
            print(
                f"tropd: {signal.Signals(signum).name} received: checkpointing at the end of this step, "
                f"then exiting with status {REQUEUE_EXIT_CODE}",
                file=sys.stderr,
                flush=True,
            )

    def exit_status(self) -> int:
        """``REQUEUE_EXIT_CODE`` when the run stopped early on a signal, else 0."""
        return REQUEUE_EXIT_CODE if self.honoured else 0


def set_parent_death_signal(signum: int = signal.SIGKILL) -> bool:
    """Ask Linux to send ``signum`` to this process when its parent exits; False where unsupported.

    Workers of torchrun and of ``megatron_tropd.spawn`` run in their own sessions, so a kill of the
    launcher's process group misses them; this ties their life to the launcher's.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, signum, 0, 0, 0) != 0:
            logger.warning("prctl(PR_SET_PDEATHSIG) failed: %s", os.strerror(ctypes.get_errno()))
            return False
    except (OSError, AttributeError) as error:
        logger.warning("prctl(PR_SET_PDEATHSIG) unavailable: %s", error)
        return False
    return True


def ignore_stop_signals_in_helper() -> None:
    """Initializer of a rank's helper process: ignore the stop signals and Ctrl-C, die with the rank.

    The rank decides when to stop; its helpers must outlive the signal so the final save completes. A
    helper started inside ``stop_signals_held`` has them blocked until here: ignoring them discards any
    that arrived meanwhile, then they are unblocked.
    """
    for signum in _HELPER_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _HELPER_SIGNALS)
    set_parent_death_signal(signal.SIGKILL)


@contextlib.contextmanager
def stop_signals_held() -> Iterator[None]:
    """Block the stop signals and Ctrl-C in this thread while a helper process starts: the helper begins
    with them blocked, so none can end it before it ignores them, and one this process gets meanwhile
    waits for the unblock instead of being lost."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, _HELPER_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
