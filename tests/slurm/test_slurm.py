"""The project's Slurm script and nemo-run launcher on a real (single-node, CPU) Slurm cluster.

Run explicitly: ``eval "$(bash tests/slurm/cluster.sh start)"; pytest -q -m slurm tests/slurm`` (the default
``pytest`` run deselects the ``slurm`` marker; without a reachable cluster every test is skipped). Each job
trains ``tiny_cpu`` on 2 CPU ranks: ``sbatch --nodes=1 --ntasks-per-node=2 --gpus-per-node=0
slurm/tropd_8node.sh``. An uninterrupted run gives the reference losses; a run stopped twice (a signal to
the steps, then ``scontrol requeue``) must resume from a checkpoint of the step it was in and end with the
same losses bit for bit, every step once; a plain ``scancel`` must end its job.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "slurm" / "tropd_8node.sh"
STEPS = 24  # ~0.3 s a step on 2 CPU ranks: long enough to interrupt twice, short enough to wait for
# No periodic save: every checkpoint before the last step comes from a signal.
OVERRIDES = (f"train_steps={STEPS}", "checkpoint.save_interval=1000")
JOB_TIMEOUT_S = 240
TERMINAL_STATES = {
    "COMPLETED", "CANCELLED", "FAILED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
    "PREEMPTED",
}  # fmt: skip


def _cluster_reachable() -> bool:
    if shutil.which("sinfo") is None or shutil.which("sbatch") is None:
        return False
    try:
        return subprocess.run(["sinfo", "-h"], capture_output=True, timeout=15).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


pytestmark = [
    pytest.mark.slurm,
    pytest.mark.skipif(not _cluster_reachable(), reason="no Slurm cluster (tests/slurm/cluster.sh start)"),
]


def _job_env(**extra: str) -> dict[str, str]:
    """This environment minus any enclosing job's SLURM_* / SBATCH_* (SLURM_CONF kept), plus ``extra``."""
    env = {
        name: value
        for name, value in os.environ.items()
        if name == "SLURM_CONF" or not name.startswith(("SLURM_", "SBATCH_", "SRUN_"))
    }
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra)
    return env


def _run(*command: str, env: dict[str, str] | None = None) -> str:
    result = subprocess.run(command, capture_output=True, text=True, timeout=60, env=env or _job_env())
    assert result.returncode == 0, f"{' '.join(command)} failed ({result.returncode}): {result.stderr}"
    return result.stdout


def job_info(job_id: str) -> dict[str, str]:
    """``scontrol show job`` as a dict (JobState, Restarts, ExitCode, ...)."""
    line = _run("scontrol", "show", "job", "-o", job_id)
    return dict(re.findall(r"(\w+)=(\S*)", line))


def metric_rows(run_dir: Path) -> list[dict]:
    """Training rows of metrics.jsonl (a line being written is skipped)."""
    path = run_dir / "metrics.jsonl"
    rows = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if "loss" in row:
                rows.append(row)
    return rows


def job_logs(run_dir: Path) -> str:
    """The batch script's output and the ranks' logs, for failure messages."""
    texts = []
    for path in sorted((run_dir / "logs").glob("*")):
        lines = path.read_text(errors="replace").splitlines()
        texts.append(f"--- {path.name} (last 25 lines)\n" + "\n".join(lines[-25:]))
    return "\n".join(texts)


def wait_for(condition: Callable[[], object], what: str, run_dir: Path, timeout: float = JOB_TIMEOUT_S):
    """Poll ``condition`` every 0.2 s until it returns something true; fail with the job's logs."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}\n{job_logs(run_dir)}")


def wait_until_ended(job_id: str, run_dir: Path) -> dict[str, str]:
    return wait_for(
        lambda: (info := job_info(job_id))["JobState"] in TERMINAL_STATES and info, f"job {job_id} to end",
        run_dir,
    )  # fmt: skip


def wait_for_rows(run_dir: Path, count: int) -> int:
    """Wait until ``count`` training steps are logged; returns how many are."""

    def logged() -> int:
        rows = len(metric_rows(run_dir))
        return rows if rows >= count else 0

    return wait_for(logged, f"{count} logged steps", run_dir)


def release_requeued(job_id: str, restarts: int, run_dir: Path) -> None:
    """Wait for the job's ``restarts``-th requeue, then let it start now (Slurm holds a requeued job
    back for a while: its EligibleTime)."""
    wait_for(
        lambda: (info := job_info(job_id))["JobState"] == "PENDING" and int(info["Restarts"]) >= restarts,
        f"job {job_id} to be requeued (restart {restarts})", run_dir,
    )  # fmt: skip
    # slurmd revokes the ended instance's credential with a one-second resolution and refuses a new one
    # issued in the same second ("Job credential revoked"), which Slurm's own requeue delay avoids.
    time.sleep(2.0)
    _run("scontrol", "update", f"JobId={job_id}", "StartTime=now")


def submit(run_dir: Path) -> str:
    """``sbatch`` the project's script for tiny_cpu on 2 CPU ranks; returns the job id."""
    (run_dir / "logs").mkdir(parents=True)
    env = _job_env(
        TROPD_RUN_DIR=str(run_dir), TROPD_RECIPE="tiny_cpu", TROPD_PYTHON=sys.executable,
        TROPD_CODE_DIR=str(REPO),
    )  # fmt: skip
    output = _run(
        "sbatch", "--parsable", "--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=0", "--time=00:10:00",
        f"--output={run_dir}/logs/slurm-%j.out", str(SCRIPT), *OVERRIDES, env=env,
    )  # fmt: skip
    return output.strip().split(";")[0]


def rank0_log(run_dir: Path, job_id: str) -> str:
    return (run_dir / "logs" / f"{job_id}.rank0.log").read_text(errors="replace")


def saved_steps(log: str) -> list[int]:
    return [int(step) for step in re.findall(r"saved checkpoint \S*/step-(\d+)", log)]


def resumed_steps(log: str) -> list[int]:
    return [int(step) for step in re.findall(r"resumed from \S+ \(step (\d+)\)", log)]


@pytest.fixture(scope="module")
def jobs():
    """Job ids submitted by this module; any still known to Slurm at the end is cancelled."""
    submitted: list[str] = []
    yield submitted
    for job_id in submitted:
        subprocess.run(["scancel", job_id], capture_output=True, timeout=30)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, jobs) -> tuple[Path, str, dict[str, str]]:
    """An uninterrupted run: its run dir, job id and final job info."""
    run_dir = tmp_path_factory.mktemp("reference")
    job_id = submit(run_dir)
    jobs.append(job_id)
    return run_dir, job_id, wait_until_ended(job_id, run_dir)


def losses(rows: list[dict]) -> list[tuple[int, float]]:
    return [(row["step"], row["loss"]) for row in rows]


def test_job_completes(reference):
    run_dir, job_id, info = reference
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "0"), job_logs(
        run_dir
    )
    assert [row["step"] for row in metric_rows(run_dir)] == list(range(STEPS))
    assert saved_steps(rank0_log(run_dir, job_id)) == [STEPS]
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step-{STEPS:07d}"


def test_signal_to_steps_then_requeue_resume_bit_identically(reference, tmp_path, jobs):
    """``scancel --signal=USR1`` (the steps only), then ``scontrol requeue`` (Slurm's TERM to every
    process): each time the ranks save the step in progress and the requeued job resumes from it."""
    run_dir = tmp_path / "run"
    job_id = submit(run_dir)
    jobs.append(job_id)

    logged_at_signal = wait_for_rows(run_dir, 3)
    _run("scancel", "--signal=USR1", job_id)
    release_requeued(job_id, 1, run_dir)
    first_save = wait_for(lambda: saved_steps(rank0_log(run_dir, job_id)), "the first checkpoint", run_dir)[0]

    logged_at_requeue = wait_for_rows(run_dir, first_save + 3)
    _run("scontrol", "requeue", job_id)
    release_requeued(job_id, 2, run_dir)
    info = wait_until_ended(job_id, run_dir)

    logs = job_logs(run_dir)
    assert (info["JobState"], info["Restarts"]) == ("COMPLETED", "2"), logs
    saves, resumes = saved_steps(rank0_log(run_dir, job_id)), resumed_steps(rank0_log(run_dir, job_id))
    assert len(saves) == 3 and saves[-1] == STEPS, logs
    # Each signal's checkpoint is of the step in progress: nothing logged before it is lost.
    assert logged_at_signal <= saves[0] < saves[1] < STEPS and saves[1] >= logged_at_requeue, logs
    assert resumes == saves[:2], logs
    batch_output = (run_dir / "logs" / f"slurm-{job_id}.out").read_text()
    assert f"checkpoint saved; job {job_id} requeued" in batch_output
    assert f"checkpoint saved; Slurm is requeueing job {job_id}" in batch_output
    # Every step exactly once, with the uninterrupted run's loss bit for bit.
    assert losses(metric_rows(run_dir)) == losses(metric_rows(reference[0]))


def test_plain_scancel_ends_the_job(tmp_path, jobs):
    run_dir = tmp_path / "run"
    job_id = submit(run_dir)
    jobs.append(job_id)
    wait_for_rows(run_dir, 2)
    _run("scancel", job_id)
    info = wait_until_ended(job_id, run_dir)
    assert (info["JobState"], info["Restarts"]) == ("CANCELLED", "0"), job_logs(run_dir)
    time.sleep(2)  # a requeue would show by now
    assert job_info(job_id)["JobState"] == "CANCELLED"
    # The ranks still saved the step in progress on Slurm's TERM: a resubmission resumes from it.
    saves = saved_steps(rank0_log(run_dir, job_id))
    assert len(saves) == 1 and 2 <= saves[0] < STEPS, job_logs(run_dir)


def test_nemo_run_launcher_submits_and_finishes(reference, tmp_path, jobs):
    """``recipes/launch.py --executor slurm`` with CPU ranks (torchrun per node) trains the same run."""
    run_dir = tmp_path / "run"
    result = subprocess.run(
        [
            sys.executable, str(REPO / "recipes" / "launch.py"), "--recipe", "tiny_cpu", "--executor",
            "slurm", "--account", "tropd", "--partition", _run("sinfo", "-h", "-o", "%R").split()[0],
            "--nodes", "1", "--gpus-per-node", "0", "--ntasks-per-node", "2", "--time", "00:10:00",
            "--job-dir", str(tmp_path / "jobs"), "--detach", f"checkpoint.save_dir={run_dir}", *OVERRIDES,
        ],
        capture_output=True, text=True, timeout=120, env=_job_env(COLUMNS="200"), cwd=REPO,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    found = re.search(r"Job id: (\d+)", result.stdout)
    assert found, result.stdout
    job_id = found.group(1)
    jobs.append(job_id)
    info = wait_until_ended(job_id, run_dir)
    output = Path(info["StdOut"]).read_text(errors="replace") if Path(info["StdOut"]).exists() else ""
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), output[-4000:]
    assert losses(metric_rows(run_dir)) == losses(metric_rows(reference[0]))
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step-{STEPS:07d}"
