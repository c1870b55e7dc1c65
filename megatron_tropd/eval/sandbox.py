"""Run an untrusted Python program against one stdin, with limits, and report what happened.

Each run gets its own process (``python -I -B``) in a fresh temporary directory. Layers, outermost first:

- **Resource limits** (``resource.setrlimit`` in the child before exec): CPU seconds, address space,
  number of processes (RLIMIT_NPROC), size of any written file, open files.
- **Unprivileged user.** Root ignores RLIMIT_NPROC, so when the evaluator runs as root the child drops
  to ``nobody`` (uid/gid 65534) before exec: the process cap then holds (a fork bomb is contained) and the
  file system's own permissions forbid writing outside world-writable places. RLIMIT_NPROC counts every
  process of that uid, so concurrent sandboxes share the cap. When not root, the cap is set to the user's
  current process count plus ``max_processes``.
- **No network.** As root the child enters a new, empty network namespace (``unshare(CLONE_NEWNET)``,
  the syscall behind ``unshare -n``) before dropping privileges: no interface but a down loopback.
  :func:`network_isolation` says which mechanism is active; the audit hook below denies socket creation
  in every case.
- **Audit hook** (``sys.addaudithook`` in a bootstrap that then runs the program; hooks cannot be
  removed): denies sockets, starting other programs (exec, system, subprocess: they would run without
  the hook), and writes / deletes / renames / mkdir / chmod outside the working directory.
  HOME and TMPDIR point into the working directory. An audit hook is not a security boundary on its own
  (ctypes can bypass it); the uid, rlimits and namespace are.
- **Wall time**: the child leads a new session; on timeout, and after every run, its whole process group
  is killed (``os.killpg``), which also reaps forked children left behind.
- **Output cap**: stdout/stderr go to files the parent opened (bounded by RLIMIT_FSIZE); only the first
  ``output_bytes`` are read back and a larger output is a failure.

Known gap: a child that calls ``setsid`` leaves the process group; it stays bounded by the CPU and
process limits but is not killed at the end of the run (a cgroup would close this).
"""

from __future__ import annotations

import ctypes
import os
import resource
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

SANDBOX_UID = 65534  # nobody
SANDBOX_GID = 65534  # nogroup
_CLONE_NEWNET = 0x40000000
_LIBC = ctypes.CDLL(None, use_errno=True)  # loaded in the parent: no dlopen between fork and exec

# Runs inside the child before the program: installs the audit hook, then executes the program as __main__.
_BOOTSTRAP = r"""
import os, runpy, sys
sys.dont_write_bytecode = True
_ROOT = os.path.realpath(os.getcwd())
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
_PATH_EVENTS = {"os.remove": 1, "os.rmdir": 1, "os.mkdir": 1, "os.chmod": 1, "os.chown": 1,
                "os.truncate": 1, "os.utime": 1, "os.rename": 2, "os.symlink": 2, "os.link": 2,
                "shutil.rmtree": 1, "shutil.move": 2, "shutil.copyfile": 2}

_DEVICES = {"/dev/null", "/dev/stdout", "/dev/stderr"}  # stdout/stderr are the parent's capped files

def _inside(path):
    if isinstance(path, int) or os.fsdecode(path) in _DEVICES:
        return True  # an already-open descriptor (its opening was checked) or a harmless device
    real = os.path.realpath(os.fsdecode(path))
    return real == _ROOT or real.startswith(_ROOT + os.sep)

def _deny(what):
    raise PermissionError("sandbox: " + what)

_EXEC_EVENTS = {"os.system", "os.exec", "os.posix_spawn", "os.spawn", "subprocess.Popen", "pty.spawn"}

def _hook(event, args):
    if event.startswith("socket."):
        _deny("network access is blocked (" + event + ")")
    if event in _EXEC_EVENTS:
        _deny("starting other programs is blocked (" + event + ")")
    if event == "open" and args[0] is not None:
        mode, flags = args[1] or "", args[2] or 0
        if (flags & _WRITE_FLAGS or any(c in mode for c in "wax+")) and not _inside(args[0]):
            _deny("write outside the working directory: %r" % (args[0],))
    elif event in _PATH_EVENTS:
        for path in args[: _PATH_EVENTS[event]]:
            if path is not None and not _inside(path):
                _deny("%s outside the working directory: %r" % (event, path))

sys.addaudithook(_hook)
program = sys.argv[1]
sys.argv = [program]
sys.path[:0] = [_ROOT]
runpy.run_path(program, run_name="__main__")
"""


@dataclass(frozen=True)
class SandboxLimits:
    """Per-run limits. Defaults suit competitive-programming tests (seconds, not minutes)."""

    cpu_seconds: int = 5
    """RLIMIT_CPU: CPU time of each process in the run."""
    wall_seconds: float = 10.0
    """Wall-clock limit; the process group is killed when it passes."""
    memory_bytes: int = 1 << 30
    """RLIMIT_AS: address space per process."""
    max_processes: int = 8
    """RLIMIT_NPROC: processes the sandbox uid may own (a fork bomb stops here)."""
    file_size_bytes: int = 16 << 20
    """RLIMIT_FSIZE: largest file any process may write (stdout/stderr files included)."""
    open_files: int = 64
    """RLIMIT_NOFILE."""
    output_bytes: int = 1 << 20
    """Largest stdout read back; more is a failure (``output_limit``)."""


@dataclass(frozen=True)
class RunResult:
    """What one run did. ``status`` is ok | timeout | runtime_error | output_limit | sandbox_error."""

    status: str
    returncode: int | None
    stdout: str
    stderr: str
    reason: str
    wall_seconds: float

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def _is_root() -> bool:
    return os.geteuid() == 0


@lru_cache(maxsize=1)
def _netns_works() -> bool:
    """Probe once whether this process may create a network namespace (root, no seccomp denial)."""
    if not _is_root():
        return False
    try:
        subprocess.run(["true"], preexec_fn=_enter_netns, check=True, capture_output=True, timeout=10)
    except (subprocess.SubprocessError, OSError):
        return False
    return True


def _enter_netns() -> None:
    if _LIBC.unshare(_CLONE_NEWNET) != 0:
        raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNET) failed")


def network_isolation() -> str:
    """Which network isolation is active: ``"netns+audit-hook"`` as root here, else ``"audit-hook"``."""
    return "netns+audit-hook" if _netns_works() else "audit-hook"


def _world_executable(path: str) -> bool:
    """True when the unprivileged uid can run ``path`` (it and every parent directory are o+x)."""
    real = Path(os.path.realpath(path))
    try:
        return all(p.stat().st_mode & stat.S_IXOTH for p in [real, *real.parents])
    except OSError:
        return False


@lru_cache(maxsize=1)
def default_python() -> str:
    """The interpreter for programs: ours, unless the sandbox uid cannot reach it (e.g. under /root)."""
    candidates = [sys.executable, "/usr/bin/python3", "/usr/local/bin/python3"]
    if not _is_root():
        return sys.executable
    for candidate in candidates:
        if os.path.exists(candidate) and _world_executable(candidate):
            return candidate
    raise RuntimeError(f"no python3 runnable by uid {SANDBOX_UID}; tried {candidates}")


def _processes_of_uid(uid: int) -> int:
    count = 0
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and entry.stat().st_uid == uid:
                count += 1
        except OSError:
            continue
    return count


def _make_preexec(limits: SandboxLimits, use_netns: bool, drop_to_nobody: bool):
    """The function the child runs between fork and exec: limits, then namespace, then uid drop."""
    nproc = limits.max_processes if drop_to_nobody else _processes_of_uid(os.getuid()) + limits.max_processes

    def preexec() -> None:
        cpu = limits.cpu_seconds
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
        resource.setrlimit(resource.RLIMIT_AS, (limits.memory_bytes, limits.memory_bytes))
        resource.setrlimit(resource.RLIMIT_FSIZE, (limits.file_size_bytes, limits.file_size_bytes))
        resource.setrlimit(resource.RLIMIT_NOFILE, (limits.open_files, limits.open_files))
        resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        if use_netns:
            _enter_netns()
        if drop_to_nobody:
            os.setgroups([])
            os.setgid(SANDBOX_GID)
            os.setuid(SANDBOX_UID)

    return preexec


def _read_capped(path: Path, cap: int) -> tuple[str, bool]:
    with open(path, "rb") as handle:
        data = handle.read(cap + 1)
    return data[:cap].decode("utf-8", errors="replace"), len(data) > cap


def _classify(returncode: int | None, timed_out: bool, too_long: bool, stderr: str) -> tuple[str, str]:
    """Map how the child ended to (status, reason)."""
    if timed_out:
        return "timeout", "wall-clock limit exceeded; process group killed"
    if too_long:
        return "output_limit", "stdout exceeded the output cap"
    if returncode == 0:
        return "ok", ""
    if returncode is not None and returncode < 0:
        name = signal.Signals(-returncode).name
        hint = {
            "SIGXCPU": "CPU time limit",
            "SIGKILL": "killed (CPU or memory limit)",
            "SIGXFSZ": "file size limit",
        }.get(name, "signal")
        return "runtime_error", f"killed by {name} ({hint})"
    last = stderr.strip().splitlines()[-1] if stderr.strip() else ""
    return "runtime_error", f"exit status {returncode}: {last}"[:500]


def _prepare_dirs(source: str, stdin: str, drop_to_nobody: bool) -> tuple[Path, Path]:
    """outer/ (root-owned: bootstrap, stdio files) and outer/work/ (the program's cwd, owned by it)."""
    outer = Path(tempfile.mkdtemp(prefix="tropd-sandbox-"))
    outer.chmod(0o711)
    work = outer / "work"
    work.mkdir(mode=0o700)
    (outer / "bootstrap.py").write_text(_BOOTSTRAP, encoding="utf-8")
    (outer / "bootstrap.py").chmod(0o644)
    (work / "main.py").write_text(source, encoding="utf-8")
    (outer / "stdin").write_text(stdin, encoding="utf-8")
    for output in ("stdout", "stderr"):
        (outer / output).touch()
    if drop_to_nobody:  # the program's own files, so reopening /dev/stdout works too
        for path in (work, work / "main.py", outer / "stdout", outer / "stderr"):
            os.chown(path, SANDBOX_UID, SANDBOX_GID)
    return outer, work


def _live_members(pgid: int) -> int:
    """Processes of the group that are not zombies (a zombie holds no resources; init reaps it)."""
    count = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        count += int(fields[2]) == pgid and fields[0] != "Z"  # fields: state, ppid, pgrp, ...
    return count


def _kill_group(pgid: int, grace_seconds: float = 2.0) -> None:
    """SIGKILL the group, then wait (bounded) until no member is alive, so no run outlives its call."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        return  # nothing left in the group
    deadline = time.monotonic() + grace_seconds
    while _live_members(pgid) and time.monotonic() < deadline:
        time.sleep(0.01)


def run_program(source: str, stdin: str = "", limits: SandboxLimits | None = None) -> RunResult:
    """Run ``source`` as a Python program with ``stdin``; never raises for anything the program does."""
    limits = limits or SandboxLimits()
    drop = _is_root()
    outer, work = _prepare_dirs(source, stdin, drop)
    env = {"HOME": str(work), "TMPDIR": str(work), "PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}
    command = [default_python(), "-I", "-B", str(outer / "bootstrap.py"), str(work / "main.py")]
    start = time.monotonic()
    try:
        with (
            open(outer / "stdin", "rb") as fin,
            open(outer / "stdout", "wb") as fout,
            open(outer / "stderr", "wb") as ferr,
        ):
            process = subprocess.Popen(
                command,
                stdin=fin,
                stdout=fout,
                stderr=ferr,
                cwd=work,
                env=env,
                close_fds=True,
                start_new_session=True,
                preexec_fn=_make_preexec(limits, _netns_works(), drop),
            )
            timed_out = False
            try:
                process.wait(timeout=limits.wall_seconds)
            except subprocess.TimeoutExpired:
                timed_out = True
            _kill_group(process.pid)  # also reaps children the program left running
            process.wait()
        stdout, too_long = _read_capped(outer / "stdout", limits.output_bytes)
        stderr, _ = _read_capped(outer / "stderr", 64 << 10)
        status, reason = _classify(process.returncode, timed_out, too_long, stderr)
        return RunResult(status, process.returncode, stdout, stderr, reason, time.monotonic() - start)
    except (OSError, subprocess.SubprocessError) as error:
        return RunResult("sandbox_error", None, "", "", f"could not run: {error}", time.monotonic() - start)
    finally:
        shutil.rmtree(outer, ignore_errors=True)
