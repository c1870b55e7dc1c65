"""The sandbox's bubblewrap layer: no network, a read-only root, a private /tmp, and the choice between it
and the builtin layers (``TROPD_SANDBOX_ISOLATION``).

Tests that run programs under bwrap skip when it is not installed (``apt-get install bubblewrap``) or
cannot run here; those about choosing and falling back run everywhere.
"""

import ast
import errno
import logging
import os
import shutil
import socket
import uuid
from dataclasses import replace
from pathlib import Path

import pytest

from megatron_tropd.eval import sandbox
from megatron_tropd.eval.sandbox import SandboxLimits, isolation, network_isolation, run_program
from tests.test_sandbox import FORK_COUNTER

LIMITS = SandboxLimits(cpu_seconds=2, wall_seconds=5.0, memory_bytes=256 << 20, max_processes=8)
LAYERS = isolation()


def _why_no_bwrap() -> str:
    if shutil.which("bwrap") is None:
        return "bubblewrap is not installed (apt-get install bubblewrap)"
    if sandbox.isolation_mode() == "builtin":
        return "TROPD_SANDBOX_ISOLATION=builtin"
    return f"bwrap cannot run programs here: {LAYERS.note}"


needs_bwrap = pytest.mark.skipif(not LAYERS.bwrap, reason=_why_no_bwrap() if not LAYERS.bwrap else "")

# The program's own libc calls: the audit hook does not see them, so only the namespaces and mounts decide.
_LIBC = "import ctypes, os\nlibc = ctypes.CDLL(None, use_errno=True)\n"


@pytest.fixture(params=["with-builtin-layers", "bwrap-alone"])
def layers(request, monkeypatch):
    """The probed layers, and bwrap on its own (no private root, no network namespace of the sandbox's)."""
    if request.param == "bwrap-alone":
        alone = replace(LAYERS, network_namespace=False, private_root=False, hidden_processes=False)
        monkeypatch.setattr(sandbox, "isolation", lambda: alone)
    return sandbox.isolation()


@needs_bwrap
@pytest.mark.parametrize("mode", ["auto", "bwrap"])
def test_isolation_names_bwrap(monkeypatch, mode):
    monkeypatch.setenv("TROPD_SANDBOX_ISOLATION", mode)
    assert "+bwrap+" in isolation().mechanisms
    assert network_isolation() == "netns+audit-hook"


@needs_bwrap
def test_program_cannot_reach_a_server_on_loopback(layers):
    with socket.create_server(("127.0.0.1", 0)) as server:
        address = (
            b"\x02\x00"
            + server.getsockname()[1].to_bytes(2, "big")
            + bytes([127, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0])
        )
        program = _LIBC + (
            "fd = libc.socket(2, 1, 0)\n"  # AF_INET, SOCK_STREAM
            f"print(fd >= 0, libc.connect(fd, {address!r}, 16), ctypes.get_errno())\n"
            "print([line.split(':')[0].strip() for line in open('/proc/net/dev').readlines()[2:]])\n"
        )
        result = run_program(program, "", LIMITS)
        server.settimeout(0.2)
        with pytest.raises(TimeoutError):
            server.accept()
    assert result.ok, result.reason
    connection, interfaces = result.stdout.strip().split("\n")
    opened, connected, error = connection.split()
    assert (opened, connected) == ("True", "-1"), result.stdout  # a socket of its own namespace, unconnected
    assert int(error) in (errno.ENETUNREACH, errno.ECONNREFUSED)
    assert interfaces == "['lo']"


@needs_bwrap
def test_program_cannot_write_outside_its_directory(layers):
    tag = f"tropd-bwrap-test-{uuid.uuid4().hex}"
    # /var/tmp is world-writable on most hosts; the run's directory (cwd's parent) belongs to the evaluator.
    program = _LIBC + (
        "outside = ['/', '/dev', os.path.dirname(os.getcwd()), '/var/tmp', '/usr']\n"
        f"for path in [d.rstrip('/') + '/{tag}' for d in outside] + ['inside']:\n"
        "    print(path, libc.open(path.encode(), os.O_WRONLY | os.O_CREAT, 0o644))\n"
    )
    try:
        result = run_program(program, "", LIMITS)
        assert result.ok, result.reason
        opened = dict(line.rsplit(" ", 1) for line in result.stdout.strip().split("\n"))
        assert int(opened.pop("inside")) >= 0
        assert len(opened) == 5
        assert all(fd == "-1" for fd in opened.values()), opened
    finally:
        leaked = [p for d in ("/", "/var/tmp", "/dev/shm") if (p := Path(d, tag)).exists()]
        for path in leaked:
            path.unlink()
    assert not leaked


@needs_bwrap
def test_program_sees_a_private_tmp_and_shm(layers):
    tag = f"tropd-bwrap-test-{uuid.uuid4().hex}"
    host_file = Path("/tmp", tag + "-host")
    host_file.write_text("host")
    host_file.chmod(0o644)
    made = [f"/tmp/{tag}", f"/dev/shm/{tag}"]
    program = _LIBC + (
        "print(sorted(os.listdir('/tmp')))\n"
        f"for path in {made!r}:\n"
        "    print(libc.open(path.encode(), os.O_WRONLY | os.O_CREAT, 0o644) >= 0, os.path.exists(path))\n"
    )
    try:
        result = run_program(program, "", LIMITS)
    finally:
        host_file.unlink()
        leaked = [path for path in made if os.path.lexists(path)]
        for path in leaked:
            os.unlink(path)
    assert result.ok, result.reason
    listed, *writes = result.stdout.strip().split("\n")
    entries = ast.literal_eval(listed)
    assert len(entries) <= 1 and all(name.startswith("tropd-sandbox-") for name in entries)  # the run's own
    assert writes == ["True True"] * 2  # writable for the program, and its own
    assert not leaked


@needs_bwrap
def test_program_sees_only_its_own_processes():
    result = run_program(
        "import os\nprint(sorted(int(p) for p in os.listdir('/proc') if p.isdigit()))", "", LIMITS
    )
    assert result.ok, result.reason
    assert len(ast.literal_eval(result.stdout)) <= 3  # bwrap's init, the program, maybe a listing in flight


@needs_bwrap
def test_limits_and_statuses_read_as_without_bwrap():
    result = run_program("while True:\n    pass", "", replace(LIMITS, cpu_seconds=1))
    assert (result.status, result.returncode) == ("runtime_error", -24), result.reason
    assert "SIGXCPU" in result.reason
    result = run_program("import sys\nsys.exit(3)", "", LIMITS)
    assert result.returncode == 3
    result = run_program(FORK_COUNTER, "", LIMITS)
    assert result.ok, result.reason
    forks = int(result.stdout)
    assert LIMITS.max_processes - 3 <= forks < LIMITS.max_processes  # bwrap's own processes do not count


@needs_bwrap
def test_correct_program_passes_and_leaves_no_process():
    result = run_program(
        "import os\na, b = map(int, input().split())\nprint(a + b, os.getuid())", "2 40\n", LIMITS
    )
    assert result.ok, result.reason
    total, uid = result.stdout.split()
    assert total == "42"
    assert not [p for p in Path("/proc").iterdir() if p.name.isdigit() and _bwrap_of(p, int(uid))]


def _bwrap_of(proc: Path, uid: int) -> bool:
    """A bwrap process (its init, dead but unreaped, included) of ``uid``."""
    try:
        return proc.stat().st_uid == uid and (proc / "comm").read_text().strip() == "bwrap"
    except OSError:
        return False


def test_without_bwrap_on_path_the_builtin_layers_run(monkeypatch, tmp_path):
    monkeypatch.setenv("TROPD_SANDBOX_ISOLATION", "auto")
    monkeypatch.setenv("PATH", str(tmp_path))
    layers = isolation()
    assert not layers.bwrap
    assert "bwrap" not in layers.mechanisms
    assert "no bwrap: bwrap is not on PATH" in layers.note
    result = run_program("print(int(input()) + 1)", "41\n", LIMITS)
    assert result.ok, result.reason
    assert result.stdout == "42\n"


def test_builtin_mode_never_uses_bwrap(monkeypatch):
    monkeypatch.setenv("TROPD_SANDBOX_ISOLATION", "builtin")
    layers = isolation()
    assert not layers.bwrap
    assert "bwrap" not in layers.note
    assert run_program("print('ok')", "", LIMITS).stdout == "ok\n"


def test_bwrap_mode_refuses_to_run_without_bwrap(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setenv("TROPD_SANDBOX_ISOLATION", "bwrap")
    with pytest.raises(RuntimeError, match="TROPD_SANDBOX_ISOLATION=bwrap.*not on PATH"):
        isolation()


def test_unknown_mode_is_refused(monkeypatch):
    monkeypatch.setenv("TROPD_SANDBOX_ISOLATION", "docker")
    with pytest.raises(ValueError, match="auto, bwrap, builtin"):
        isolation()


def test_a_bwrap_that_cannot_run_falls_back_with_one_warning(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("TROPD_SANDBOX_ISOLATION", "auto")
    broken = tmp_path / "bwrap"
    broken.write_text("#!/bin/sh\necho 'bwrap: No permissions to create new namespace' >&2\nexit 1\n")
    broken.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    with caplog.at_level(logging.WARNING, logger=sandbox.__name__):
        first, second = isolation(), isolation()
    assert not first.bwrap and first == second
    assert "no bwrap: " in first.note, first.note
    warnings = [r.getMessage() for r in caplog.records if "bwrap" in r.getMessage()]
    assert len(warnings) == 1 and "cannot run programs here" in warnings[0]
    assert run_program("print('ok')", "", LIMITS).stdout == "ok\n"
