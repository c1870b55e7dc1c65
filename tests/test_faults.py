"""Fault trials: what a run survives, each on the CPU recipe ``tiny_cpu`` with 2 gloo ranks."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from megatron_tropd.overrides import apply_overrides
from megatron_tropd.spawn import run_on_ranks
from recipes import get_recipe

# --- Non-finite training: skipped updates, a stop with the batch, no non-finite checkpoint -------------

DIVERGING = [
    "optim.lr=1.0", "optim.clip_grad=0", "optim.adam_beta2=0", "optim.adam_eps=1e-30", "optim.weight_decay=0",
]  # fmt: skip


def _diverging_config(save_dir):
    config = apply_overrides(get_recipe("tiny_cpu"), DIVERGING)
    checkpoint = dataclasses.replace(config.checkpoint, save_dir=str(save_dir), save_interval=1, keep_last=2)
    return dataclasses.replace(config, checkpoint=checkpoint, train_steps=10)


def diverging_worker(rank, world_size, config):
    from megatron_tropd.trainer import NonFiniteTrainingError, run

    try:
        run(config)
    except NonFiniteTrainingError as error:
        return str(error)
    return None


def guard_worker(rank, world_size):
    from megatron_tropd.training import nonfinite_agreed

    return [nonfinite_agreed(rank == 1), nonfinite_agreed(False)]


def test_one_rank_nonfinite_skips_every_rank():
    assert run_on_ranks(guard_worker, 2) == [[True, False], [True, False]]


def test_max_nonfinite_steps_is_validated():
    config = apply_overrides(get_recipe("tiny_cpu"), ["train.max_nonfinite_steps=0"])
    with pytest.raises(ValueError, match="train.max_nonfinite_steps must be an integer >= 1"):
        config.validate()


def _strict(text):
    def refuse(constant):
        raise ValueError(f"non-strict JSON constant {constant}")

    return [json.loads(line, parse_constant=refuse) for line in text.splitlines()]


def _published_weights_finite(step_dir):
    from torch.distributed.checkpoint import FileSystemReader

    metadata = FileSystemReader(str(step_dir)).read_metadata()
    tensors = {key: meta for key, meta in metadata.state_dict_metadata.items() if hasattr(meta, "size")}
    state = {key: torch.empty(meta.size, dtype=meta.properties.dtype) for key, meta in tensors.items()}
    state = {key: value for key, value in state.items() if value.is_floating_point()}
    assert state, f"no floating-point tensor found in {step_dir}"
    torch.distributed.checkpoint.load(state, storage_reader=FileSystemReader(str(step_dir)), no_dist=True)
    return all(bool(torch.isfinite(value).all()) for value in state.values())


@pytest.mark.slow
def test_diverging_run_skips_stops_and_keeps_the_finite_checkpoint(tmp_path):
    messages = run_on_ranks(diverging_worker, 2, _diverging_config(tmp_path))
    expected = "consecutive updates had a non-finite loss or gradient"
    assert all(message and expected in message for message in messages)
    records = _strict((tmp_path / "metrics.jsonl").read_text())
    skipped = [record["step"] for record in records if record.get("nonfinite_skipped")]
    stop_step = int(messages[0].split(":")[0].removeprefix("step "))
    batch = torch.load(tmp_path / f"nonfinite-step-{stop_step}.pt", weights_only=False)
    assert batch["step"] == stop_step and len(batch["ranks"]) == 2
    assert all(rows["tokens"].dim() == 2 and rows["sample_ids"].numel() > 0 for rows in batch["ranks"])
    assert len(skipped) == 2 and skipped == list(range(stop_step - 2, stop_step))  # the third is not logged
    checkpoints = tmp_path / "checkpoints"
    published = sorted(path for path in checkpoints.glob("step-*") if path.is_dir())
    assert published, "the last finite checkpoint was removed"
    assert all(_published_weights_finite(path) for path in published)
    latest = checkpoints / (checkpoints / "latest").read_text().strip()
    assert latest in published and latest == published[-1]
    assert math.isfinite(records[0]["loss"])


# --- Damaged checkpoint: refused naming the file, or the newest intact step resumed --------------------


def _short_run_config(save_dir, steps, *overrides):
    config = apply_overrides(get_recipe("tiny_cpu"), [f"checkpoint.save_dir={save_dir}", *overrides])
    checkpoint = dataclasses.replace(config.checkpoint, save_interval=1, keep_last=3)
    return dataclasses.replace(config, checkpoint=checkpoint, train_steps=steps)


def run_worker(rank, world_size, config):
    from megatron_tropd.checkpoint import CheckpointError
    from megatron_tropd.trainer import run

    try:
        run(config)
    except CheckpointError as error:
        return f"CheckpointError: {error}"
    return None


def _damage_newest_shard(step_dir):
    shard = max(step_dir.glob("*.distcp"), key=lambda path: path.stat().st_size)
    with open(shard, "r+b") as handle:
        handle.seek(shard.stat().st_size // 3)
        handle.write(bytes(range(256)) * 32)  # 8 KiB over the middle of the shard, size unchanged
    return shard


def test_damaged_shard_is_refused_then_the_previous_step_resumes(tmp_path):
    assert run_on_ranks(run_worker, 2, _short_run_config(tmp_path, 3)) == [None, None]
    checkpoints = tmp_path / "checkpoints"
    shard = _damage_newest_shard(checkpoints / "step-0000003")

    refused = run_on_ranks(run_worker, 2, _short_run_config(tmp_path, 4))
    assert all(shard.name in message and "(step 3) is damaged" in message for message in refused), refused
    assert sorted(path.name for path in checkpoints.glob("step-*")) == [f"step-000000{n}" for n in (1, 2, 3)]

    resumed = run_on_ranks(run_worker, 2, _short_run_config(tmp_path, 4, "checkpoint.on_damaged=previous"))
    assert resumed == [None, None]
    records = _strict((tmp_path / "metrics.jsonl").read_text())
    assert [record["step"] for record in records if "loss" in record] == [0, 1, 2, 3]
    assert len(list(checkpoints.glob("damaged-step-0000003-*"))) == 1  # kept aside, not deleted
    assert (checkpoints / "latest").read_text().strip() == "step-0000004"


# --- A killed launcher takes its workers down --------------------------------------------------------------


def _children(pid):
    """PIDs whose parent is ``pid`` (from /proc)."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            children.append(int(stat.parent.name))
    return children


def _alive(pid):
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _wait(condition, seconds):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.2)
    return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signals are Linux-only")
def test_killing_torchrun_process_group_kills_its_workers(tmp_path):
    """torchrun's workers run in their own sessions, so a kill of torchrun's process group misses them;
    the parent-death signal each rank sets at start takes them down with it."""
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "megatron_tropd.train",
        "--recipe", "tiny_cpu", "train_steps=100000", f"checkpoint.save_dir={tmp_path}",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launcher = subprocess.Popen(command, start_new_session=True, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)  # fmt: skip
    workers = []
    try:
        training = _wait(lambda: (tmp_path / "metrics.jsonl").exists(), 120)
        workers = [pid for pid in _children(launcher.pid) if _alive(pid)]
        assert training and len(workers) == 2, f"workers {workers}, training {training}"
        assert all(os.getpgid(pid) != launcher.pid for pid in workers)  # outside the launcher's group
        os.killpg(launcher.pid, signal.SIGKILL)
        launcher.wait(timeout=30)
        assert _wait(lambda: not any(_alive(pid) for pid in workers), 30), "workers outlived torchrun"
    finally:
        for pid in [launcher.pid, *workers]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
