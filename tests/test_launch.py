"""Launchers: the Slurm batch script under stub srun/scontrol/sbatch, and the nemo-run executors.

The Slurm tests run ``slurm/tropd_8node.sh`` with fake ``SLURM_*`` variables (8 nodes x 8 tasks) and stub
commands first on PATH that log what they were asked to do; no cluster and no GPU are involved. The
nemo-run Slurm render is compared with ``tests/golden/tropd_8node_sbatch.txt`` (regenerate with
``UPDATE_GOLDEN=1``).
"""

from __future__ import annotations

import io
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT_8NODE = REPO / "slurm" / "tropd_8node.sh"
SCRIPT_1NODE = REPO / "slurm" / "tropd_1node.sh"
GOLDEN = Path(__file__).parent / "golden" / "tropd_8node_sbatch.txt"

# Each stub logs into $STUB_LOG. srun runs its command once per task with the task's SLURM_* variables
# and exits with STUB_RANK_STATUS (or, with STUB_SRUN_SLEEP, "runs" until it receives SIGUSR1, which it
# records). scontrol answers `show job` with STUB_JOB / STUB_JOB_AFTER.
STUBS = {
    "srun": r"""#!/bin/bash
printf '%s\n' "$@" > "$STUB_LOG/srun.argv"
while [[ "$1" == --* ]]; do shift; done
if [[ -n "${STUB_SRUN_SLEEP:-}" ]]; then
    sleep "$STUB_SRUN_SLEEP" >/dev/null 2>&1 &
    sleeper=$!
    on_usr1() {  # the ranks save and exit with STUB_RANK_STATUS (the trainer's 75 by default)
        echo USR1 >> "$STUB_LOG/srun.signals"
        kill "$sleeper"
        touch "$STUB_LOG/ranks.done"
        exit "${STUB_RANK_STATUS:-75}"
    }
    trap on_usr1 USR1
    touch "$STUB_LOG/srun.started"
    wait "$sleeper"
    exit 3
fi
for ((r = 0; r < SLURM_NTASKS; r++)); do
    SLURM_PROCID=$r SLURM_LOCALID=$((r % SLURM_NTASKS_PER_NODE)) SLURM_NODEID=$((r / SLURM_NTASKS_PER_NODE)) \
        "$@" || exit $?
done
touch "$STUB_LOG/ranks.done"
exit "${STUB_RANK_STATUS:-0}"
""",
    "python": r"""#!/bin/bash
echo "RANK=$RANK LOCAL_RANK=$LOCAL_RANK WORLD_SIZE=$WORLD_SIZE MASTER_ADDR=$MASTER_ADDR"""
    + r""" MASTER_PORT=$MASTER_PORT NCCL_DEBUG=$NCCL_DEBUG ARGS=$*" >> "$STUB_LOG/ranks.log"
""",
    "scontrol": r"""#!/bin/bash
echo "$*" >> "$STUB_LOG/scontrol.log"
if [[ "$1 $2" == "show hostnames" ]]; then printf 'node%03d\n' 1 2 3 4 5 6 7 8; fi
# `show job`: the state slurmctld would report, from STUB_JOB (start) and then STUB_JOB_AFTER (once a
# rank has exited); `requeue` fails when STUB_REQUEUE_FAILS is set.
if [[ "$1 $2" == "show job" ]]; then
    state="${STUB_JOB:-}"
    [[ ! -e "$STUB_LOG/ranks.done" ]] || state="${STUB_JOB_AFTER:-$state}"
    echo "$state"
fi
if [[ "$1" == requeue && -n "${STUB_REQUEUE_FAILS:-}" ]]; then
    echo "Requested operation is presently disabled" >&2
    exit 1
fi
""",
    "sbatch": r"""#!/bin/bash
printf '%s\n' "$@" > "$STUB_LOG/sbatch.argv"
echo "TROPD_CODE_DIR=$TROPD_CODE_DIR SBATCH_ACCOUNT=$SBATCH_ACCOUNT" > "$STUB_LOG/sbatch.env"
""",
}


@pytest.fixture
def slurm(tmp_path):
    """(environment for the script, log directory): stubs first on PATH, a fake 8 x 8 allocation."""
    bin_dir, log_dir, run_dir = tmp_path / "bin", tmp_path / "log", tmp_path / "run"
    for directory in (bin_dir, log_dir, run_dir):
        directory.mkdir()
    for name, text in STUBS.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = {
        "PATH": f"{bin_dir}:/usr/bin:/bin",
        "HOME": str(tmp_path),
        "STUB_LOG": str(log_dir),
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NODELIST": "node[001-008]",
        "SLURM_NNODES": "8",
        "SLURM_NTASKS": "64",
        "SLURM_NTASKS_PER_NODE": "8",
        "SLURM_SUBMIT_DIR": str(REPO),
        "TROPD_RUN_DIR": str(run_dir),
        "TROPD_RECIPE": "deepseek_math_tropd",
    }
    return env, log_dir


def _run(script: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(script), *args], env=env, capture_output=True, text=True, timeout=60, cwd=REPO
    )


def test_8node_script_launches_64_ranks_with_torch_distributed_env(slurm):
    env, log = slurm
    result = _run(SCRIPT_8NODE, env, "optim.lr=1e-6")
    assert result.returncode == 0, result.stderr
    run_dir = env["TROPD_RUN_DIR"]
    rank_command = (
        'export RANK="$SLURM_PROCID" LOCAL_RANK="$SLURM_LOCALID" WORLD_SIZE="$SLURM_NTASKS"\n'
        'exec "${TROPD_PYTHON:-python}" -m megatron_tropd.train --recipe "$TROPD_RECIPE" "$@"'
    )
    assert (log / "srun.argv").read_text().split("\n")[:-1] == [
        "--kill-on-bad-exit=0",  # a rank's 75 after its save must not get its peers killed mid-teardown
        "--wait=120",
        "--nodes=8",
        "--ntasks-per-node=8",
        f"--chdir={REPO}",
        f"--output={run_dir}/logs/4242.rank%t.log",
        "--open-mode=append",  # a requeued job (same id) appends to its logs
        "bash",
        "-c",
        *rank_command.split("\n"),
        "tropd-rank",
        f"checkpoint.save_dir={run_dir}",
        "optim.lr=1e-6",
    ]
    args = f"-m megatron_tropd.train --recipe deepseek_math_tropd checkpoint.save_dir={run_dir} optim.lr=1e-6"
    assert (log / "ranks.log").read_text().splitlines() == [
        f"RANK={rank} LOCAL_RANK={rank % 8} WORLD_SIZE=64 MASTER_ADDR=node001 MASTER_PORT=24242 "
        f"NCCL_DEBUG=WARN ARGS={args}"
        for rank in range(64)
    ]
    assert (log / "scontrol.log").read_text().splitlines() == [  # no requeue
        "show hostnames node[001-008]",
        "show job -o 4242",
    ]
    assert "ranks exited with status 0" in result.stderr


def test_container_flags_only_with_an_image(slurm):
    env, log = slurm
    env = {
        **env,
        "CONTAINER_IMAGE": "nvcr.io/nvidia/pytorch:25.09-py3",
        "CONTAINER_MOUNTS": "/lustre:/lustre",
    }
    assert _run(SCRIPT_8NODE, env).returncode == 0
    argv = (log / "srun.argv").read_text().splitlines()
    run_dir = env["TROPD_RUN_DIR"]
    assert argv[7:10] == [
        "--container-image=nvcr.io/nvidia/pytorch:25.09-py3",
        f"--container-mounts={run_dir}:{run_dir},{REPO}:{REPO},/lustre:/lustre",
        f"--container-workdir={REPO}",
    ]
    assert argv[10:12] == ["bash", "-c"]


def test_a_wrong_code_dir_is_refused(slurm):
    env, log = slurm
    result = _run(SCRIPT_8NODE, {**env, "TROPD_CODE_DIR": "/nonexistent"})
    assert result.returncode == 2 and "is not the repository" in result.stderr


@pytest.mark.parametrize("missing", ["TROPD_RUN_DIR", "TROPD_RECIPE"])
def test_missing_required_env_fails_with_exit_2(slurm, missing):
    env, log = slurm
    del env[missing]
    result = _run(SCRIPT_8NODE, env)
    assert result.returncode == 2
    assert f"{missing} is not set; export {missing}=" in result.stderr
    assert not (log / "srun.argv").exists()


def test_outside_an_allocation_the_script_submits_itself(slurm):
    env, log = slurm
    env = {k: v for k, v in env.items() if not k.startswith("SLURM_")}
    result = _run(SCRIPT_8NODE, env)
    assert result.returncode == 2 and "SBATCH_ACCOUNT is not set" in result.stderr
    result = _run(SCRIPT_8NODE, {**env, "SBATCH_ACCOUNT": "acct"})
    assert result.returncode == 2 and "SBATCH_PARTITION is not set" in result.stderr
    env = {**env, "SBATCH_ACCOUNT": "acct", "SBATCH_PARTITION": "batch"}
    for script in (SCRIPT_8NODE, SCRIPT_1NODE):
        result = _run(script, env, "train_steps=10")
        assert result.returncode == 0, result.stderr
        assert (log / "sbatch.argv").read_text().splitlines() == [
            "--export=ALL",
            f"--output={env['TROPD_RUN_DIR']}/logs/slurm-%j.out",
            str(script),
            "train_steps=10",
        ]
        assert (log / "sbatch.env").read_text() == f"TROPD_CODE_DIR={REPO} SBATCH_ACCOUNT=acct\n"


def test_1node_script_runs_the_same_job_on_its_allocation(slurm):
    env, log = slurm
    env = {**env, "SLURM_JOB_NODELIST": "node001", "SLURM_NNODES": "1", "SLURM_NTASKS": "8"}
    result = _run(SCRIPT_1NODE, env)
    assert result.returncode == 0, result.stderr
    assert (log / "srun.argv").read_text().splitlines()[2:4] == ["--nodes=1", "--ntasks-per-node=8"]
    lines = (log / "ranks.log").read_text().splitlines()
    assert [line.split()[:3] for line in lines] == [
        [f"RANK={r}", f"LOCAL_RANK={r}", "WORLD_SIZE=8"] for r in range(8)
    ]


RUNNING = "JobId=4242 JobName=tropd JobState=RUNNING Reason=None Requeue=1 Restarts=0 BatchFlag=1"


def _start_and_signal(env: dict[str, str], log: Path) -> tuple[int, str]:
    """Run the script with a long-running stub srun, send it SIGUSR1 once the ranks run (what Slurm's
    --signal=B:USR1@300 does); (exit status, stderr)."""
    process = subprocess.Popen(
        ["bash", str(SCRIPT_8NODE)],
        env={**env, "STUB_SRUN_SLEEP": "30"},
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 20
    while not (log / "srun.started").exists():
        assert process.poll() is None and time.monotonic() < deadline, "stub srun never started"
        time.sleep(0.05)
    process.send_signal(signal.SIGUSR1)
    _, stderr = process.communicate(timeout=20)
    return process.returncode, stderr


def _scontrol_calls(log: Path) -> list[str]:
    return (log / "scontrol.log").read_text().splitlines()


def test_warning_is_forwarded_to_the_ranks_then_the_job_is_requeued(slurm):
    env, log = slurm
    status, stderr = _start_and_signal({**env, "STUB_JOB": RUNNING}, log)
    assert status == 0, stderr
    assert (log / "srun.signals").read_text() == "USR1\n"  # the ranks were asked to checkpoint
    assert _scontrol_calls(log)[-2:] == ["show job -o 4242", "requeue 4242"]
    assert "job 4242 requeued: it resumes from that checkpoint" in stderr


def test_ranks_stopped_by_a_signal_to_the_steps_only_are_requeued(slurm):
    """`scancel --signal=USR1 JOBID` reaches the ranks, not the script: their status 75 is the cue."""
    env, log = slurm
    result = _run(SCRIPT_8NODE, {**env, "STUB_JOB": RUNNING, "STUB_RANK_STATUS": "75"})
    assert result.returncode == 0, result.stderr
    assert _scontrol_calls(log)[-1] == "requeue 4242"
    assert "requeued" in result.stderr


def test_a_job_slurm_requeues_itself_is_not_requeued_twice(slurm):
    """`scontrol requeue` / pre-emption: the job is COMPLETING with its restart count already raised."""
    env, log = slurm
    after = RUNNING.replace("RUNNING", "COMPLETING").replace("Restarts=0", "Restarts=1")
    result = _run(
        SCRIPT_8NODE, {**env, "STUB_JOB": RUNNING, "STUB_JOB_AFTER": after, "STUB_RANK_STATUS": "75"}
    )
    assert result.returncode == 0, result.stderr
    assert "requeue 4242" not in _scontrol_calls(log)
    assert "Slurm is requeueing job 4242 (restart 1)" in result.stderr


def test_a_cancelled_job_ends_with_its_checkpoint_and_is_not_requeued(slurm):
    """A plain `scancel`: COMPLETING, no restart counted. Slurm would accept a requeue; we must not ask."""
    env, log = slurm
    after = RUNNING.replace("RUNNING", "COMPLETING")
    result = _run(
        SCRIPT_8NODE, {**env, "STUB_JOB": RUNNING, "STUB_JOB_AFTER": after, "STUB_RANK_STATUS": "75"}
    )
    assert result.returncode == 0, result.stderr
    assert "requeue 4242" not in _scontrol_calls(log)
    assert "is ending (COMPLETING, cancelled or out of time), not requeued" in result.stderr


def test_a_refused_requeue_is_reported_and_fails_the_job(slurm):
    env, log = slurm
    env = {**env, "STUB_JOB": RUNNING, "STUB_RANK_STATUS": "75", "STUB_REQUEUE_FAILS": "1"}
    result = _run(SCRIPT_8NODE, env)
    assert result.returncode == 75
    assert "failed: Requested operation is presently disabled" in result.stderr
    assert "requeued:" not in result.stderr


def test_other_rank_failures_end_the_job_with_their_status(slurm):
    env, log = slurm
    result = _run(SCRIPT_8NODE, {**env, "STUB_JOB": RUNNING, "STUB_RANK_STATUS": "1"})
    assert result.returncode == 1
    assert "requeue 4242" not in _scontrol_calls(log)


@pytest.mark.parametrize(
    ("slurm_env", "threads"),
    [
        ({"SLURM_CPUS_PER_TASK": "6", "SLURM_CPUS_ON_NODE": "96", "SLURM_NTASKS_PER_NODE": "8"}, "6"),
        ({"SLURM_CPUS_ON_NODE": "96", "SLURM_NTASKS_PER_NODE": "8"}, "12"),
        ({"SLURM_CPUS_ON_NODE": "2", "SLURM_TASKS_PER_NODE": "4(x2)"}, "1"),
        ({"SLURM_CPUS_ON_NODE": "2", "SLURM_NTASKS_PER_NODE": "2", "OMP_NUM_THREADS": "5"}, "5"),
    ],
)
def test_env_sh_gives_each_rank_its_share_of_the_cpus(slurm_env, threads):
    result = subprocess.run(
        ["bash", "-c", f"source {REPO / 'slurm' / 'env.sh'} && echo $OMP_NUM_THREADS"],
        env={"PATH": "/usr/bin:/bin", **slurm_env},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.stdout.strip() == threads, result.stderr


# ---------------------------------------------------------------------------------------------------------
# nemo-run
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture
def nemo_run(tmp_path, monkeypatch):
    """nemo_run with its home in a temp dir (never ~/.nemo_run)."""
    nemo_run = pytest.importorskip("nemo_run")
    monkeypatch.setenv("NEMORUN_HOME", str(tmp_path / "nemo_home"))
    monkeypatch.setattr(nemo_run.config, "_NEMORUN_HOME", str(tmp_path / "nemo_home"))
    # nemo-run runs `mkdir` through invoke, which reads stdin; pytest's captured stdin refuses reads.
    monkeypatch.setattr(sys, "stdin", io.StringIO())
    return nemo_run


def _normalise(text: str, job_dir: Path) -> str:
    text = text.replace(str(job_dir), "<JOB_DIR>")
    return re.sub(r"--rdzv-id \d+", "--rdzv-id <RDZV_ID>", text)


def test_slurm_render_of_the_paper_recipe_matches_the_golden_file(nemo_run, tmp_path):
    from nemo_run.core.serialization.zlib_json import ZlibJSONSerializer

    from recipes import launch

    job_dir = tmp_path / "jobs"
    executor = launch.slurm_executor(
        nodes=8,
        gpus_per_node=8,
        account="acct",
        partition="batch",
        time="04:00:00",
        container_image="nvcr.io/nvidia/nemo:25.09",
        mounts=["/lustre:/lustre"],
        job_dir=str(job_dir),
        env_vars={"TROPD_RUN_DIR": "/lustre/runs/deepseek_math_tropd"},
    )
    task = launch.training_task("deepseek_math_tropd", ["optim.lr=1e-6"])
    text = _normalise(launch.render_sbatch(executor, task, "deepseek_math_tropd", str(job_dir)), job_dir)
    if os.environ.get("UPDATE_GOLDEN") == "1":
        GOLDEN.write_text(text)
    assert text == GOLDEN.read_text(), "sbatch render changed; rerun with UPDATE_GOLDEN=1 if intended"
    for flag in ("--nodes=8", "--gpus-per-node=8", "--exclusive", "--requeue", "--account=acct"):
        assert f"#SBATCH {flag}\n" in text
    assert "--nnodes 8 --nproc-per-node 8" in text and "export TROPD_RUN_DIR=" in text
    # The job dir the script mounts as /nemo_run is the one the job's files were written to.
    task_dir = job_dir / "experiments" / "tropd-deepseek_math_tropd" / "tropd-deepseek_math_tropd_dryrun"
    task_dir = task_dir / "deepseek_math_tropd"
    assert f"--container-mounts /lustre:/lustre,<JOB_DIR>/{task_dir.relative_to(job_dir)}:/nemo_run " in text
    serialized = (task_dir / "configs" / "deepseek_math_tropd_fn_or_script").read_text()
    partial = ZlibJSONSerializer().deserialize(serialized)
    assert partial.recipe == "deepseek_math_tropd" and partial.overrides == ["optim.lr=1e-6"]


def test_slurm_executor_asks_for_cpu_ranks_without_gpus(nemo_run, tmp_path):
    """--gpus-per-node 0 --ntasks-per-node 2: no GPU line, two ranks per node, and the script's paths
    (no container) name the files nemo-run wrote."""
    from recipes import launch

    job_dir = tmp_path / "jobs"
    executor = launch.slurm_executor(
        nodes=1, gpus_per_node=0, account="acct", partition="debug", time="00:10:00",
        container_image=None, mounts=[], job_dir=str(job_dir), ntasks_per_node=2,
    )  # fmt: skip
    text = launch.render_sbatch(executor, launch.training_task("tiny_cpu", []), "tiny_cpu", str(job_dir))
    assert "--gpus-per-node" not in text and "#SBATCH --nodes=1\n" in text
    assert "--nnodes 1 --nproc-per-node 2" in text
    config = re.search(r"fdl_runner -n tiny_cpu (\S+)", text).group(1)
    assert Path(config).is_file() and Path(config).is_relative_to(job_dir / "experiments")
    with pytest.raises(ValueError, match="--ntasks-per-node N"):
        launch.slurm_executor(
            nodes=1, gpus_per_node=0, account="a", partition="p", time="1", container_image=None,
            mounts=[], job_dir=str(job_dir),
        )  # fmt: skip


def test_local_executor_and_cli_checks(nemo_run, tmp_path, capsys):
    from recipes import launch

    executor = launch.local_executor(2)
    assert isinstance(executor, nemo_run.LocalExecutor) and executor.ntasks_per_node == 2
    assert executor.launcher == "torchrun"
    assert launch.main(["--recipe", "tiny_cpu", "--executor", "local", "--nproc", "3"]) == 2
    assert "do not split over the student's 3" in capsys.readouterr().err
    assert launch.main(["--recipe", "deepseek_math_tropd", "--executor", "slurm", "--account", ""]) == 2
    assert "--account and --partition" in capsys.readouterr().err
    slurm = ["--executor", "slurm", "--account", "a", "--partition", "p", "--nodes", "1"]
    # the world size checked before submission is nodes x ranks per node, whatever the GPUs
    cpu = ["--gpus-per-node", "0", "--ntasks-per-node", "3"]
    assert launch.main(["--recipe", "tiny_cpu", *slurm, *cpu]) == 2
    assert "do not split over the student's 3" in capsys.readouterr().err
    assert launch.main(["--recipe", "tiny_cpu", *slurm, "--gpus-per-node", "0"]) == 2
    assert "--ntasks-per-node N" in capsys.readouterr().err


@pytest.mark.slow
def test_launch_dryrun_prints_the_sbatch_script(nemo_run, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "NEMORUN_HOME": str(tmp_path / "home")}
    args = ["--recipe", "deepseek_math_opd", "--executor", "slurm", "--account", "a", "--partition", "p"]
    result = subprocess.run(
        [sys.executable, str(REPO / "recipes" / "launch.py"), *args, "--job-dir", str(tmp_path), "--dryrun"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert "#SBATCH --nodes=8" in result.stdout and "--nproc-per-node 8" in result.stdout


FAKE_TRAINER = """
import json, os, sys, types
trainer = types.ModuleType("megatron_tropd.trainer")
def run(config):
    path = os.path.join(os.environ["FAKE_TRAINER_LOG"], "rank" + os.environ["RANK"] + ".json")
    with open(path, "w") as f:
        json.dump({"name": config.name, "steps": config.train_steps, "world": os.environ["WORLD_SIZE"]}, f)
trainer.run = run
sys.modules["megatron_tropd.trainer"] = trainer
"""


def _launch_local(tmp_path: Path, extra_env: dict[str, str], *overrides: str) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        **extra_env,
        "NEMORUN_HOME": str(tmp_path / "home"),
        "OMP_NUM_THREADS": "1",
        "PATH": os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")]),  # torchrun
        "PYTHONPATH": os.pathsep.join(filter(None, [extra_env.get("PYTHONPATH"), str(REPO)])),
    }
    command = [sys.executable, str(REPO / "recipes" / "launch.py"), "--recipe", "tiny_cpu", "--executor"]
    return subprocess.run(
        [*command, "local", "--nproc", "2", *overrides],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )


@pytest.mark.slow
def test_local_executor_runs_every_rank_through_torchrun(nemo_run, tmp_path):
    """The launcher's plumbing, end to end, with a stand-in trainer that records what each rank got."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(FAKE_TRAINER)
    config_file = tmp_path / "run.yaml"  # travels to the ranks as a path; the override still wins
    config_file.write_text("name: from_yaml\ntrain_steps: 5\n")
    env = {"PYTHONPATH": str(site), "FAKE_TRAINER_LOG": str(tmp_path)}
    result = _launch_local(tmp_path, env, "--config", str(config_file), "train_steps=2")
    assert result.returncode == 0, result.stdout + result.stderr
    import json

    records = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    assert records == [{"name": "from_yaml", "steps": 2, "world": "2"}] * 2


@pytest.mark.slow
def test_local_executor_trains_the_tiny_recipe_for_two_steps(nemo_run, tmp_path):
    save_dir = tmp_path / "run"
    result = _launch_local(tmp_path, {}, "train_steps=2", f"checkpoint.save_dir={save_dir}")
    assert result.returncode == 0, result.stdout + result.stderr
    assert (save_dir / "checkpoints" / "latest").read_text().strip() == "step-0000002", "no final checkpoint"
    logged = (save_dir / "metrics.jsonl").read_text().splitlines()
    assert len(logged) == 2, logged
