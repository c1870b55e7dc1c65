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


# --- Background saves: the synchronous run's checkpoints; a crash or a stop signal mid-write --------------

ASYNC_STEPS, ASYNC_CRASH_STEP = 4, 2


def _async_config(save_dir, async_save):
    config = _short_run_config(save_dir, ASYNC_STEPS, f"checkpoint.async_save={str(async_save).lower()}")
    return dataclasses.replace(
        config, checkpoint=dataclasses.replace(config.checkpoint, keep_last=ASYNC_STEPS)
    )


def _slow_background_write(step, seconds):
    """The writer of ``step``'s shards sleeps ``seconds`` first (patched before the writer forks)."""
    from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync

    write = FileSystemWriterAsync.write_preloaded_data_multiproc

    def slow(transform_list, use_msc, rank, write_buckets, results_queue):
        if f"step-{step:07d}-" in write_buckets[0][0]:
            time.sleep(seconds)
        write(transform_list, use_msc, rank, write_buckets, results_queue)

    FileSystemWriterAsync.write_preloaded_data_multiproc = staticmethod(slow)


def _on_rank1_at_step(rank, step, action):
    """Run ``action`` on rank 1 as training step ``step`` starts."""
    from megatron_tropd import trainer

    original = trainer.train_one_step

    def train_one_step(job, index):
        if index == step and rank == 1:
            action()
        return original(job, index)

    trainer.train_one_step = train_one_step


def records_worker(rank, world_size, config):
    from megatron_tropd.trainer import run

    return [(record["step"], record["loss"]) for record in run(config)]


def killed_during_save_worker(rank, world_size, config, step):
    """Rank 1 is killed (SIGKILL) as step ``step`` starts, while its save of step ``step`` is written."""
    from megatron_tropd.trainer import run

    _slow_background_write(step, 2)
    _on_rank1_at_step(rank, step, lambda: os.kill(os.getpid(), signal.SIGKILL))
    run(config)


def _forked_writers():
    """This process's children forked from it (the background writer; not the spawned helpers)."""
    mine = Path("/proc/self/cmdline").read_bytes()
    return [pid for pid in _children(os.getpid()) if Path(f"/proc/{pid}/cmdline").read_bytes() == mine]


def signalled_during_save_worker(rank, world_size, config, step):
    """As step ``step`` starts, rank 1's writer of step ``step`` gets SIGINT and SIGTERM, and the rank a
    SIGTERM: the run stops after that step."""
    from megatron_tropd.trainer import run

    signalled = []

    def signal_writer_and_rank():
        signalled.extend(_forked_writers())
        for pid in signalled:
            os.kill(pid, signal.SIGINT)
            os.kill(pid, signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)

    _slow_background_write(step, 2)
    _on_rank1_at_step(rank, step, signal_writer_and_rank)
    records = run(config)
    return {"records": [(record["step"], record["loss"]) for record in records], "signalled": len(signalled)}


def _same_checkpoint(first, second):
    """The same files and bytes, but for the writer's own id in ``.metadata`` (its directory and a random
    save id) and that file's hash in our manifest."""
    import pickle

    names = sorted(str(path.relative_to(first)) for path in first.rglob("*") if path.is_file())
    assert names == sorted(str(path.relative_to(second)) for path in second.rglob("*") if path.is_file())
    for name in set(names) - {".metadata", "tropd_checkpoint.json"}:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    written = [pickle.loads((path / ".metadata").read_bytes()) for path in (first, second)]
    assert written[0].state_dict_metadata == written[1].state_dict_metadata
    assert written[0].storage_data == written[1].storage_data
    ours = [json.loads((path / "tropd_checkpoint.json").read_text()) for path in (first, second)]
    for metadata in ours:
        del metadata["integrity"]["files"][".metadata"]
    assert ours[0] == ours[1]


@pytest.fixture(scope="module")
def async_runs(tmp_path_factory):
    """A synchronous run; the same run saving in the background, rank 1 killed mid-write; its rerun,
    signalled mid-write (stops after the step, saving)."""
    base = tmp_path_factory.mktemp("async")
    sync = dict(run_on_ranks(records_worker, 2, _async_config(base / "sync", False))[0])
    config = _async_config(base / "async", True)
    with pytest.raises(Exception):  # noqa: B017 - whatever the launcher reports for a killed rank
        run_on_ranks(killed_during_save_worker, 2, config, ASYNC_CRASH_STEP)
    checkpoints = base / "async" / "checkpoints"
    after_crash = {
        "latest": (checkpoints / "latest").read_text().strip(),
        "listing": sorted(os.listdir(checkpoints)),
    }
    rerun = run_on_ranks(signalled_during_save_worker, 2, config, ASYNC_CRASH_STEP)
    return {"base": base, "sync": sync, "after_crash": after_crash, "rerun": rerun}


def test_background_saves_and_their_resume_match_synchronous_saves(async_runs):
    base, sync = async_runs["base"], async_runs["sync"]
    assert sorted(sync) == list(range(ASYNC_STEPS)) and len(set(sync.values())) == ASYNC_STEPS
    logged = {row["step"]: row["loss"] for row in _strict((base / "async" / "metrics.jsonl").read_text())}
    assert logged == {step: sync[step] for step in range(ASYNC_CRASH_STEP + 1)}  # before and after the crash
    assert async_runs["rerun"][0]["records"] == [(1, sync[1]), (2, sync[2])]
    for step in (1, 2, 3):  # 1 and 2 written in the background, 3 on the stop signal
        name = f"step-{step:07d}"
        _same_checkpoint(base / "sync" / "checkpoints" / name, base / "async" / "checkpoints" / name)


def test_a_rank_killed_during_a_background_save_leaves_latest_at_the_previous_step(async_runs):
    after_crash = async_runs["after_crash"]
    assert after_crash["latest"] == "step-0000001"
    assert "step-0000002" not in after_crash["listing"]
    assert any(name.startswith("tmp-step-0000002-") for name in after_crash["listing"])
    assert async_runs["rerun"][0]["records"][0][0] == 1  # resumed from step 1
    checkpoints = async_runs["base"] / "async" / "checkpoints"
    assert not any(name.startswith("tmp-") for name in os.listdir(checkpoints))  # removed by the next save


def test_stop_signals_during_a_background_save_let_it_finish(async_runs):
    """The writer ignores SIGINT and SIGTERM; the stop publishes the pending save, then saves the stop."""
    assert async_runs["rerun"][1]["signalled"] >= 1
    checkpoints = async_runs["base"] / "async" / "checkpoints"
    assert (checkpoints / "latest").read_text().strip() == "step-0000003"
    assert sorted(path.name for path in checkpoints.glob("step-*")) == [f"step-000000{n}" for n in (1, 2, 3)]


def test_async_save_is_validated(monkeypatch):
    from megatron_tropd.config import CheckpointConfig

    with pytest.raises(ValueError, match="checkpoint.async_save must be true or false; got 'yes'"):
        CheckpointConfig(async_save="yes").validate()
    monkeypatch.setattr("multiprocessing.get_all_start_methods", lambda: ["spawn"])
    with pytest.raises(ValueError, match="checkpoint.async_save=true needs the 'fork' start method"):
        CheckpointConfig(async_save=True).validate()
    CheckpointConfig(async_save=False).validate()


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
