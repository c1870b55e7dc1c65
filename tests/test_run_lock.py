"""The run lock in the checkpoint root, and the checkpoint writer's helper process under stop signals.

Lock owners other than this process are real processes (a ``sleep`` child, alive or reaped), so liveness
is decided by ``/proc`` exactly as on a cluster node; Slurm's answer is stubbed where a test needs one.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from dataclasses import asdict, replace
from pathlib import Path

import pytest

from megatron_tropd import run_lock

REPO = Path(__file__).resolve().parents[1]
NO_SLURM: dict[str, str] = {}  # an environment without SLURM_JOB_ID


@pytest.fixture
def sleeper():
    """A live process of this host that is not this one."""
    process = subprocess.Popen(["sleep", "60"])
    yield process
    process.kill()
    process.wait()


def owner_of(pid: int, job_id: str | None = None) -> run_lock.LockOwner:
    """A lock owner for process ``pid`` of this host, read as the lock would record it."""
    me = run_lock.current_owner(NO_SLURM)
    return replace(me, pid=pid, pid_start=run_lock._pid_start(pid), job_id=job_id)


def write_lock(root: Path, owner: run_lock.LockOwner) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    path = root / run_lock.LOCK_NAME
    path.write_text(json.dumps(asdict(owner)) + "\n")
    return path


def lock_pid(path: Path) -> int:
    return json.loads(path.read_text())["pid"]


def test_live_lock_of_another_process_is_refused(tmp_path, sleeper):
    path = write_lock(tmp_path, owner_of(sleeper.pid))
    before = path.read_text()
    with pytest.raises(run_lock.RunLockError, match="in use by another live run") as error:
        run_lock.acquire(tmp_path, NO_SLURM)
    message = str(error.value)
    assert f"pid {sleeper.pid}" in message and socket.gethostname() in message
    assert "checkpoint.save_dir" in message and str(path) in message  # what to do about it
    assert path.read_text() == before  # the live job's lock is left alone


def test_lock_of_a_dead_process_is_taken_over_with_a_warning(tmp_path, caplog):
    process = subprocess.Popen(["sleep", "60"])
    dead = owner_of(process.pid)  # its start time, read while it runs
    process.kill()
    process.wait()
    path = write_lock(tmp_path, dead)
    with caplog.at_level(logging.WARNING, logger="megatron_tropd.run_lock"):
        assert run_lock.acquire(tmp_path, NO_SLURM) == path
    assert lock_pid(path) == os.getpid()
    assert f"process {dead.pid} on {dead.host} no longer runs" in caplog.text


def test_a_reused_pid_does_not_keep_a_lock(tmp_path, sleeper):
    """The lock's pid runs again, but started at another time: another process, so the lock is stale."""
    path = write_lock(tmp_path, replace(owner_of(sleeper.pid), pid_start="1"))
    run_lock.acquire(tmp_path, NO_SLURM)
    assert lock_pid(path) == os.getpid()


def test_the_same_slurm_job_takes_over_its_own_lock(tmp_path, sleeper, caplog):
    """A requeued job (same SLURM_JOB_ID) may start while its old lock's process still looks alive."""
    path = write_lock(tmp_path, owner_of(sleeper.pid, job_id="4242"))
    with caplog.at_level(logging.WARNING, logger="megatron_tropd.run_lock"):
        run_lock.acquire(tmp_path, {"SLURM_JOB_ID": "4242"})
    assert json.loads(path.read_text())["job_id"] == "4242" and lock_pid(path) == os.getpid()
    assert "this Slurm job's own lock" in caplog.text


@pytest.mark.parametrize(("state", "taken"), [("RUNNING", False), ("PENDING", False), ("", True)])
def test_another_slurm_job_keeps_its_lock_while_live(tmp_path, sleeper, monkeypatch, state, taken):
    monkeypatch.setattr(run_lock, "slurm_job_state", lambda job_id: state if job_id == "77" else None)
    path = write_lock(tmp_path, owner_of(sleeper.pid, job_id="77"))
    if taken:  # the job has left Slurm: its lock is stale even though a process with its pid runs here
        run_lock.acquire(tmp_path, {"SLURM_JOB_ID": "78"})
        assert lock_pid(path) == os.getpid()
    else:
        with pytest.raises(run_lock.RunLockError, match="Slurm job 77"):
            run_lock.acquire(tmp_path, {"SLURM_JOB_ID": "78"})


def test_release_removes_only_this_process_lock(tmp_path, sleeper):
    path = run_lock.acquire(tmp_path, NO_SLURM)
    assert lock_pid(path) == os.getpid()
    run_lock.release(path)
    assert not path.exists()
    # A lock another job took over meanwhile stays.
    write_lock(tmp_path, owner_of(sleeper.pid))
    run_lock.release(path)
    assert lock_pid(path) == sleeper.pid


def test_unwritable_root_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(run_lock.RunLockError, match="checkpoint.save_dir=.*choose a writable directory"):
        run_lock.acquire(blocker / "checkpoints", NO_SLURM)


def test_cli_exits_2_on_a_live_lock_before_training(tmp_path, sleeper):
    write_lock(tmp_path, owner_of(sleeper.pid))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RANK", "WORLD_SIZE"))}
    result = subprocess.run(
        [sys.executable, "-m", "megatron_tropd.train", "--recipe", "tiny_cpu",
         f"checkpoint.save_dir={tmp_path}"],
        capture_output=True, text=True, timeout=120, cwd=REPO, env=env,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("in use by another live run") == 1, result.stderr
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "metrics.jsonl").exists()


# Starts the checkpoint writer's helper (the Manager behind its results queue), prints its pid, and
# after the test signalled it, checks the queue still works. With "plain" a default Manager is used.
MANAGER_SCRIPT = textwrap.dedent(
    """
    import multiprocessing, sys
    from megatron.core.dist_checkpointing.strategies import filesystem_async
    if sys.argv[1] == "plain":
        manager = multiprocessing.get_context("spawn").Manager()
        filesystem_async._results_queue = manager.Queue()
    else:
        from megatron_tropd.checkpoint import signal_safe_save_strategy
        signal_safe_save_strategy()
    (helper,) = multiprocessing.active_children()
    print(helper.pid, flush=True)
    sys.stdin.readline()  # the test signals the helper now
    queue = filesystem_async._results_queue
    queue.put("written")
    print(queue.get(timeout=10), flush=True)
    """
)


def _signal_helper(kind: str) -> subprocess.CompletedProcess:
    process = subprocess.Popen(
        [sys.executable, "-c", MANAGER_SCRIPT, kind], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, cwd=REPO,
    )  # fmt: skip
    try:
        helper_pid = int(process.stdout.readline())
        for signum in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):  # what Slurm / Ctrl-C send
            os.kill(helper_pid, signum)
        time.sleep(0.5)
        stdout, stderr = process.communicate("go\n", timeout=60)
    finally:
        process.kill()
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def test_checkpoint_writer_helper_survives_stop_signals():
    """Slurm signals every process of a step: the helper must outlive the signal so the save completes."""
    result = _signal_helper("signal_safe")
    assert result.returncode == 0 and result.stdout.strip() == "written", result.stderr
    plain = _signal_helper("plain")  # the writer's default helper dies of the same signals
    assert plain.returncode != 0 and "written" not in plain.stdout


def _late_helper(held: bool) -> int:
    """Fork a helper that takes 0.5 s to reach ``ignore_stop_signals_in_helper`` and signal it at once,
    as Slurm may right after a save starts its writer; its exit status (0: it survived)."""
    from megatron_tropd.signals import ignore_stop_signals_in_helper, stop_signals_held

    def start() -> int:
        pid = os.fork()
        if pid == 0:  # the helper
            time.sleep(0.5)
            ignore_stop_signals_in_helper()
            time.sleep(0.2)  # a signal still pending when it was unblocked would end it here
            os._exit(0)
        return pid

    if held:
        with stop_signals_held():
            pid = start()
    else:
        pid = start()
    for signum in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        os.kill(pid, signum)
    return os.waitpid(pid, 0)[1]


def test_a_helper_started_with_the_stop_signals_held_survives_them_before_its_initializer():
    original = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        for signum in original:  # the default: what a helper has before its initializer ran
            signal.signal(signum, signal.SIG_DFL)
        assert _late_helper(held=True) == 0
        assert os.WIFSIGNALED(_late_helper(held=False))  # the race the hold closes
        assert not signal.pthread_sigmask(signal.SIG_BLOCK, [])  # this process's mask is restored
    finally:
        for signum, handler in original.items():
            signal.signal(signum, handler)
