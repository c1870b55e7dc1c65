"""Sandbox isolation between runs and from the host: a process cap per run, nothing outlives its run, and
(where the platform allows a private root) no writes to or reads of the host's files.

Assertions that need a layer the machine lacks are skipped; ``isolation()`` says which layers are active.
"""

import os
import signal
import stat
import uuid
from pathlib import Path

import pytest

from megatron_tropd.eval import sandbox, scoring
from megatron_tropd.eval.sandbox import Isolation, SandboxLimits, isolation, run_program
from megatron_tropd.eval.schema import Benchmark, CodeTest, Item

LIMITS = SandboxLimits(cpu_seconds=2, wall_seconds=3.0, memory_bytes=256 << 20, max_processes=8)
LAYERS = isolation()
needs_per_run_uid = pytest.mark.skipif(not LAYERS.per_run_uid, reason=f"no per-run uid: {LAYERS.note}")
needs_private_root = pytest.mark.skipif(not LAYERS.private_root, reason=f"no private root: {LAYERS.note}")

# Forks until refused, then holds every process it got until the wall limit kills the run.
FORK_HOG = """```python
import os, time
while True:
    try:
        if os.fork() == 0:
            break
    except OSError:
        break
time.sleep(60)
```"""

# Correct answers that need a few processes; the pause lets the hog take its whole budget first.
FORKING_ANSWER = """```python
import os, time
time.sleep(0.5)
n = int(input())
children = []
for _ in range(2):
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    children.append(pid)
for pid in children:
    os.waitpid(pid, 0)
print(2 * n)
```"""

POOL_ANSWER = """```python
import multiprocessing, time
time.sleep(0.5)
n = int(input())
with multiprocessing.get_context("fork").Pool(2) as pool:
    print(sum(pool.map(abs, [n, -n])))
```"""


def test_isolation_report_matches_privileges():
    assert os.geteuid() == 0 or not LAYERS.per_run_uid  # other uids are root's to hand out
    assert not (LAYERS.per_run_uid and LAYERS.shared_uid is not None)
    assert LAYERS.mechanisms.endswith("audit-hook")
    assert ("private-root" in LAYERS.mechanisms) == LAYERS.private_root
    assert LAYERS.private_root or not LAYERS.hidden_processes  # hidepid is a property of the private /proc


def test_fork_heavy_answer_does_not_fail_correct_answers_graded_beside_it(monkeypatch):
    monkeypatch.setattr(scoring, "_code_checks_at_once", lambda: 4)  # all four at once, whatever the cores
    item = Item("double", "print twice the number", tests=(CodeTest("3\n", "6\n"),))
    benchmark = Benchmark("forks", "code", (item,))
    responses = [[FORK_HOG, FORKING_ANSWER, POOL_ANSWER, FORKING_ANSWER]]
    generate = lambda prompts, k, temperature: responses  # noqa: E731
    result = scoring.evaluate_benchmark(benchmark, generate, 4, 0.0, code_limits=LIMITS)
    hog, *correct = result.samples
    assert not hog.correct
    assert [sample.correct for sample in correct] == [True, True, True], [s.reason for s in correct]


def _alive_in_sandbox(pid: int) -> bool:
    """A live process with this pid that a sandbox uid owns (a reused pid of another owner is not it)."""
    proc = Path(f"/proc/{pid}")
    try:
        state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        owner = proc.stat().st_uid
    except (OSError, IndexError):
        return False
    return state != "Z" and owner in sandbox.sandbox_uids()


@needs_per_run_uid
def test_child_that_left_the_session_does_not_outlive_its_run():
    program = (
        "import os, time\npid = os.fork()\n"
        "if pid == 0:\n    os.setsid()\n    time.sleep(60)\n    os._exit(0)\n"
        "while os.getsid(pid) != pid:\n    time.sleep(0.01)\nprint(pid)\n"
    )
    result = run_program(program, "", LIMITS)
    assert result.ok, result.reason
    pid = int(result.stdout)
    try:
        assert not _alive_in_sandbox(pid)
    finally:
        if _alive_in_sandbox(pid):
            os.kill(pid, signal.SIGKILL)


@needs_per_run_uid
def test_a_run_never_gets_a_uid_another_run_holds():
    with sandbox._run_uid() as held:
        result = run_program("import os\nprint(os.getuid())", "", LIMITS)
    assert result.ok, result.reason
    assert held is not None
    assert int(result.stdout) != held.uid
    assert int(result.stdout) != 0


@needs_private_root
def test_ctypes_writes_to_tmp_and_shm_stay_private():
    tag = f"tropd-sandbox-test-{uuid.uuid4().hex}"
    targets = [f"/tmp/{tag}", f"/dev/shm/{tag}"]
    program = (
        "import ctypes, os\nlibc = ctypes.CDLL(None)\n"
        f"for path in {targets!r}:\n"
        "    fd = libc.open(path.encode(), os.O_WRONLY | os.O_CREAT, 0o644)\n"
        "    print(fd, libc.write(fd, b'escaped', 7))\n"
    )
    try:
        result = run_program(program, "", LIMITS)
        assert result.ok, result.reason
        for line in result.stdout.split("\n")[:2]:
            fd, written = map(int, line.split())
            assert fd >= 0 and written == 7  # the program had a writable /tmp and /dev/shm: its own
        assert not any(os.path.lexists(path) for path in targets)
    finally:
        for path in targets:
            if os.path.lexists(path):
                os.unlink(path)


@needs_per_run_uid
def test_without_a_private_root_scratch_files_are_removed_after_the_run(monkeypatch):
    layers = Isolation(True, LAYERS.network_namespace, False, False, "no mount namespace")
    monkeypatch.setattr(sandbox, "isolation", lambda: layers)
    target = f"/tmp/tropd-sandbox-test-{uuid.uuid4().hex}"
    program = (
        f"import ctypes, os\nprint(ctypes.CDLL(None).open({target.encode()!r}, os.O_WRONLY | os.O_CREAT))"
    )
    try:
        result = run_program(program, "", LIMITS)
        assert result.ok, result.reason
        assert int(result.stdout) >= 0  # the host's /tmp was writable
        assert not os.path.lexists(target)
    finally:
        if os.path.lexists(target):
            os.unlink(target)


def _world_readable(path: Path) -> bool:
    """Any uid could read ``path`` through the host's permissions: o+r on it, o+x on every parent."""
    readable = path.stat().st_mode & stat.S_IROTH
    return bool(readable) and all(p.stat().st_mode & stat.S_IXOTH for p in path.parents)


@needs_private_root
def test_host_files_readable_by_anyone_are_not_visible():
    host_dir = Path("/var/tmp") / f"tropd-sandbox-test-{uuid.uuid4().hex}"
    host_dir.mkdir(mode=0o755)
    try:
        secret = host_dir / "secret.txt"
        secret.write_text("host data")
        secret.chmod(0o644)
        own_source = Path(sandbox.__file__).resolve()
        visible = [p for p in (secret, own_source) if _world_readable(p)]
        assert secret in visible  # the host's permissions alone would let the program read it
        program = "import os, sys\nfor path in sys.stdin.read().split():\n    print(os.path.exists(path))\n"
        result = run_program(program, "\n".join(map(str, visible)), LIMITS)
        assert result.ok, result.reason
        assert result.stdout.split() == ["False"] * len(visible)
    finally:
        secret.unlink(missing_ok=True)
        host_dir.rmdir()


@needs_per_run_uid
def test_root_without_a_usable_uid_range_falls_back_to_nobody(monkeypatch):
    layers = Isolation(False, LAYERS.network_namespace, False, False, "range unmapped", sandbox.SANDBOX_UID)
    monkeypatch.setattr(sandbox, "isolation", lambda: layers)
    result = run_program("import os\nprint(os.getuid(), os.getgid())", "", LIMITS)
    assert result.ok, result.reason
    assert result.stdout.split() == [str(sandbox.SANDBOX_UID)] * 2


def test_programs_run_without_root_layers(monkeypatch):
    # The fallback of a non-root evaluator: the process group is the run, the host's file system stays.
    monkeypatch.setattr(sandbox, "_is_root", lambda: False)
    monkeypatch.setattr(sandbox, "isolation", lambda: Isolation(False, False, False, False, "not root"))
    program = "import os\nif os.fork() == 0:\n    os._exit(0)\nos.wait()\nprint(int(input()) + 1)"
    result = run_program(program, "41\n", LIMITS)
    assert result.ok, result.reason
    assert result.stdout == "42\n"
