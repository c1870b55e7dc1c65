"""One live job per checkpoint root: ``<checkpoint.save_dir>/run.lock`` names the job that trains there.

The lock is a small JSON file (host, pid and the pid's start time, Slurm job id, start date) that rank 0
creates before any process group starts and removes when it exits. A second job that finds the lock of a
live job is refused (``RunLockError``, exit status 2) instead of writing into the same checkpoints. A
stale lock is taken over with a warning: its Slurm job has ended, or it was written on this host by a
process that no longer runs (a pid reused since is told apart by its start time). A requeued Slurm job
has the same ``SLURM_JOB_ID`` and takes over its own lock wherever it runs.

Standard library only. The trainer takes the lock on rank 0 before any process group or model exists.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import socket
import subprocess
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

LOCK_NAME = "run.lock"
# Slurm job states of a job that can still write (see squeue(1) "JOB STATE CODES").
_LIVE_SLURM_STATES = {
    "PENDING", "RUNNING", "SUSPENDED", "COMPLETING", "CONFIGURING", "REQUEUED", "REQUEUE_HOLD",
    "REQUEUE_FED", "RESIZING", "SIGNALING", "STAGE_OUT", "STOPPED", "RESV_DEL_HOLD",
}  # fmt: skip


class RunLockError(ValueError):
    """Another live job holds the checkpoint root, or the lock cannot be written; says what to do."""


@dataclass(frozen=True)
class LockOwner:
    """Who holds a run lock."""

    host: str
    pid: int
    pid_start: str | None  # the pid's start time in clock ticks since boot (/proc/<pid>/stat), Linux only
    job_id: str | None  # SLURM_JOB_ID, None outside Slurm
    started: str  # when the lock was taken, UTC, for the message

    def describe(self) -> str:
        job = f"Slurm job {self.job_id}, " if self.job_id else ""
        return f"{job}host {self.host}, pid {self.pid}, since {self.started}"


def _pid_start(pid: int) -> str | None:
    """Field 22 of /proc/<pid>/stat (start time since boot); None where /proc is unavailable."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text.rsplit(")", 1)[1].split()[19]  # the command name may hold spaces; fields follow ")"


def current_owner(environ: Mapping[str, str] = os.environ) -> LockOwner:
    """This process as a lock owner."""
    return LockOwner(
        host=socket.gethostname(),
        pid=os.getpid(),
        pid_start=_pid_start(os.getpid()),
        job_id=environ.get("SLURM_JOB_ID") or None,
        started=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    )


def _read_owner(path: Path) -> LockOwner | None:
    """The lock's owner; None when the file is unreadable or not a lock (then it is stale)."""
    try:
        data = json.loads(path.read_text())
        return LockOwner(
            host=str(data["host"]), pid=int(data["pid"]), pid_start=data.get("pid_start"),
            job_id=data.get("job_id"), started=str(data.get("started", "?")),
        )  # fmt: skip
    except FileNotFoundError:
        raise
    except (OSError, ValueError, KeyError, TypeError):
        return None


def slurm_job_state(job_id: str) -> str | None:
    """The job's state from ``squeue``; "" when Slurm no longer knows the job; None without Slurm."""
    try:
        result = subprocess.run(
            ["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if result.returncode != 0:
        # squeue fails with "Invalid job id specified" once the job has left slurmctld's memory.
        return "" if "Invalid job id" in result.stderr else None
    return result.stdout.strip().splitlines()[0] if result.stdout.strip() else ""


def _pid_alive(owner: LockOwner) -> bool:
    try:
        os.kill(owner.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    # The same pid, started at another time, is another process (the pid was reused).
    return owner.pid_start is None or _pid_start(owner.pid) in (None, owner.pid_start)


def stale_reason(owner: LockOwner | None, me: LockOwner) -> str | None:
    """Why the lock of ``owner`` may be taken over by ``me``; None when ``owner`` is (or may be) live."""
    if owner is None:
        return "the lock file is unreadable"
    if (owner.host, owner.pid, owner.pid_start) == (me.host, me.pid, me.pid_start):
        return "this process took it earlier"
    if owner.job_id is not None and owner.job_id == me.job_id:
        return f"it is this Slurm job's own lock (job {me.job_id}, requeued or restarted)"
    if owner.job_id is not None:
        state = slurm_job_state(owner.job_id)
        if state == "" or (state is not None and state not in _LIVE_SLURM_STATES):
            return f"Slurm job {owner.job_id} has ended ({state or 'no longer known to Slurm'})"
        if state is not None:
            return None
    if owner.host == me.host and not _pid_alive(owner):
        return f"process {owner.pid} on {owner.host} no longer runs"
    return None


def _write_new(path: Path, me: LockOwner) -> bool:
    """Create the lock atomically; False when a lock file is already there."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        json.dump(asdict(me), f)
        f.write("\n")
    return True


def _take_over(path: Path, me: LockOwner) -> None:
    tmp = path.with_name(f".{LOCK_NAME}.{me.pid}")
    tmp.write_text(json.dumps(asdict(me)) + "\n")
    os.replace(tmp, path)


def acquire(root: str | os.PathLike, environ: Mapping[str, str] = os.environ) -> Path:
    """Take ``root/run.lock`` for this process; raises ``RunLockError`` when a live job holds it."""
    root, me = Path(root), current_owner(environ)
    path = root / LOCK_NAME
    try:
        root.mkdir(parents=True, exist_ok=True)
        for _ in range(3):  # a lock removed between our create and our read: try again
            if _write_new(path, me):
                return path
            try:
                owner = _read_owner(path)
            except FileNotFoundError:
                continue
            reason = stale_reason(owner, me)
            if reason is None:
                raise RunLockError(
                    f"{root} is in use by another live run ({owner.describe()}); two jobs would write into "
                    f"the same checkpoints. Wait for it to end or cancel it, or set another "
                    f"checkpoint.save_dir. If you are sure it no longer runs, remove {path}"
                )
            logger.warning("taking over the stale run lock %s: %s", path, reason)
            _take_over(path, me)
            if _read_owner(path) == me:  # a concurrent starter may have replaced it meanwhile
                return path
        raise RunLockError(f"could not take the run lock {path}: other runs keep starting there")
    except OSError as error:
        raise RunLockError(
            f"cannot write the run lock in checkpoint.save_dir={root}: {error}; choose a writable directory"
        ) from None


def release(path: Path | None) -> None:
    """Remove the lock if it is still this process's (a later job may have taken it over)."""
    if path is None:
        return
    with contextlib.suppress(FileNotFoundError):
        owner = _read_owner(path)
        if owner is not None and owner.pid == os.getpid() and owner.host == socket.gethostname():
            path.unlink()


def take(root: str | os.PathLike, environ: Mapping[str, str] = os.environ) -> Path | None:
    """On rank 0 (``RANK`` unset or 0) take the run lock until ``release`` or the process's exit (also
    when set-up fails); other ranks take none and get None."""
    if environ.get("RANK", "0") != "0":
        return None
    path = acquire(root, environ)
    atexit.register(release, path)
    return path
