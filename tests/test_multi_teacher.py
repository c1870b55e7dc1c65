"""Several teachers in one job: each rollout is scored (and, with guidance, prefixed) by the teacher its
prompt's ``domain`` names, on that teacher's own layout; bad routing or layouts fail before any model.

On 2 gloo ranks: a "math" teacher at TP2 and a "code" teacher at TP1 (DP2), student at TP1 (DP2). The
routed signals of each row equal those of its teacher scoring the batch alone, each teacher runs only
on its own rows, and the loop trains with per-teacher metrics in its records.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch

from megatron_tropd.config import MethodConfig, RunConfig, TeacherConfig
from megatron_tropd.models import tiny
from megatron_tropd.overrides import apply_overrides
from megatron_tropd.spawn import run_on_ranks
from recipes import get_recipe
from tests.test_packing import LENGTHS, heavy_tailed_batch

METHOD = MethodConfig(name="tropd", topk=8)
ROUTES = ["math", "code", "code", "math", "code", "code", "code", "math"]
SIGNALS = ("lp_teacher", "topk_ids", "topk_logprobs")


def _teachers() -> dict[str, TeacherConfig]:
    return {
        "code": TeacherConfig(tiny(), tensor_parallel=1),
        "math": TeacherConfig(tiny(num_layers=2, hidden_size=96, num_attention_heads=6), tensor_parallel=2),
    }


# ---------------------------------------------------------------------------------------------------------
# Configuration: clear errors before any model loads
# ---------------------------------------------------------------------------------------------------------


def test_a_prompt_whose_domain_has_no_teacher_is_refused_when_prompts_load(tmp_path):
    from megatron_tropd.data import load_run_prompts

    prompts = tmp_path / "prompts.jsonl"
    rows = [{"id": "a", "prompt_token_ids": [1, 2], "domain": "math"}, {"id": "b", "prompt_token_ids": [3]}]
    prompts.write_text("\n".join(json.dumps(row) for row in rows))
    config = RunConfig(teachers=_teachers())
    config.data.train_prompts = str(prompts)
    with pytest.raises(ValueError, match="prompt 'b': a prompt has no domain field.*code, math"):
        load_run_prompts(config, None)
    config.data.default_domain = "code"
    assert [p.domain for p in load_run_prompts(config, None)] == ["math", None]
    assert [config.route(p.domain) for p in load_run_prompts(config, None)] == ["math", "code"]


def test_teacher_vocabulary_layout_and_default_domain_are_checked_up_front():
    teachers = _teachers()
    teachers["code"] = dataclasses.replace(teachers["code"], model=tiny(vocab_size=301))
    with pytest.raises(ValueError, match="student vocab_size 300 != teachers.code.model vocab_size 301"):
        RunConfig(teachers=teachers).validate()
    config = RunConfig(teachers=_teachers())
    with pytest.raises(ValueError, match="teachers.math: tensor_parallel x pipeline_parallel = 2 x 1 = 2"):
        config.validate(world_size=3)
    config.data.default_domain = "physics"
    with pytest.raises(ValueError, match="data.default_domain = 'physics' names no teacher"):
        config.validate()


def test_teachers_are_reachable_from_the_command_line():
    config = apply_overrides(RunConfig(teachers=_teachers()), ["teachers.math.checkpoint=/ckpt/math"])
    assert config.teachers["math"].checkpoint == "/ckpt/math"
    assert set(config.teacher_set()) == {"code", "math"}
    assert set(RunConfig().teacher_set()) == {"teacher"}  # one teacher: the plain fields


# ---------------------------------------------------------------------------------------------------------
# Routing on 2 gloo ranks
# ---------------------------------------------------------------------------------------------------------


def _counting(placed, seen: list):
    """Record the number of tokens each forward of ``placed``'s stage runs."""
    placed.stage.register_forward_pre_hook(lambda module, args: seen.append(int(args[0].numel())))


def routing_worker(rank, world_size, max_tokens):
    from megatron_tropd.placed import place_model
    from megatron_tropd.runtime import start
    from megatron_tropd.scoring import RoutedTeachers, ScoringSpec, score_batch
    from megatron_tropd.topology import ParallelLayout
    from megatron_tropd.training import build_student

    topology = start(ParallelLayout(1, 1), ParallelLayout(2, 1), seed=5)
    config = RunConfig()
    student = build_student(tiny(), config.optim, topology.student, 2, seed=3)
    teachers = {}
    for index, (name, teacher) in enumerate(sorted(_teachers().items())):
        layout = ParallelLayout(teacher.tensor_parallel, teacher.pipeline_parallel)
        teachers[name] = place_model(teacher.model, topology.groups_for(layout), seed=20 + index)
    spec = ScoringSpec.for_method(300, METHOD, 1, max_tokens=max_tokens)
    batch = heavy_tailed_batch()
    alone = {name: score_batch(batch, student.placed, t, spec, 0) for name, t in teachers.items()}
    seen = {name: [] for name in teachers}
    for name, teacher in teachers.items():
        _counting(teacher, seen[name])
    routed = score_batch(batch, student.placed, RoutedTeachers(teachers, ROUTES), spec, 0)
    rows = student.placed.rows(len(ROUTES), LENGTHS if max_tokens else None)
    return {
        "rows": (rows.start, rows.stop), "tokens_run": seen,
        "routed": {f: getattr(routed, f) for f in SIGNALS},
        "alone": {name: {f: getattr(scored, f) for f in SIGNALS} for name, scored in alone.items()},
    }  # fmt: skip


@pytest.fixture(scope="module", params=[0, 32], ids=["padded", "packed"])
def routing(request):
    return run_on_ranks(routing_worker, 2, request.param), request.param


def test_each_row_gets_its_own_teachers_signals(routing):
    per_rank, _ = routing
    for result in per_rank:
        start, stop = result["rows"]
        for local, row in enumerate(range(start, stop)):
            teacher = ROUTES[row]
            for field in SIGNALS:
                got, want = result["routed"][field][local], result["alone"][teacher][field][local]
                torch.testing.assert_close(got, want, rtol=0, atol=1e-6, msg=f"row {row} {field}")


def test_each_teacher_runs_only_its_own_rows(routing):
    per_rank, max_tokens = routing
    for name in ("math", "code"):
        mine = [row for row, route in enumerate(ROUTES) if route == name]
        # a TP group's ranks run the same tokens: count each replica once (its TP rank 0's view)
        tp = 2 if name == "math" else 1
        ran = sum(sum(result["tokens_run"][name]) for result in per_rank[::tp])
        width = max(LENGTHS)
        want = sum(LENGTHS[row] for row in mine) if max_tokens else len(mine) * width
        assert ran == want, name


def _full_fkl(student, scored, weight):
    """The student's exact full forward KL against the scored hidden states, on its loss tokens."""
    from megatron_tropd.ops import vocab_parallel_full_divergence

    with torch.no_grad():
        logits = student.module(scored.tokens, scored.position_ids, None)
        return vocab_parallel_full_divergence(
            logits, scored.teacher_hidden, weight, student.groups.tp_group, 300, "forward_kl",
            token_mask=scored.loss_mask, teacher_index=scored.teacher_index,
        )  # fmt: skip


def hidden_routing_worker(rank, world_size):
    """Two teachers of different widths (96 and 64) with the hidden payload: routed, and each alone."""
    from megatron_tropd.placed import place_model
    from megatron_tropd.runtime import start
    from megatron_tropd.scoring import RoutedTeachers, ScoringSpec, score_batch, teacher_weight_for_student
    from megatron_tropd.topology import ParallelLayout
    from megatron_tropd.training import attach_teacher_weight, build_student

    topology = start(ParallelLayout(1, 1), ParallelLayout(2, 1), seed=5)
    student = build_student(tiny(), RunConfig().optim, topology.student, 2, seed=3)
    teachers = {}
    for index, (name, teacher) in enumerate(sorted(_teachers().items())):
        layout = ParallelLayout(teacher.tensor_parallel, teacher.pipeline_parallel)
        teachers[name] = place_model(teacher.model, topology.groups_for(layout), seed=20 + index)
    method, batch = MethodConfig(name="fkl_full", topk=8), heavy_tailed_batch()
    widest = max(t.config.hidden_size for t in teachers.values())
    spec = ScoringSpec.for_method(300, method, 1, teacher_hidden_size=widest)
    routed = score_batch(batch, student.placed, RoutedTeachers(teachers, ROUTES), spec, 0)
    attach_teacher_weight(student, [teachers[name] for name in sorted(teachers)])
    alone = {}
    for name, teacher in sorted(teachers.items()):
        one_spec = ScoringSpec.for_method(300, method, 1, teacher_hidden_size=teacher.config.hidden_size)
        scored = score_batch(batch, student.placed, teacher, one_spec, 0)
        alone[name] = _full_fkl(student, scored, teacher_weight_for_student(teacher, student.placed))
    rows = student.placed.rows(len(ROUTES))
    return {
        "rows": (rows.start, rows.stop), "routed": _full_fkl(student, routed, student.teacher_weight),
        "teacher_index": routed.teacher_index, "alone": alone, "loss_mask": routed.loss_mask,
    }  # fmt: skip


def test_the_full_vocabulary_divergence_takes_each_rows_own_teacher():
    """With the hidden payload each row carries its own teacher's hidden states (math 96 wide, code 64)
    and index, and its exact full FKL equals the one against that teacher scoring the batch alone."""
    for result in run_on_ranks(hidden_routing_worker, 2):
        start, stop = result["rows"]
        assert result["routed"][result["loss_mask"]].gt(0).all()
        for local, row in enumerate(range(start, stop)):
            teacher = ROUTES[row]
            assert (result["teacher_index"][local] == sorted(("math", "code")).index(teacher)).all()
            got, want = result["routed"][local], result["alone"][teacher][local]
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=f"row {row} ({teacher})")


def two_teacher_loop_worker(rank, world_size, config):
    from megatron_tropd.trainer import run

    return run(config)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["tropd", "tropd_full"])  # top-k, and the hidden payload
def test_the_loop_trains_with_two_teachers_and_logs_each(tmp_path, method):
    prompts = tmp_path / "prompts.jsonl"
    lines = []
    source = Path(get_recipe("tiny_cpu").data.train_prompts).read_text().splitlines()
    for index, line in enumerate(source):
        row = json.loads(line)
        row["domain"] = "math" if index % 3 == 0 else "code"
        lines.append(json.dumps(row))
    prompts.write_text("\n".join(lines))
    config = get_recipe("tiny_cpu")
    config = dataclasses.replace(config, teachers=_teachers(), train_steps=2)
    config.method = dataclasses.replace(config.method, name=method)
    config.data.train_prompts = str(prompts)
    config.checkpoint.save_dir = str(tmp_path / "run")
    config.checkpoint.resume = "never"
    records = run_on_ranks(two_teacher_loop_worker, 2, config)[0]
    assert [r["step"] for r in records] == [0, 1]
    for record in records:
        rollouts = record["teacher/math/rollouts"] + record["teacher/code/rollouts"]
        assert rollouts == config.rollout.rollouts_per_step
        for name in ("math", "code"):
            if record[f"teacher/{name}/rollouts"]:
                assert 0.0 <= record[f"teacher/{name}/trust_fraction"] <= 1.0
                share = record[f"teacher/{name}/trust_fraction"] + record[f"teacher/{name}/outlier_share"]
                assert share == pytest.approx(1.0)
        assert record["prefix_share"] > 0 or record["step"] > 0  # guided: both teachers wrote prefixes
        if method == "tropd_full":  # the exact outlier term against each row's own teacher
            assert record["bias/full_fkl_outlier"] >= 0.0 and math.isfinite(record["loss"])


def test_a_teacher_can_be_added_from_the_command_line_and_a_config_file_reruns_it(tmp_path):
    from megatron_tropd.config_file import write_yaml

    config = apply_overrides(
        RunConfig(teachers=_teachers()), ["+teachers.bio={checkpoint: /ckpt/bio, tensor_parallel: 2}"]
    )
    assert config.teachers["bio"] == TeacherConfig(checkpoint="/ckpt/bio", tensor_parallel=2)
    write_yaml(config, tmp_path / "config.yaml")
    from megatron_tropd.config_file import compose

    assert compose(tmp_path / "config.yaml", lambda name: RunConfig()) == config
