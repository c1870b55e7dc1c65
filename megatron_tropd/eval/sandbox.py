"""Run an untrusted Python program against one stdin, with limits, and report what happened.

Each run gets its own process (``python -I -B``) in a fresh temporary directory. :func:`isolation` says
which of the layers below this machine supports (probed once per process); the README's sandbox
paragraph summarises them. Layers, outermost first:

- **A uid of its own per run** (when the evaluator is root). Each run leases a uid from
  ``SANDBOX_UID_BASE`` (90000: above the regular users of login.defs, UID_MAX 60000, and below the
  subordinate ranges of rootless containers, SUB_UID_MIN 100000; ``TROPD_SANDBOX_UID_BASE`` moves the
  range) through ``SANDBOX_UID_COUNT`` uids, or from 64508..65531 in a user namespace that maps only
  the first 65536 uids (a rootless container); each uid is locked by ``flock`` on a file of its own under
  ``/tmp/tropd-sandbox-uids``, so the threads and processes of one machine (every local rank checks code
  at once) never share a uid. A uid with a passwd or group entry, or with a live process, is skipped;
  dead but unreaped processes of the uid are added to its process cap.
  Because the uid is private to the run, RLIMIT_NPROC caps this run alone (a fork bomb does not starve
  the runs graded next to it), and at the end every process of that uid is killed (``kill(-1, SIGKILL)``
  sent as that uid), children that called ``setsid`` included. Runs cannot signal or read each other.
- **Private root** (root, mount namespaces allowed, and the program runs with a uid other than 0,
  which could leave a chroot). The child enters new mount and IPC namespaces
  (mount propagation private) and is moved into a minimal root built on a tmpfs: read-only, nosuid bind
  mounts of ``/usr``, ``/bin``, ``/sbin``, ``/lib*``, the dynamic loader's files and ``/etc/python3*``
  from ``/etc``, and the interpreter's prefixes (``sys.prefix``, ``sys.base_prefix`` when it is our
  interpreter); the run's own directory, read-write, at its host path; a fresh tmpfs on ``/tmp`` and on
  ``/dev/shm`` (each the size of RLIMIT_FSIZE, gone when the run ends); ``/dev`` with null, zero, full,
  random and urandom only; and a ``/proc``: a fresh one with ``hidepid=invisible`` where the kernel has
  it (Linux 5.8; only the run's own processes are listed), else a fresh one, else (a user namespace
  without its own pid namespace) the host's, bound. Everything else of the host (``/home``, ``/root``,
  ``/work``, ``/srv``, ``/opt``, ``/var``, ``/mnt``, the rest of ``/etc``, other runs' directories,
  devices such as GPUs) does not exist for the program, whatever it calls (ctypes included).
- **No network.** As root the child also enters a new, empty network namespace (``unshare(CLONE_NEWNET)``,
  the syscall behind ``unshare -n``): no interface but a down loopback. The audit hook below denies
  socket creation in every case.
- **bubblewrap** (``bwrap``), when it is on PATH and a probe run under it works; ``TROPD_SANDBOX_ISOLATION``
  chooses: ``auto`` (the default) uses it then, ``bwrap`` requires it (:func:`isolation` raises where it
  cannot run), ``builtin`` never uses it. After the layers above and the drop to the run's uid the child
  executes ``bwrap``, which starts the program in new user (the uid mapped to itself, no capabilities, no
  further user namespaces where bwrap has ``--disable-userns``), pid (``/proc`` lists the run alone),
  network (a down loopback), IPC and UTS namespaces, on a root of its own: the same read-only system and
  interpreter directories, the run's directory read-only except its working directory, a private ``/tmp``
  and ``/dev/shm`` (each the size of RLIMIT_FSIZE), the same five devices, ``/`` and ``/dev`` read-only;
  it dies with its parent. Running as the run's uid keeps that uid's process cap (bwrap's own processes
  and a small reaper that collects bwrap's exited init are added to it) and the kill at the end; bwrap
  reports a program killed by a signal as exit status 128 + the signal, which is read back as that
  signal. Each run takes some 30 ms longer. It needs unprivileged user namespaces, and it holds
  where the layers above are missing: without root or mount namespaces the program still has no network,
  no host files beyond the system's and a private ``/tmp``. Where bwrap is installed but its probe fails,
  a warning says why, once, and the other layers run alone (:attr:`Isolation.note` says why).
- **Resource limits** (``resource.setrlimit`` in the child before exec): CPU seconds, address space,
  number of processes (RLIMIT_NPROC; threads count), size of any written file, open files. Root ignores
  RLIMIT_NPROC, which is one more reason the child never keeps uid 0.
- **Audit hook** (``sys.addaudithook`` in a bootstrap that then runs the program; hooks cannot be
  removed): denies sockets, starting other programs (exec, system, subprocess: they would run without
  the hook), and writes / deletes / renames / mkdir / chmod outside the working directory.
  HOME and TMPDIR point into the working directory. An audit hook is not a security boundary on its own
  (ctypes can bypass it); the uid, rlimits and namespaces are.
- **Wall time**: the child leads a new session; on timeout, and after every run, the run's processes are
  killed (every process of its uid as root, its process group otherwise).
- **Output cap**: stdout/stderr go to files the parent opened (bounded by RLIMIT_FSIZE); only the first
  ``output_bytes`` are read back and a larger output is a failure.

Where a layer is missing (reported by :func:`isolation`):

- Root without mount namespaces (e.g. a container without CAP_SYS_ADMIN): the per-run uid still holds,
  but the program sees the host file system: it can read world-readable host files and, through ctypes,
  write to world-writable directories; entries it leaves in ``/tmp``, ``/var/tmp`` and ``/dev/shm`` are
  removed after the run.
- Root where the per-run range cannot be used (a user namespace that maps fewer uids): every run
  shares ``nobody`` (65534), as do their process cap and their files; only the process group is killed.
  If even ``nobody`` is unmapped the program keeps the evaluator's uid, as without root.
- Not root: the program runs as the evaluator's own user. RLIMIT_NPROC is set to that user's process
  count plus ``max_processes``, so concurrent runs and the user's other processes share one budget; only
  the process group is killed at the end (a child that calls ``setsid`` outlives the run, bounded by
  its CPU limit, unless bwrap runs: its pid namespace ends with the run); without bwrap the file system
  and the network are the host's, guarded by the audit hook only.

Remaining limits, even with every layer: the uid lease is coordinated through ``/tmp`` on one machine
(sandboxes in separate containers that share a kernel and its uids need distinct
``TROPD_SANDBOX_UID_BASE`` ranges); wall time is per run, not a CPU share; memory is per process
(RLIMIT_AS), so up to ``max_processes`` times ``memory_bytes`` plus the two scratch tmpfs per run; the
program can read the interpreter's installation (its site-packages included) and the system directories
listed above; and through ctypes it can still ``execve`` the system's programs, which then run without
the audit hook but with the same uid, limits and namespaces (nosuid mounts: no setuid escalation).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import glob
import grp
import logging
import os
import pwd
import resource
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, replace
from functools import cache, lru_cache
from pathlib import Path

logger = logging.getLogger(__name__)

SANDBOX_UID_BASE = 90000
SANDBOX_UID_COUNT = 1024
SANDBOX_UID = 65534  # nobody: shared by all runs only where the per-run range is unusable
_LOW_UID_BASE = SANDBOX_UID - 2 - SANDBOX_UID_COUNT  # 64508..65531, below nobody and nogroup (65534)
_UID_BASE_ENV = "TROPD_SANDBOX_UID_BASE"
_MODE_ENV = "TROPD_SANDBOX_ISOLATION"
_MODES = ("auto", "bwrap", "builtin")
_BWRAP_PROCESSES = 3  # _REAPER, bwrap, and bwrap's init (pid 1 of the run's pid namespace)
_SIGNAL_NUMBERS = frozenset(int(s) for s in signal.Signals)
# A fixed path, not TMPDIR: every process of the machine that runs sandboxes must see the same locks.
_LEASE_DIR = Path("/tmp/tropd-sandbox-uids")

_CLONE_NEWNS = 0x00020000
_CLONE_NEWIPC = 0x08000000
_CLONE_NEWNET = 0x40000000
_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_NOEXEC = 1, 2, 4, 8
_MS_REMOUNT, _MS_BIND, _MS_MOVE, _MS_REC, _MS_PRIVATE = 32, 4096, 8192, 16384, 1 << 18
_MS_NOATIME, _MS_NODIRATIME, _MS_RELATIME = 1024, 2048, 1 << 21
# statvfs flag -> mount flag, for the flags a bind remount may not drop inside a user namespace.
_LOCKED_FLAGS = (
    (os.ST_NOEXEC, _MS_NOEXEC),
    (os.ST_NOATIME, _MS_NOATIME),
    (os.ST_NODIRATIME, _MS_NODIRATIME),
    (os.ST_RELATIME, _MS_RELATIME),
)
# How a private root gets its /proc, in order of preference: a fresh one listing only the run's own
# processes (Linux 5.8), a fresh one, or (in a user namespace without its own pid namespace) the host's.
_PROC_MODES = ("hidepid", "fresh", "host")

_LIBC = ctypes.CDLL(None, use_errno=True)  # loaded in the parent: no dlopen between fork and exec
_LIBC.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]

# Host paths bound read-only into the private root (those that exist; symlinks are copied as symlinks).
_SYSTEM_PATHS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
_ETC_PATHS = ("/etc/ld.so.cache", "/etc/ld.so.conf", "/etc/ld.so.conf.d", "/etc/localtime")
_DEVICE_NODES = ("null", "zero", "full", "random", "urandom")
_DEVICE_LINKS = (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"))
_DEVICE_LINKS += (("stderr", "/proc/self/fd/2"),)

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


# Starts bwrap (argv[1:]) and reaps every process orphaned to it: bwrap exits as soon as the program has,
# before its init (pid 1 of the run's pid namespace) is reaped, which then falls to the system's init, and
# not every container's init reaps. Exits with bwrap's status.
_REAPER = r"""
import ctypes, os, sys
ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
child, code = os.posix_spawn(sys.argv[1], sys.argv[1:], os.environ), 1
while True:
    try:
        pid, status = os.wait()
    except ChildProcessError:
        break
    if pid == child:
        code = os.waitstatus_to_exitcode(status)
os._exit(code if code >= 0 else 128 - code)
"""


@dataclass(frozen=True)
class SandboxLimits:
    """Per-run limits. Defaults suit competitive-programming tests (seconds, not minutes)."""

    cpu_seconds: int = 5
    """RLIMIT_CPU: CPU time of each process in the run."""
    wall_seconds: float = 10.0
    """Wall-clock limit; the run's processes are killed when it passes."""
    memory_bytes: int = 1 << 30
    """RLIMIT_AS: address space per process."""
    max_processes: int = 8
    """RLIMIT_NPROC: processes (threads count) the run may have; per run when the evaluator is root."""
    file_size_bytes: int = 16 << 20
    """RLIMIT_FSIZE: largest file any process may write (stdout/stderr files included); also the size of
    the private ``/tmp`` and ``/dev/shm``."""
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


@dataclass(frozen=True)
class Isolation:
    """Which isolation layers this process uses for every run (see the module docstring)."""

    per_run_uid: bool
    """Each run has a uid of its own: a process cap per run; every process of the run killed at its end."""
    network_namespace: bool
    """Each run has an empty network namespace."""
    private_root: bool
    """Each run sees a minimal root: private /tmp and /dev/shm, no host directories beyond the system's."""
    hidden_processes: bool
    """The run's /proc lists only its own processes."""
    note: str = ""
    """Why a layer is off, when one is."""
    shared_uid: int | None = None
    """Root without usable per-run uids: the one unprivileged uid (nobody) every run shares."""
    bwrap: bool = False
    """Each program runs under bubblewrap: its own user, pid, network and IPC namespaces, a read-only root
    of the system and Python directories, a private /tmp and /dev/shm."""

    @property
    def mechanisms(self) -> str:
        """The active layers, e.g. ``per-run-uid+netns+private-root+hidepid+bwrap+audit-hook``."""
        names = ["per-run-uid", "shared-uid", "netns", "private-root", "hidepid", "bwrap"]
        flags = [self.per_run_uid, self.shared_uid is not None, self.network_namespace]
        flags += [self.private_root, self.hidden_processes, self.bwrap]
        return "+".join([name for name, on in zip(names, flags, strict=True) if on] + ["audit-hook"])


def _is_root() -> bool:
    return os.geteuid() == 0


# ------------------------------------------------------------------------------ isolation probes

_ISOLATION_LOCK = threading.Lock()


@dataclass(frozen=True)
class _Probe:
    layers: Isolation
    proc_mode: str
    """How the private root gets its /proc: one of ``_PROC_MODES``; '' without a private root."""
    uid_base: int
    """The first uid of the per-run range in use."""
    bwrap: tuple[str, ...] = ()
    """The bwrap executable and the options of its version that runs add; empty without bwrap."""


def isolation() -> Isolation:
    """The layers every run uses here; probed once per process (a few short child processes)."""
    return _probed().layers


def sandbox_uids() -> range:
    """The uids runs are leased from here (empty without per-run uids)."""
    probe = _probed()
    return range(probe.uid_base, probe.uid_base + SANDBOX_UID_COUNT) if probe.layers.per_run_uid else range(0)


def _probed() -> _Probe:
    with _ISOLATION_LOCK:  # concurrent first runs wait for one probe instead of each probing
        return _with_bwrap(_probe_isolation(), isolation_mode(), shutil.which("bwrap") or "")


def isolation_mode() -> str:
    """``TROPD_SANDBOX_ISOLATION``: ``auto`` (default: bwrap when it runs here), ``bwrap`` (required) or
    ``builtin`` (never bwrap)."""
    mode = os.environ.get(_MODE_ENV, "auto").strip().lower() or "auto"
    if mode not in _MODES:
        raise ValueError(f"{_MODE_ENV}={mode!r}: expected one of {', '.join(_MODES)}")
    return mode


def network_isolation() -> str:
    """Which network isolation is active: ``"netns+audit-hook"`` as root or under bwrap, else
    ``"audit-hook"``."""
    layers = isolation()
    return "netns+audit-hook" if layers.network_namespace or layers.bwrap else "audit-hook"


@lru_cache(maxsize=1)
def _probe_isolation() -> _Probe:
    if not _is_root():
        layers = Isolation(False, False, False, False, "not root: the evaluator's uid, no private root")
        return _Probe(layers, "", 0)
    notes = []
    bases = _uid_bases()
    base = next((b for b in bases if _can_become(b) and _can_become(b + SANDBOX_UID_COUNT - 1)), None)
    per_run_uid, shared_uid = base is not None, None
    if base is None:  # e.g. a user namespace that maps only some uids
        shared_uid = SANDBOX_UID if _can_become(SANDBOX_UID) else None
        fallback = f"all runs share uid {shared_uid}" if shared_uid is not None else "runs keep uid 0"
        tried = ", ".join(f"{b}..{b + SANDBOX_UID_COUNT - 1}" for b in bases)
        notes.append(f"uids {tried} unusable here, {fallback}")
    netns = _probe_unshare(_CLONE_NEWNET)
    proc_mode, error = "", "a program keeping uid 0 could leave a chroot"
    if per_run_uid or shared_uid is not None:
        for mode in _PROC_MODES:  # the first that works: hidepid=invisible needs Linux 5.8
            error = _probe_private_root(mode)
            if not error:
                proc_mode = mode
                break
    if not proc_mode:
        logger.warning(
            "sandbox: no private root, programs see the host file system unless bwrap runs (%s)", error
        )
        notes.append(f"private root unavailable: {error}")
    layers = Isolation(
        per_run_uid, netns, bool(proc_mode), proc_mode == "hidepid", "; ".join(notes), shared_uid
    )
    return _Probe(layers, proc_mode, base or 0)


@lru_cache(maxsize=8)
def _with_bwrap(probe: _Probe, mode: str, bwrap: str) -> _Probe:
    """``probe`` with the bwrap layer on where ``mode`` asks for it and a run under bwrap works here."""
    if mode == "builtin":
        return probe
    prefix = (bwrap, *_bwrap_extras(bwrap)) if bwrap else ()
    error = _probe_bwrap(probe, prefix) if bwrap else "bwrap is not on PATH"
    if not error:
        return replace(probe, layers=replace(probe.layers, bwrap=True), bwrap=prefix)
    if mode == "bwrap":
        raise RuntimeError(f"sandbox: {_MODE_ENV}=bwrap, but bwrap cannot run programs here: {error}")
    if bwrap:  # installed but refused (e.g. no user namespaces): say why, once
        logger.warning("sandbox: bwrap is installed but cannot run programs here, not using it (%s)", error)
    note = "; ".join(filter(None, [probe.layers.note, f"no bwrap: {error}"]))
    return replace(probe, layers=replace(probe.layers, note=note))


def _probe_bwrap(probe: _Probe, prefix: tuple[str, ...]) -> str:
    """Run a short program under bwrap the way every run goes; '' when it worked, else what went wrong."""
    layers = replace(probe.layers, bwrap=True)
    limits = SandboxLimits(wall_seconds=30.0)
    try:
        result = _run_source("print('ok')", "", limits, layers, replace(probe, bwrap=prefix))
    except (OSError, subprocess.SubprocessError) as error:
        return str(error)
    if result.ok and result.stdout == "ok\n":
        return ""
    detail = result.stderr.strip()[-300:]
    return f"{result.reason} ({detail})" if detail and detail not in result.reason else result.reason


@lru_cache(maxsize=4)
def _bwrap_extras(bwrap: str) -> tuple[str, ...]:
    """Options that not every bwrap has: ``--disable-userns`` (0.8) keeps the program from making user
    namespaces of its own."""
    try:
        usage = subprocess.run([bwrap, "--help"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return ()
    return ("--disable-userns",) if "--disable-userns" in usage else ()


def _can_become(uid: int) -> bool:
    """Whether a child can switch to ``uid`` (a user namespace may map only part of the uid range)."""
    try:
        subprocess.run(
            ["true"], user=uid, group=uid, extra_groups=[], check=True, capture_output=True, timeout=10
        )
    except (subprocess.SubprocessError, OSError):
        return False
    return True


def _probe_unshare(flags: int) -> bool:
    try:
        preexec = lambda: _unshare(flags)  # noqa: E731
        subprocess.run(["true"], preexec_fn=preexec, check=True, capture_output=True, timeout=10)
    except (subprocess.SubprocessError, OSError):
        return False
    return True


def _probe_private_root(proc_mode: str) -> str:
    """Run the interpreter in a private root once; '' when it worked, else what went wrong."""
    outer = Path(tempfile.mkdtemp(prefix="tropd-sandbox-probe-"))
    try:
        outer.chmod(0o711)
        work = outer / "work"
        work.mkdir()
        (outer / "root").mkdir()
        plan = _root_plan(outer, work, 1 << 20, proc_mode)
        with open(outer / "stderr", "wb") as errors:
            subprocess.run(
                [default_python(), "-I", "-B", "-c", "open('probe', 'w').write('ok')"],
                cwd=work,
                env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=errors,
                preexec_fn=_reporting(lambda: _isolate(_CLONE_NEWNS | _CLONE_NEWIPC, plan)),
                check=True,
                timeout=30,
            )
        if (work / "probe").read_text() != "ok":
            return "the probe's file did not reach its working directory"
        return ""
    except (subprocess.SubprocessError, OSError, RuntimeError) as error:
        detail = (outer / "stderr").read_text(errors="replace").strip()[-300:] if outer.exists() else ""
        return f"{error} {detail}".strip()
    finally:
        shutil.rmtree(outer, ignore_errors=True)


# ------------------------------------------------------------------------------ interpreter


def _world_executable(path: str) -> bool:
    """True when an unprivileged uid can run ``path`` (it and every parent directory are o+x)."""
    real = Path(os.path.realpath(path))
    try:
        return all(p.stat().st_mode & stat.S_IXOTH for p in [real, *real.parents])
    except OSError:
        return False


@lru_cache(maxsize=1)
def default_python() -> str:
    """The interpreter for programs: ours, unless an unprivileged uid cannot reach it (e.g. under /root)."""
    candidates = [sys.executable, "/usr/bin/python3", "/usr/local/bin/python3"]
    if not _is_root():
        return sys.executable
    for candidate in candidates:
        if os.path.exists(candidate) and _world_executable(candidate):
            return candidate
    raise RuntimeError(f"no python3 runnable by an unprivileged uid; tried {candidates}")


def _python_prefixes(python: str) -> set[str]:
    """Directories the interpreter needs: its prefix (a venv's too), and ours when it is our interpreter."""
    exe, real = os.path.abspath(python), os.path.realpath(python)
    prefixes = {os.path.dirname(os.path.dirname(exe)), os.path.dirname(os.path.dirname(real))}
    if real == os.path.realpath(sys.executable):
        prefixes |= {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}
    return {prefix for prefix in prefixes if prefix != "/"}


def _under(path: str, parent: str) -> bool:
    return path == parent or path.startswith(parent.rstrip("/") + "/")


def _kept_flags(path: str) -> int:
    """Flags of the mount holding ``path`` that a bind remount must repeat (a user namespace locks them)."""
    flags = os.statvfs(path).f_flag
    return sum(ms_flag for st_flag, ms_flag in _LOCKED_FLAGS if flags & st_flag)


@lru_cache(maxsize=4)
def _read_only_binds(python: str) -> tuple[tuple[str, int], ...]:
    """(host path, its kept flags) bound into the private root; symlinks are copied (flags 0)."""
    return tuple(
        (path, 0 if os.path.islink(path) else _kept_flags(path)) for path in _read_only_paths(python)
    )


def _read_only_paths(python: str) -> list[str]:
    """Host paths bound into the private root, each once (a path inside an earlier one is skipped)."""
    wanted = [*_SYSTEM_PATHS, *_ETC_PATHS, *sorted(glob.glob("/etc/python3*"))]
    wanted += sorted(_python_prefixes(python))
    kept: list[str] = []
    for path in wanted:
        if not os.path.lexists(path) or any(_under(path, k) for k in kept):
            continue
        # A symlink (merged /usr: /bin -> usr/bin) is copied as a link; a directory is bound unless its
        # real location already is.
        real, bound = os.path.realpath(path), [os.path.realpath(k) for k in kept if not os.path.islink(k)]
        if os.path.islink(path) or not any(_under(real, k) for k in bound):
            kept.append(path)
    return kept


def _bwrap_arguments(outer: Path, work: Path, scratch_bytes: int) -> list[str]:
    """bwrap's options for one run: new namespaces, then the same minimal root as the private root, with
    the run's directory read-only but for its working directory, and ``/`` and ``/dev`` read-only."""
    args = ["--unshare-user", "--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts"]
    args += ["--unshare-cgroup-try", "--die-with-parent", "--cap-drop", "ALL"]
    args += ["--size", str(scratch_bytes), "--tmpfs", "/tmp", "--tmpfs", "/dev"]
    for name in _DEVICE_NODES:
        if os.path.exists("/dev/" + name):
            args += ["--dev-bind", "/dev/" + name, "/dev/" + name]
    for name, target in _DEVICE_LINKS:
        args += ["--symlink", target, "/dev/" + name]
    args += ["--size", str(scratch_bytes), "--tmpfs", "/dev/shm", "--remount-ro", "/dev", "--proc", "/proc"]
    for path in _read_only_paths(default_python()):
        args += ["--symlink", os.readlink(path), path] if os.path.islink(path) else ["--ro-bind", path, path]
    args += ["--ro-bind", str(outer), str(outer), "--bind", str(work), str(work)]
    return [*args, "--remount-ro", "/", "--chdir", str(work)]


def _unwrapped_returncode(returncode: int) -> int:
    """bwrap exits with 128 + the number of the signal that ended the program, as a shell reports it:
    report the signal, as a direct child's status would (a program's own exit status above 128 reads as
    that signal too)."""
    return 128 - returncode if returncode - 128 in _SIGNAL_NUMBERS else returncode


# ------------------------------------------------------------------------------ in the child (fork..exec)
# These run between fork and exec: no imports, no logging, nothing that takes a lock another thread holds.


@dataclass(frozen=True)
class _RootPlan:
    new_root: str
    """An empty directory of the host that becomes the run's /."""
    outer: str
    """The run's directory, bound read-write at the same path."""
    work: str
    """The program's working directory."""
    scratch: bytes
    """tmpfs options of the private /tmp and /dev/shm."""
    proc: str
    """How the run's /proc is made: one of ``_PROC_MODES``."""
    read_only: tuple[tuple[str, int], ...]
    """Host paths bound read-only at their own path, with the flags their mount must keep."""
    outer_flags: int
    """The flags the mount holding the run's directory must keep."""


def _unshare(flags: int) -> None:
    if _LIBC.unshare(flags) != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"unshare({flags:#x}): {os.strerror(code)}")


def _mount(
    source: bytes | None, target: str, fstype: bytes | None, flags: int, data: bytes | None = None
) -> None:
    if _LIBC.mount(source, os.fsencode(target), fstype, flags, data) != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"mount {target}: {os.strerror(code)}")


def _touch(path: str, mode: int) -> None:
    os.close(os.open(path, os.O_CREAT | os.O_WRONLY, mode))


def _bind_read_only(path: str, kept_flags: int, new_root: str) -> None:
    target = new_root + path
    os.makedirs(os.path.dirname(target), exist_ok=True)
    if os.path.islink(path):
        os.symlink(os.readlink(path), target)
        return
    if os.path.isdir(path):
        os.makedirs(target, exist_ok=True)
    else:
        _touch(target, 0o644)
    _mount(os.fsencode(path), target, None, _MS_BIND | _MS_REC)
    _mount(None, target, None, _MS_REMOUNT | _MS_BIND | _MS_RDONLY | _MS_NOSUID | _MS_NODEV | kept_flags)


def _mount_proc(target: str, mode: str) -> None:
    if mode == "host":  # a user namespace may not mount the proc of a pid namespace it does not own
        _mount(b"/proc", target, None, _MS_BIND | _MS_REC)
        return
    options = b"hidepid=invisible" if mode == "hidepid" else None
    _mount(b"proc", target, b"proc", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC, options)


def _make_dev(new_root: str, scratch: bytes) -> None:
    dev = new_root + "/dev"
    os.mkdir(dev)
    _mount(b"tmpfs", dev, b"tmpfs", _MS_NOSUID | _MS_NOEXEC, b"size=64k,mode=755")
    for name in _DEVICE_NODES:
        if os.path.exists("/dev/" + name):
            _touch(f"{dev}/{name}", 0o666)
            _mount(os.fsencode("/dev/" + name), f"{dev}/{name}", None, _MS_BIND)
    for name, target in _DEVICE_LINKS:
        os.symlink(target, f"{dev}/{name}")
    os.mkdir(dev + "/shm")
    _mount(b"tmpfs", dev + "/shm", b"tmpfs", _MS_NOSUID | _MS_NODEV, scratch)


def _enter_private_root(plan: _RootPlan) -> None:
    """Build the minimal root on a tmpfs at ``plan.new_root`` and move the process into it."""
    os.umask(0o022)  # directories made here must be traversable by the run's uid
    _mount(None, "/", None, _MS_REC | _MS_PRIVATE)  # nothing done below propagates to the host
    root = plan.new_root
    _mount(b"tmpfs", root, b"tmpfs", _MS_NOSUID | _MS_NODEV, b"size=1m,nr_inodes=4096,mode=755")
    os.mkdir(root + "/tmp")
    _mount(b"tmpfs", root + "/tmp", b"tmpfs", _MS_NOSUID | _MS_NODEV, plan.scratch)
    _make_dev(root, plan.scratch)
    os.mkdir(root + "/proc")
    _mount_proc(root + "/proc", plan.proc)
    for path, kept_flags in plan.read_only:
        _bind_read_only(path, kept_flags, root)
    os.makedirs(root + plan.outer, exist_ok=True)
    _mount(os.fsencode(plan.outer), root + plan.outer, None, _MS_BIND)
    outer_flags = _MS_REMOUNT | _MS_BIND | _MS_NOSUID | _MS_NODEV | plan.outer_flags
    _mount(None, root + plan.outer, None, outer_flags)
    os.chdir(root)
    _mount(b".", "/", None, _MS_MOVE)  # the new root covers the host's; chroot makes it the process's /
    os.chroot(".")
    os.chdir(plan.work)  # the cwd set by Popen pointed into the host's tree


def _isolate(flags: int, plan: _RootPlan | None) -> None:
    if flags:
        _unshare(flags)
    if plan is not None:
        _enter_private_root(plan)


def _set_limits(limits: SandboxLimits, nproc: int) -> None:
    cpu = limits.cpu_seconds
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    resource.setrlimit(resource.RLIMIT_AS, (limits.memory_bytes, limits.memory_bytes))
    resource.setrlimit(resource.RLIMIT_FSIZE, (limits.file_size_bytes, limits.file_size_bytes))
    resource.setrlimit(resource.RLIMIT_NOFILE, (limits.open_files, limits.open_files))
    resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def _make_preexec(limits: SandboxLimits, flags: int, plan: _RootPlan | None, uid: int | None, nproc: int):
    """The function the child runs between fork and exec: namespaces and root, then limits, then uid.

    The root is built before the limits (RLIMIT_NOFILE / RLIMIT_AS would constrain the set-up) and the
    uid is dropped last (mounting needs root). A failure is written to the run's stderr file, which the
    parent reads into the reason."""

    def preexec() -> None:
        _isolate(flags, plan)
        _set_limits(limits, nproc)
        if uid is not None:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)

    return _reporting(preexec)


def _reporting(step: Callable[[], None]) -> Callable[[], None]:
    """``step``, writing its failure to stderr first: subprocess only says that the child's set-up failed."""

    def run() -> None:
        try:
            step()
        except BaseException as error:
            os.write(2, f"sandbox set-up failed: {type(error).__name__}: {error}\n".encode())
            raise

    return run


# ------------------------------------------------------------------------------ uids and processes


@dataclass(frozen=True)
class _Lease:
    uid: int
    fd: int
    """The locked file; closing it ends the lease."""
    zombies: int
    """Unreaped dead processes of the uid (they count against RLIMIT_NPROC until init reaps them)."""


def _uid_bases() -> tuple[int, ...]:
    """Candidate starts of the per-run range: the configured one, else the default and, for a user
    namespace that maps only the first 65536 uids (a rootless container), the range just below nobody."""
    raw = os.environ.get(_UID_BASE_ENV)
    if raw is None:
        return SANDBOX_UID_BASE, _LOW_UID_BASE
    highest = 2**31 - 1 - SANDBOX_UID_COUNT
    if not raw.strip().isdigit() or not 1000 <= int(raw) <= highest:
        raise ValueError(
            f"{_UID_BASE_ENV}={raw!r}: expected an integer from 1000 to {highest}, the first of "
            f"{SANDBOX_UID_COUNT} uids that no account or other service uses"
        )
    return (int(raw),)


def _lease_dir() -> Path:
    """The lock directory, created root-only; refuse one that someone else could have prepared."""
    with suppress(FileExistsError):
        _LEASE_DIR.mkdir(mode=0o700)
    info = os.lstat(_LEASE_DIR)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != 0 or info.st_mode & 0o022:
        raise PermissionError(
            f"{_LEASE_DIR} must be a directory owned by root and writable only by it; remove it and the "
            "sandbox recreates it"
        )
    return _LEASE_DIR


@cache
def _has_account(uid: int) -> bool:
    """A passwd or group entry with this id: a real user or service, never a sandbox uid."""
    for lookup in (pwd.getpwuid, grp.getgrgid):
        try:
            lookup(uid)
            return True
        except KeyError:
            continue
    return False


def _scan_uid(uid: int) -> tuple[int, int]:
    """(live, zombie) processes whose /proc entry belongs to ``uid``."""
    live = zombies = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if entry.stat().st_uid != uid:
                continue
            zombie = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
        except (OSError, IndexError):
            continue  # it ended while we looked
        zombies += zombie
        live += not zombie
    return live, zombies


def _lease_uid(base: int) -> _Lease:
    """Lock the first free uid of the range from ``base`` for this run."""
    directory = _lease_dir()
    for uid in range(base, base + SANDBOX_UID_COUNT):
        fd = os.open(directory / f"{uid}.lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue  # another run holds it
        live, zombies = _scan_uid(uid)
        if live == 0 and not _has_account(uid):
            return _Lease(uid, fd, zombies)
        os.close(fd)
    raise OSError(
        errno.EAGAIN,
        f"no free sandbox uid in {base}..{base + SANDBOX_UID_COUNT - 1} (all leased, running a process, or "
        f"owned by an account); set {_UID_BASE_ENV} to the start of a free range",
    )


@contextmanager
def _run_uid(layers: Isolation | None = None, base: int | None = None) -> Iterator[_Lease | None]:
    """A uid leased for the duration of the run where per-run uids work; otherwise None."""
    if not (layers or isolation()).per_run_uid:
        yield None
        return
    lease = _lease_uid(_probed().uid_base if base is None else base)
    try:
        yield lease
    finally:
        os.close(lease.fd)


def _processes_of_uid(uid: int) -> int:
    count = 0
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and entry.stat().st_uid == uid:
                count += 1
        except OSError:
            continue
    return count


def _signal_every_process_of(uid: int) -> None:
    """``kill(-1, SIGKILL)`` as ``uid``: every process that uid owns, however it left its session or hid
    its /proc entry; forks cannot race it (the kernel signals all of them at once)."""
    subprocess.run(
        ["/bin/sh", "-c", "kill -s KILL -- -1"],
        user=uid,
        group=uid,
        extra_groups=[],
        env={"PATH": "/usr/bin:/bin"},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        check=False,
        timeout=10,
    )


def _kill_uid(uid: int, grace_seconds: float = 2.0) -> None:
    """Kill every process of the run's uid, then wait (bounded) until none is alive."""
    deadline = time.monotonic() + grace_seconds
    next_signal = 0.0
    while time.monotonic() < deadline:
        if time.monotonic() >= next_signal:
            _signal_every_process_of(uid)
            next_signal = time.monotonic() + 0.25
        if _scan_uid(uid)[0] == 0:
            return
        time.sleep(0.01)
    logger.warning("sandbox: processes of uid %d outlived the kill; the uid stays out of use", uid)


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


def _sweep_scratch(uid: int) -> None:
    """Without a private root: remove what the run's uid left in the world-writable scratch directories,
    so a later run with the same uid cannot find it."""
    for directory in ("/tmp", "/var/tmp", "/dev/shm"):
        try:
            entries = list(os.scandir(directory))
        except OSError:
            continue
        for entry in entries:
            try:
                if entry.stat(follow_symlinks=False).st_uid != uid:
                    continue
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path, ignore_errors=True)
                else:
                    os.unlink(entry.path)
            except OSError:
                continue


# ------------------------------------------------------------------------------ one run


def _read_capped(path: Path, cap: int) -> tuple[str, bool]:
    with open(path, "rb") as handle:
        data = handle.read(cap + 1)
    return data[:cap].decode("utf-8", errors="replace"), len(data) > cap


def _classify(returncode: int | None, timed_out: bool, too_long: bool, stderr: str) -> tuple[str, str]:
    """Map how the child ended to (status, reason)."""
    if timed_out:
        return "timeout", "wall-clock limit exceeded; the run's processes were killed"
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


def _prepare_dirs(source: str, stdin: str, uid: int | None) -> tuple[Path, Path]:
    """outer/ (root-owned: bootstrap, stdio files, the private root's mount point) and outer/work/ (the
    program's cwd, owned by the run's uid)."""
    outer = Path(tempfile.mkdtemp(prefix="tropd-sandbox-"))
    outer.chmod(0o711)
    work = outer / "work"
    work.mkdir(mode=0o700)
    (outer / "root").mkdir(mode=0o700)
    (outer / "bootstrap.py").write_text(_BOOTSTRAP, encoding="utf-8")
    (outer / "bootstrap.py").chmod(0o644)
    (work / "main.py").write_text(source, encoding="utf-8")
    (outer / "stdin").write_text(stdin, encoding="utf-8")
    for output in ("stdout", "stderr"):
        (outer / output).touch()
    if uid is not None:  # the program's own files, so reopening /dev/stdout works too
        for path in (work, work / "main.py", outer / "stdout", outer / "stderr"):
            os.chown(path, uid, uid)
    return outer, work


def _root_plan(outer: Path, work: Path, scratch_bytes: int, proc_mode: str) -> _RootPlan:
    scratch = f"size={scratch_bytes},nr_inodes=4096,mode=1777".encode()
    binds = _read_only_binds(default_python())
    return _RootPlan(
        str(outer / "root"), str(outer), str(work), scratch, proc_mode, binds, _kept_flags(str(outer))
    )


def _spawn(command: list[str], outer: Path, work: Path, env: dict[str, str], preexec: Callable[[], None]):
    with (
        open(outer / "stdin", "rb") as fin,
        open(outer / "stdout", "wb") as fout,
        open(outer / "stderr", "wb") as ferr,
    ):
        try:
            return subprocess.Popen(
                command,
                stdin=fin,
                stdout=fout,
                stderr=ferr,
                cwd=work,
                env=env,
                close_fds=True,
                start_new_session=True,
                preexec_fn=preexec,
            )
        except subprocess.SubprocessError as error:  # the set-up in the child failed: say why
            detail = (outer / "stderr").read_text(errors="replace").strip()[-300:]
            raise subprocess.SubprocessError(f"{error} {detail}".strip()) from error


def _process_cap(lease: _Lease | None, uid: int | None, limits: SandboxLimits) -> int:
    """RLIMIT_NPROC of the run: its own processes on a leased uid, else a budget shared with the uid's."""
    if lease is not None:
        return limits.max_processes + lease.zombies
    if uid is not None:
        return limits.max_processes  # shared by every run of that uid
    return _processes_of_uid(os.getuid()) + limits.max_processes


def _command(outer: Path, work: Path, bwrap: tuple[str, ...], scratch_bytes: int) -> list[str]:
    """The interpreter on the bootstrap and the program; under bwrap (started as the run's uid, so its
    process cap and the kill at the end still hold) and _REAPER when ``bwrap`` names it."""
    command = [default_python(), "-I", "-B", str(outer / "bootstrap.py"), str(work / "main.py")]
    if not bwrap:
        return command
    wrapper = [*bwrap, *_bwrap_arguments(outer, work, scratch_bytes), "--"]
    return [default_python(), "-I", "-S", "-B", "-c", _REAPER, *wrapper, *command]


def _run_in(
    outer: Path, work: Path, lease: _Lease | None, layers: Isolation, limits: SandboxLimits, probe: _Probe
) -> RunResult:
    start = time.monotonic()
    uid = lease.uid if lease is not None else layers.shared_uid
    nproc = _process_cap(lease, uid, limits) + (_BWRAP_PROCESSES if layers.bwrap else 0)
    flags = (_CLONE_NEWNET if layers.network_namespace else 0) | (
        _CLONE_NEWNS | _CLONE_NEWIPC if layers.private_root else 0
    )
    plan = None
    if layers.private_root:
        plan = _root_plan(outer, work, limits.file_size_bytes, probe.proc_mode)
    env = {"HOME": str(work), "TMPDIR": str(work), "PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}
    bwrap = (probe.bwrap or ("bwrap",)) if layers.bwrap else ()
    command = _command(outer, work, bwrap, limits.file_size_bytes)
    process = _spawn(command, outer, work, env, _make_preexec(limits, flags, plan, uid, nproc))
    timed_out = False
    try:
        process.wait(timeout=limits.wall_seconds)
    except subprocess.TimeoutExpired:
        timed_out = True
    if lease is not None:
        _kill_uid(lease.uid)  # everything the run started, wherever it moved to
    else:
        _kill_group(process.pid)  # also reaps children the program left running in its group
    returncode = process.wait()
    if layers.bwrap:
        returncode = _unwrapped_returncode(returncode)
    stdout, too_long = _read_capped(outer / "stdout", limits.output_bytes)
    stderr, _ = _read_capped(outer / "stderr", 64 << 10)
    status, reason = _classify(returncode, timed_out, too_long, stderr)
    return RunResult(status, returncode, stdout, stderr, reason, time.monotonic() - start)


def _run_source(
    source: str, stdin: str, limits: SandboxLimits, layers: Isolation, probe: _Probe
) -> RunResult:
    """One run of ``source`` with these layers: a leased uid, its directories, the run, the clean-up."""
    with _run_uid(layers, probe.uid_base) as lease:
        outer, work = _prepare_dirs(source, stdin, lease.uid if lease else layers.shared_uid)
        try:
            return _run_in(outer, work, lease, layers, limits, probe)
        finally:
            if lease is not None and not layers.private_root:
                _sweep_scratch(lease.uid)
            shutil.rmtree(outer, ignore_errors=True)


def run_program(source: str, stdin: str = "", limits: SandboxLimits | None = None) -> RunResult:
    """Run ``source`` as a Python program with ``stdin``; never raises for anything the program does."""
    limits = limits or SandboxLimits()
    start = time.monotonic()
    try:
        return _run_source(source, stdin, limits, isolation(), _probed())
    except (OSError, subprocess.SubprocessError) as error:
        return RunResult("sandbox_error", None, "", "", f"could not run: {error}", time.monotonic() - start)
