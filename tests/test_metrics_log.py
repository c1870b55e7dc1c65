"""MetricsLog: every record (step and evaluation) reaches metrics.jsonl, TensorBoard and W&B; the console
gets a line every log_interval steps or a progress bar; a configured W&B project without wandb fails at
construction, wandb.init gets the configured name, entity and tags, a resumed run keeps its W&B id, and
TensorBoard that cannot start is said once, with the fix."""

from __future__ import annotations

import json
import logging
import sys
import types

import pytest

from megatron_tropd import metrics_log
from megatron_tropd.config import LoggingConfig
from megatron_tropd.metrics_log import WANDB_ID_FILE, MetricsLog


def _record(step):
    return {"step": step, "loss": 1.0 / (step + 1), "trust_fraction": 0.9, "grad_norm": 0.5, "method": "x"}


def _log(run_dir, total_steps=4, progress_bar=False, **logging_fields):
    logging_config = LoggingConfig(**{"tensorboard": False, **logging_fields})
    return MetricsLog(
        run_dir, logging_config, active=True, total_steps=total_steps, progress_bar=progress_bar
    )


def _jsonl(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_jsonl_gets_every_step_and_eval_record(tmp_path):
    log = _log(tmp_path, log_interval=3)
    log.write(_record(0))
    log.write({**_record(1), "eval/avg@4": 0.25})
    log.write_eval(2, {"avg@4": 0.5, "aime24": 0.375})
    log.close()
    log.close()
    assert _jsonl(tmp_path) == [
        _record(0),
        {**_record(1), "eval/avg@4": 0.25},
        {"step": 2, "eval/avg@4": 0.5, "eval/aime24": 0.375},
    ]


def test_inactive_rank_writes_nothing(tmp_path):
    log = MetricsLog(tmp_path / "run", LoggingConfig(), active=False, total_steps=2)
    log.write(_record(0))
    log.write_eval(0, {"avg@4": 0.5})
    log.close()
    assert not (tmp_path / "run").exists()


def test_console_line_every_log_interval_and_at_every_eval(tmp_path, caplog):
    log = _log(tmp_path, total_steps=5, log_interval=2)
    with caplog.at_level(logging.INFO, logger="megatron_tropd.metrics_log"):
        for step in range(5):
            log.write(_record(step))
        log.write_eval(5, {"avg@4": 0.5})
    log.close()
    lines = [r.getMessage() for r in caplog.records]
    assert [line.split()[1] for line in lines] == ["1", "3", "4", "5"]  # every 2nd step, the last, eval
    assert "loss=0.5" in lines[0] and "trust_fraction=0.9" in lines[0]
    assert lines[-1] == "step 5  eval/avg@4=0.5"
    assert len(_jsonl(tmp_path)) == 6  # the file still gets every step


def test_progress_bar_replaces_the_log_lines(tmp_path, capsys, caplog):
    log = _log(tmp_path, total_steps=3, progress_bar=True)
    with caplog.at_level(logging.INFO, logger="megatron_tropd.metrics_log"):
        for step in range(3):
            log.write({**_record(step), "response_length": 12.0})
        log.write_eval(3, {"avg@4": 0.5})
    log.close()
    out = capsys.readouterr().out
    assert "3/3" in out and "loss=0.333" in out and "response_length=12" in out
    assert "step 3  eval/avg@4=0.5" in out
    assert not caplog.records


def test_progress_bar_starts_at_the_resumed_step(tmp_path, capsys):
    logging_config = LoggingConfig(tensorboard=False)
    log = MetricsLog(tmp_path, logging_config, active=True, total_steps=4, start_step=2, progress_bar=True)
    log.write(_record(2))
    assert log.bar.n == 3
    log.close()
    assert "3/4" in capsys.readouterr().out


def test_tensorboard_gets_step_and_eval_scalars(tmp_path):
    pytest.importorskip("torch.utils.tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log = _log(tmp_path, tensorboard=True)
    log.write(_record(0))
    log.write_eval(1, {"avg@4": 0.5})
    log.close()
    events = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert events
    accumulator = EventAccumulator(str(tmp_path / "tensorboard"))
    accumulator.Reload()
    assert {"loss", "trust_fraction", "grad_norm", "eval/avg@4"} <= set(accumulator.Tags()["scalars"])
    assert [(e.step, e.value) for e in accumulator.Scalars("eval/avg@4")] == [(1, 0.5)]


def test_missing_tensorboard_warns_once_with_the_fix(tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # its import raises ImportError
    monkeypatch.setattr(metrics_log, "_WARNED", set())
    with caplog.at_level(logging.WARNING, logger="megatron_tropd.metrics_log"):
        for run in ("a", "b"):  # two runs in one process (the demo's, a sweep's): one warning
            log = _log(tmp_path / run, tensorboard=True)
            log.write(_record(0))
            log.close()
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    message = warnings[0].getMessage()
    assert "pip install tensorboard" in message and "logging.tensorboard=false" in message
    assert not (tmp_path / "a" / "tensorboard").exists() and len(_jsonl(tmp_path / "a")) == 1


def test_tensorboard_off_says_nothing(tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    monkeypatch.setattr(metrics_log, "_WARNED", set())
    with caplog.at_level(logging.WARNING, logger="megatron_tropd.metrics_log"):
        _log(tmp_path, tensorboard=False).close()
    assert not caplog.records


class _FakeRun:
    def __init__(self, calls):
        self.calls = calls

    def log(self, data, step):
        self.calls.append(("log", dict(data), step))

    def finish(self):
        self.calls.append(("finish",))


def _fake_wandb(calls):
    module = types.ModuleType("wandb")

    def init(**kwargs):
        calls.append(("init", kwargs))
        return _FakeRun(calls)

    module.init = init
    return module


def test_wandb_calls_and_a_stable_resume_id(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setitem(sys.modules, "wandb", _fake_wandb(calls))
    logging_config = LoggingConfig(tensorboard=False, wandb_project="tropd-tests")
    log = MetricsLog(
        tmp_path, logging_config, active=True, total_steps=2, run_name="unit", config_dict={"seed": 1},
        progress_bar=False,
    )  # fmt: skip
    log.write(_record(0))
    log.write_eval(1, {"avg@4": 0.5})
    log.close()
    run_id = (tmp_path / WANDB_ID_FILE).read_text().strip()
    assert calls[0] == (
        "init",
        {"project": "tropd-tests", "entity": None, "name": "unit", "tags": None, "dir": str(tmp_path),
         "config": {"seed": 1}, "resume": "allow", "id": run_id},
    )  # fmt: skip
    assert calls[1] == ("log", {"loss": 1.0, "trust_fraction": 0.9, "grad_norm": 0.5}, 0)
    assert calls[2:] == [("log", {"eval/avg@4": 0.5}, 1), ("finish",)]

    resumed_calls = []
    monkeypatch.setitem(sys.modules, "wandb", _fake_wandb(resumed_calls))
    MetricsLog(tmp_path, logging_config, active=True, total_steps=2, progress_bar=False).close()
    assert resumed_calls[0][1]["id"] == run_id


def test_wandb_init_gets_the_configured_name_entity_and_tags(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setitem(sys.modules, "wandb", _fake_wandb(calls))
    logging_config = LoggingConfig(
        tensorboard=False, wandb_project="tropd-tests", wandb_name="qwen-tropd-lr1e-6",
        wandb_entity="my-team", wandb_tags=("tropd", "ablation"),
    )  # fmt: skip
    MetricsLog(
        tmp_path, logging_config, active=True, total_steps=2, run_name="unit", progress_bar=False
    ).close()
    init = calls[0][1]
    assert (init["name"], init["entity"], init["tags"]) == (
        "qwen-tropd-lr1e-6",
        "my-team",
        ["tropd", "ablation"],
    )
    assert init["project"] == "tropd-tests" and init["resume"] == "allow"


@pytest.mark.parametrize("active", [True, False])
def test_missing_wandb_fails_at_construction_on_every_rank(tmp_path, monkeypatch, active):
    monkeypatch.setitem(sys.modules, "wandb", None)
    logging_config = LoggingConfig(tensorboard=False, wandb_project="tropd-tests")
    with pytest.raises(RuntimeError, match=r"pip install wandb.*or clear logging\.wandb_project"):
        MetricsLog(tmp_path, logging_config, active=active, total_steps=2)
    assert not (tmp_path / "metrics.jsonl").exists()


@pytest.mark.slow
def test_wandb_offline_run_resumes_the_same_id(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    for name, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_CONSOLE": "off"}.items():
        monkeypatch.setenv(name, value)
    logging_config = LoggingConfig(tensorboard=False, wandb_project="tropd-tests")
    for step in range(2):  # the second construction is the resumed job
        log = MetricsLog(
            tmp_path, logging_config, active=True, total_steps=2, start_step=step, progress_bar=False
        )
        log.write(_record(step))
        log.close()
    run_id = (tmp_path / WANDB_ID_FILE).read_text().strip()
    runs = sorted((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(run.name.endswith(f"-{run_id}") for run in runs)


@pytest.mark.parametrize(
    "pp_rank, dp_rank, tp_rank, reporting",
    [(1, 0, 0, True), (1, 1, 0, False), (1, 0, 1, False), (0, 0, 0, False)],
)
def test_the_reporting_rank_is_the_last_stage_at_dp_and_tp_rank_0(pp_rank, dp_rank, tp_rank, reporting):
    from megatron_tropd.topology import GridPosition, ModelGroups, ParallelLayout

    position = GridPosition(tp_rank=tp_rank, pp_rank=pp_rank, dp_rank=dp_rank)
    groups = ModelGroups(ParallelLayout(2, 2), 2, position, pg_collection=None, pipeline_ranks=(0, 1))
    assert groups.is_reporting_rank is reporting


@pytest.mark.parametrize("active", [True, False])
def test_for_run_writes_only_when_active(tmp_path, active):
    from megatron_tropd.config import RunConfig

    config = RunConfig(name="unit", logging=LoggingConfig(tensorboard=False), train_steps=7)
    log = MetricsLog.for_run(config, tmp_path, active=active, start_step=3)
    log.write(_record(3))
    log.close()
    assert log.active is active and log.total_steps == 7
    assert (tmp_path / "metrics.jsonl").exists() is active


def test_nonfinite_values_are_written_as_null(tmp_path):
    log = _log(tmp_path)
    log.write({"step": 0, "loss": float("nan"), "grad_norm": float("inf"), "lr": 0.5})
    log.close()

    def refuse(constant):
        raise ValueError(f"non-strict JSON constant {constant}")

    text = (tmp_path / "metrics.jsonl").read_text()
    assert json.loads(text, parse_constant=refuse) == {"step": 0, "loss": None, "grad_norm": None, "lr": 0.5}


def test_resume_drops_the_rows_it_writes_again(tmp_path):
    log = _log(tmp_path)
    for step in range(4):
        log.write(_record(step))
        log.write_eval(step + 1, {"avg@4": step / 4})
    log.close()
    logging_config = LoggingConfig(tensorboard=False)
    resumed = MetricsLog(
        tmp_path, logging_config, active=True, total_steps=4, start_step=2, progress_bar=False
    )  # the checkpoint of step 2 (after the evaluation at 2): steps 2 and 3 run again
    resumed.write(_record(2))
    resumed.write_eval(3, {"avg@4": 0.5})
    resumed.close()
    rows = _jsonl(tmp_path)
    assert [row["step"] for row in rows] == [0, 1, 1, 2, 2, 3]
    assert rows[-1] == {"step": 3, "eval/avg@4": 0.5} and rows[3] == {"step": 2, "eval/avg@4": 0.25}
    assert not list(tmp_path.glob("*.tmp"))
