"""The code sandbox: hostile programs fail safely with a reason; correct programs pass.

Limits are kept small (CPU 2 s, wall 3 s, 8 processes) so the hostile cases stay cheap on a shared box.
"""

import os
from pathlib import Path

import pytest

from megatron_tropd.eval.sandbox import SandboxLimits, isolation, network_isolation, run_program, sandbox_uids

LIMITS = SandboxLimits(cpu_seconds=2, wall_seconds=3.0, memory_bytes=256 << 20, max_processes=8)


def _sandbox_uid_processes() -> int:
    """Live (non-zombie) processes owned by the uids programs run as (the leased range as root)."""
    uids = sandbox_uids() or [isolation().shared_uid or os.getuid()]
    return sum(1 for p in Path("/proc").iterdir() if p.name.isdigit() and _live_owner(p) in uids)


def _live_owner(path: Path) -> int | None:
    try:
        state = (path / "stat").read_text().rsplit(")", 1)[1].split()[0]
        return None if state == "Z" else path.stat().st_uid
    except OSError:
        return None


def test_correct_program_passes_with_stdin():
    result = run_program("a, b = map(int, input().split())\nprint(a + b)", "2 40\n", LIMITS)
    assert result.ok, result.reason
    assert result.stdout == "42\n"


def test_program_error_is_a_failure_with_the_exception():
    result = run_program("raise KeyError('boom')", "", LIMITS)
    assert result.status == "runtime_error"
    assert "KeyError" in result.reason


def test_infinite_loop_is_stopped_by_cpu_limit():
    result = run_program("while True:\n    pass", "", LIMITS)
    assert not result.ok
    assert "SIGXCPU" in result.reason or result.status == "timeout"
    assert result.wall_seconds < LIMITS.wall_seconds + 2


def test_sleeping_program_is_stopped_by_wall_limit():
    result = run_program("import time\ntime.sleep(60)", "", LIMITS)
    assert result.status == "timeout"
    assert result.wall_seconds < LIMITS.wall_seconds + 2


def test_fork_bomb_is_contained_and_reaped():
    before = _sandbox_uid_processes()
    bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass"
    result = run_program(bomb, "", LIMITS)
    assert not result.ok
    assert result.status in ("timeout", "runtime_error")
    assert _sandbox_uid_processes() <= before  # the whole process group was killed


# Forks until the process cap refuses; children sleep so they stay counted; prints how many forks succeeded.
FORK_COUNTER = (
    "import os, time\ncount = 0\nwhile count < 100:\n    try:\n        pid = os.fork()\n"
    "    except OSError:\n        break\n    if pid == 0:\n        time.sleep(30)\n        os._exit(0)\n"
    "    count += 1\nprint(count)"
)


def test_process_count_is_capped():
    result = run_program(FORK_COUNTER, "", LIMITS)
    assert result.ok, result.reason
    assert int(result.stdout) < LIMITS.max_processes


def test_memory_hog_fails():
    result = run_program("block = bytearray(2 << 30)\nprint(len(block))", "", LIMITS)
    assert not result.ok
    assert "MemoryError" in result.reason or "SIG" in result.reason


def test_socket_is_refused():
    program = "import socket\nsocket.socket(socket.AF_INET, socket.SOCK_STREAM).connect(('10.0.0.1', 80))"
    result = run_program(program, "", LIMITS)
    assert not result.ok
    assert "network access is blocked" in result.reason


@pytest.mark.skipif(not network_isolation().startswith("netns"), reason="needs a network namespace (root)")
def test_network_namespace_has_only_loopback():
    program = "print([line.split(':')[0].strip() for line in open('/proc/net/dev').readlines()[2:]])"
    result = run_program(program, "", LIMITS)
    assert result.ok, result.reason
    assert result.stdout.strip() == "['lo']"


def test_write_outside_directory_is_refused(tmp_path):
    target = tmp_path / "escaped.txt"
    result = run_program(f"open({str(target)!r}, 'w').write('x')", "", LIMITS)
    assert not result.ok
    assert "outside the working directory" in result.reason
    assert not target.exists()


def test_delete_and_rename_outside_directory_are_refused(tmp_path):
    victim = tmp_path / "keep.txt"
    victim.write_text("precious")
    for program in (f"import os\nos.remove({str(victim)!r})", f"import os\nos.rename({str(victim)!r}, 'x')"):
        result = run_program(program, "", LIMITS)
        assert not result.ok
        assert "outside the working directory" in result.reason
    assert victim.read_text() == "precious"


def test_starting_other_programs_is_refused(tmp_path):
    result = run_program(f"import os\nos.system('touch {tmp_path}/escaped')", "", LIMITS)
    assert "starting other programs is blocked" in result.reason
    assert not (tmp_path / "escaped").exists()


def test_program_may_use_its_own_directory():
    program = (
        "import os, tempfile\nopen('scratch.txt', 'w').write('ok')\nos.remove('scratch.txt')\n"
        "print(tempfile.gettempdir() == os.getcwd() == os.environ['HOME'])"
    )
    result = run_program(program, "", LIMITS)
    assert result.ok, result.reason
    assert result.stdout.strip() == "True"


def test_output_is_capped():
    limits = SandboxLimits(cpu_seconds=2, wall_seconds=3.0, output_bytes=1000)
    result = run_program("while True:\n    print('x' * 100)", "", limits)
    assert result.status == "output_limit"
    assert len(result.stdout) == 1000


def test_writing_to_dev_stdout_is_allowed():
    result = run_program("open('/dev/stdout', 'w').write('via device\\n')", "", LIMITS)
    assert result.ok, result.reason
    assert result.stdout == "via device\n"
