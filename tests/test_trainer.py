"""The distillation loop end to end on 2 gloo ranks (tiny CPU recipe): it trains, logs and checkpoints;
after one rank is killed (SIGKILL) in the middle of a step, rerunning the same command resumes from the
last checkpoint and gives exactly the losses of an uninterrupted run. Every method of METHOD_NAMES
trains two steps on one job (one spawn) with finite metrics and a non-zero gradient, and only the TrOPD
family generates teacher prefixes and carries the guidance term; per method, the recipe as launched
decides both (checked cheaply on the request builder with a recording teacher)."""

from __future__ import annotations

import dataclasses
import json
import math
import types

import pytest

from megatron_tropd import train
from megatron_tropd.config import METHOD_NAMES
from megatron_tropd.config_file import compose
from megatron_tropd.methods import METHOD_SPECS
from megatron_tropd.models import tiny
from megatron_tropd.spawn import run_on_ranks
from recipes import get_recipe
from tests.loss_helpers import make_method_context

# method.md: guidance belongs to the TrOPD family; every other method runs fully on-policy by default
GUIDED_BY_DEFAULT = {"tropd", "tropd_mask", "tropd_clip", "tropd_aopd", "tropd_full"}


def _requests_as_launched(monkeypatch, recipe: str, overrides: list[str]):
    """``trainer._requests`` at step 0 of the recipe as ``train`` builds it, with a teacher that records
    each generation call and answers with an 8-token response; and the loss terms of a teacher-prefix
    token and a student token under the run's effective guidance."""
    from megatron_tropd import losses, trainer

    config = train.build_config(recipe, overrides, {})
    teacher_calls = []

    def fake_generate(engine, requests, sampling):
        assert engine == "teacher engine", "only the teacher writes prefixes"
        teacher_calls.append(list(requests))
        return [types.SimpleNamespace(generated_token_ids=list(range(8))) for _ in requests]

    monkeypatch.setattr(trainer, "generate_data_parallel", fake_generate)
    job = types.SimpleNamespace(
        config=config, teacher_engines={"teacher": "teacher engine"},
        topology=types.SimpleNamespace(teacher=None), eos_token_id=None,
    )  # fmt: skip
    prompts = [types.SimpleNamespace(token_ids=(1, 2, 3))] * config.rollout.prompts_per_step
    requests = trainer._requests(job, 0, prompts)
    signals = _one_prefix_token(config.method.topk)
    context = make_method_context(
        config.method, signals, 0, config.train_steps, guidance=config.guidance_enabled
    )
    terms = losses.token_loss(signals, config.method, context).terms
    return config, teacher_calls, requests, terms


def _one_prefix_token(topk: int):
    import torch

    from megatron_tropd.losses import TokenSignals

    lp, lp_topk, both = torch.full((2,), -1.0), torch.full((2, topk), -3.0), torch.tensor([True, True])
    return TokenSignals(
        lp_student=lp.clone().requires_grad_(), lp_student_old=lp, lp_teacher=lp - 0.5,
        lp_student_topk=lp_topk.clone().requires_grad_(), lp_teacher_topk=lp_topk,
        entropy_student_old=torch.ones(2), entropy_teacher=torch.ones(2), trust_mask=both,
        is_teacher_prefix=torch.tensor([True, False]), loss_mask=both,
        full_fkl=torch.ones(2, requires_grad=True), full_rkl=torch.ones(2, requires_grad=True),
        full_jsd=torch.ones(2, requires_grad=True),
    )  # fmt: skip


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_recipe_as_launched_prefixes_and_guidance_term_only_for_the_tropd_family(method, monkeypatch):
    config, teacher_calls, requests, terms = _requests_as_launched(monkeypatch, f"tiny_cpu_{method}", [])
    guided = method in GUIDED_BY_DEFAULT
    assert config.rollout.guidance is guided  # resolved to a plain bool, as --print-config shows it
    assert len(teacher_calls) == int(guided), "the teacher decodes only when guidance is on"
    assert any(r.prefix_token_ids for r in requests) == guided
    assert ("guidance" in terms) == guided
    paper = train.build_config(f"deepseek_math_{method}", [], {}, strict_paths=False)
    assert paper.rollout.guidance is guided == METHOD_SPECS[method].guidance


@pytest.mark.parametrize(("method", "forced"), [("opd", "true"), ("tropd", "false"), ("fkl_outlier", "true")])
def test_guidance_can_be_forced_either_way_as_an_ablation(method, forced, monkeypatch):
    config, teacher_calls, requests, terms = _requests_as_launched(
        monkeypatch, f"tiny_cpu_{method}", [f"rollout.guidance={forced}"]
    )
    on = forced == "true"
    assert config.rollout.guidance is on and len(teacher_calls) == int(on)
    assert any(r.prefix_token_ids for r in requests) == on and ("guidance" in terms) == on


def _config(save_dir, steps):
    config = get_recipe("tiny_cpu")
    checkpoint = dataclasses.replace(config.checkpoint, save_dir=str(save_dir), save_interval=2)
    return dataclasses.replace(config, checkpoint=checkpoint, train_steps=steps)


def run_worker(rank, world_size, config):
    from megatron_tropd.trainer import run

    return run(config)


def killed_worker(rank, world_size, config, kill_step):
    """Run the loop, but SIGKILL rank 1 as soon as step ``kill_step`` starts."""
    import os
    import signal

    from megatron_tropd import trainer

    original = trainer.train_one_step

    def train_one_step(job, step):
        if step == kill_step and rank == 1:
            os.kill(os.getpid(), signal.SIGKILL)
        return original(job, step)

    trainer.train_one_step = train_one_step
    return trainer.run(config)


def _records(save_dir, steps):
    per_rank = run_on_ranks(run_worker, 2, _config(save_dir, steps))
    return [record for records in per_rank for record in records]


@pytest.mark.slow
def test_loop_trains_logs_checkpoints_and_resumes_exactly(tmp_path):
    straight = _records(tmp_path / "straight", 3)
    assert [r["step"] for r in straight] == [0, 1, 2]
    for record in straight:
        assert all(
            math.isfinite(record[name]) for name in ("loss", "term/pg", "term/outlier_fkl", "grad_norm")
        )
        assert 0.0 <= record["trust_fraction"] <= 1.0 and record["response_length"] > 0
    assert straight[0]["prefix_share"] > 0  # guidance is on at the start of training
    logged = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == [0, 1, 2]
    assert (tmp_path / "straight" / "checkpoints" / "latest").read_text().strip() == "step-0000003"
    written = compose(tmp_path / "straight" / "config.yaml", get_recipe)
    assert written == _config(tmp_path / "straight", 3)  # the run's config.yaml reruns the same run

    with pytest.raises(Exception):  # noqa: B017 - whatever the launcher reports for a killed rank
        run_on_ranks(killed_worker, 2, _config(tmp_path / "resumed", 3), 2)
    resumed = _records(tmp_path / "resumed", 3)  # the same command again: resumes at step 2
    assert [r["step"] for r in resumed] == [2]
    for name in ("loss", "term/pg", "term/outlier_fkl", "trust_fraction", "grad_norm"):
        assert resumed[0][name] == straight[2][name], name


def every_method_worker(rank, world_size, config, steps):
    """Build the job once, then train ``steps`` steps of each method on it (one spawn for all methods)."""
    from megatron_tropd import trainer
    from megatron_tropd.runtime import shutdown_distributed

    job, _ = trainer.setup(config)
    records = {}
    try:
        for method in METHOD_NAMES:
            job.config.method = _method_config(method, config.train_steps)
            records[method] = [trainer.train_one_step(job, step).row() for step in range(steps)]
    finally:
        shutdown_distributed()
    return records


def _method_config(method, train_steps):
    method_config = get_recipe(f"tiny_cpu_{method}").method
    if method == "reopold_2stage":  # switch after step 0 so two steps cover both stages
        fraction = 1 / train_steps
        method_config = dataclasses.replace(method_config, reopold_switch_fraction=fraction)
        assert method_config.reopold_switch_step(train_steps) == 1
    return method_config


@pytest.mark.slow
def test_every_method_trains_two_steps_with_finite_metrics(tmp_path):
    config = _config(tmp_path / "every_method", 4)
    config.checkpoint.resume = "never"
    per_rank = run_on_ranks(every_method_worker, 2, config, 2)
    reported = per_rank[0]  # rank 0 is the reporting rank (last stage, DP/TP rank 0)
    assert set(reported) == set(METHOD_NAMES)
    for method, records in reported.items():
        assert [r["step"] for r in records] == [0, 1], method
        for record in records:
            assert "loss" in record, method
            numeric = {k: v for k, v in record.items() if isinstance(v, (int, float))}
            bad = {k: v for k, v in numeric.items() if not math.isfinite(v)}
            assert not bad, f"{method}: non-finite {bad}"
            assert record["grad_norm"] > 0, method
            # the hidden teacher payload (the full-vocabulary methods) brings the top-k bias metrics
            hidden = _method_config(method, config.train_steps).hidden_payload
            assert ("bias/full_minus_topk_outlier" in record) == hidden, method
        # end to end: only the TrOPD family continues teacher prefixes and has the guidance term
        guided = method in GUIDED_BY_DEFAULT
        assert (records[0]["prefix_share"] > 0) == guided, method
        assert all(("term/guidance" in r) == guided for r in records), method


def precision_worker(rank, world_size, config):
    """The dtypes each model is built in, the optimizer's main weights, and one step's loss."""
    from megatron_tropd import trainer
    from megatron_tropd.runtime import shutdown_distributed

    job, _ = trainer.setup(config)
    try:
        main_params = [p for group in job.student.optimizer.param_groups for p in group["params"]]
        dtypes = {
            "student": sorted({str(p.dtype) for p in job.student.module.parameters()}),
            "teacher": sorted({str(p.dtype) for p in job.teacher.stage.parameters()}),
            "main": sorted({str(p.dtype) for p in main_params}),
        }
        loss = trainer.train_one_step(job, 0).metrics["loss"]
    finally:
        shutdown_distributed()
    return dtypes, loss


@pytest.mark.slow
def test_precision_is_a_setting_of_each_model(tmp_path):
    config = train.build_config(
        "tiny_cpu",
        ["train.precision=bf16", "train.teacher_precision=fp16", f"checkpoint.save_dir={tmp_path}"],
        {},
    )
    (dtypes, loss), _ = run_on_ranks(precision_worker, 2, config)
    assert dtypes == {"student": ["torch.bfloat16"], "teacher": ["torch.float16"], "main": ["torch.float32"]}
    assert math.isfinite(loss)


@pytest.mark.parametrize(("recipe", "payload"), [("tiny_cpu_fkl_full", "topk"), ("tiny_cpu_tropd", "hidden")])
def test_hidden_payload_takes_several_teachers_of_the_students_vocabulary(recipe, payload):
    from megatron_tropd.config import TeacherConfig

    config = get_recipe(recipe)
    config.method.teacher_payload = payload
    config.teachers = {"math": TeacherConfig(), "code": TeacherConfig()}
    assert config.method.hidden_payload
    config.validate()  # each teacher's output layer serves its own rows (tests/test_multi_teacher.py)
    config.teachers["code"] = dataclasses.replace(config.teachers["code"], model=tiny(vocab_size=301))
    with pytest.raises(ValueError, match="teachers.code.model vocab_size 301"):
        config.validate()
