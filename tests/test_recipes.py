"""Recipes, overrides and the train entry point: pure config work, no torch, no GPU, no files."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_tropd import cli, train
from megatron_tropd.config import METHOD_NAMES, RunConfig
from megatron_tropd.model_config import padded_vocab_size, qwen2_5_7b
from megatron_tropd.overrides import apply_overrides, leaf_keys, resolve_placeholders
from recipes import RECIPES, WORLD_SIZES, get_recipe, paper

REPO = Path(__file__).resolve().parents[1]
PAPER_ENV = {"TROPD_RUN_DIR": "/runs/x", "TROPD_DATA_DIR": "/data", "TROPD_MODELS_DIR": "/models"}


@pytest.fixture
def empty_cwd(tmp_path, monkeypatch):
    """Run in an empty directory and prove it stays empty: building a recipe must not touch files."""
    monkeypatch.chdir(tmp_path)
    yield tmp_path
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------------------
# Recipes
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_every_recipe_builds_and_fits_its_world_size(name, empty_cwd):
    config = get_recipe(name)
    world_size = WORLD_SIZES[name]
    config.validate(world_size=world_size)
    p = config.parallel
    for who, tp, pp in (
        ("student", p.student_tensor_parallel, p.student_pipeline_parallel),
        ("teacher", p.teacher_tensor_parallel, p.teacher_pipeline_parallel),
    ):
        model = getattr(config, who)
        assert world_size % (tp * pp) == 0
        assert model.num_attention_heads % tp == 0 and model.num_query_groups % tp == 0
        assert model.num_layers % pp == 0
        data_parallel = world_size // (tp * pp)
        assert config.rollout.rollouts_per_step % (data_parallel * config.optim.micro_batch_size) == 0
    assert get_recipe(name) == config  # pure: building twice gives the same config
    assert get_recipe(name) is not config


def test_every_method_has_a_paper_and_a_tiny_recipe():
    for method in METHOD_NAMES:
        for prefix in ("deepseek_math", "deepseek_multi", "qwen3_multi", "tiny_cpu"):
            assert RECIPES[f"{prefix}_{method}"]().method.name == method
    assert get_recipe("tiny_cpu").method.name == "tropd"


def test_paper_hyper_parameters():
    config = get_recipe("deepseek_math_tropd")
    assert (config.rollout.prompts_per_step, config.rollout.samples_per_prompt) == (128, 4)
    assert (config.train_steps, config.rollout.max_new_tokens, config.rollout.temperature) == (200, 8096, 1.0)
    assert (config.method.topk, config.method.guidance_beta) == (64, 0.001)
    optim = config.optim
    assert (optim.lr, optim.lr_schedule, optim.adam_beta1, optim.adam_beta2) == (5e-6, "constant", 0.9, 0.98)
    assert (optim.weight_decay, optim.clip_grad) == (0.1, 1.0)
    assert WORLD_SIZES["deepseek_math_tropd"] == paper.NODES * paper.GPUS_PER_NODE == 64


def test_skywork_teacher_uses_the_true_vocabulary_and_pads_back_to_its_checkpoint():
    for name in ("deepseek_math_tropd", "deepseek_multi_tropd"):
        config = get_recipe(name)
        assert config.student.vocab_size == config.teacher.vocab_size == 151936
        tp = config.parallel.teacher_tensor_parallel
        # the 7B checkpoints' 152,064 rows are exactly the teacher's padded vocabulary at its TP
        assert padded_vocab_size(151936, config.teacher.make_vocab_size_divisible_by, tp) == 152064
        assert qwen2_5_7b().vocab_size == 152064
        assert dataclasses.replace(config.teacher, vocab_size=152064) == qwen2_5_7b()
    qwen3 = get_recipe("qwen3_multi_tropd")
    assert qwen3.student.vocab_size == qwen3.teacher.vocab_size == 151936


def test_paper_paths_are_placeholders_resolved_at_launch_only():
    config = get_recipe("qwen3_multi_opd")
    assert config.checkpoint.save_dir == "${TROPD_RUN_DIR}"
    assert config.checkpoint.teacher.startswith("${TROPD_MODELS_DIR}/")
    resolved = resolve_placeholders(config, PAPER_ENV)
    assert resolved.checkpoint.save_dir == "/runs/x"
    assert resolved.data.train_prompts == "/data/openthoughts3_multi.jsonl"
    assert config.checkpoint.save_dir == "${TROPD_RUN_DIR}"  # the original is untouched
    with pytest.raises(ValueError, match=r"TROPD_MODELS_DIR.*checkpoint\.student_init"):
        resolve_placeholders(config, {"TROPD_RUN_DIR": "/r", "TROPD_DATA_DIR": "/d"})
    lenient = resolve_placeholders(config, {}, strict=False)
    assert lenient == config


def test_unknown_recipe_lists_the_close_ones():
    with pytest.raises(ValueError, match=r"unknown recipe 'deepseek_math_trpod'.*deepseek_math_tropd"):
        get_recipe("deepseek_math_trpod")
    with pytest.raises(ValueError, match=r"tiny_cpu"):
        get_recipe("tiny-cpu")


# ---------------------------------------------------------------------------------------------------------
# Overrides
# ---------------------------------------------------------------------------------------------------------


def test_overrides_set_nested_typed_fields_without_mutating():
    base = get_recipe("tiny_cpu")
    config = apply_overrides(
        base,
        [
            "method.name=opd",
            "optim.lr=1e-5",
            "rollout.guidance=false",
            "student.num_layers=2",
            "student.head_dim=none",
            "teacher.head_dim=16",
            "name=my run",
            "checkpoint.save_dir=/tmp/a=b",  # only the first '=' separates key and value
        ],
    )
    assert config.method.name == "opd" and config.optim.lr == 1e-5 and config.rollout.guidance is False
    assert (
        config.student.num_layers == 2 and config.student.head_dim is None and config.teacher.head_dim == 16
    )
    assert config.name == "my run" and config.checkpoint.save_dir == "/tmp/a=b"
    assert base == get_recipe("tiny_cpu")  # nothing mutated
    assert config.teacher.num_layers == base.teacher.num_layers
    assert apply_overrides(base, ["optim.lr=1"]).optim.lr == 1.0  # an int literal is a valid float


@dataclasses.dataclass
class _Sequences:
    sizes: tuple[int, ...] = (1,)
    pair: tuple[int, float] = (1, 2.0)
    names: list[str] = dataclasses.field(default_factory=list)


def test_overrides_parse_tuples_and_lists_as_json():
    config = apply_overrides(_Sequences(), ["sizes=[2, 4]", "pair=[3, 5]", 'names=["a", "b"]'])
    assert config == _Sequences(sizes=(2, 4), pair=(3, 5.0), names=["a", "b"])
    assert isinstance(config.pair[1], float)
    with pytest.raises(ValueError, match=r"sizes='\[1, \"x\"\]': expected .*element 'x'"):
        apply_overrides(_Sequences(), ['sizes=[1, "x"]'])
    with pytest.raises(ValueError, match=r"pair=.*exactly 2"):
        apply_overrides(_Sequences(), ["pair=[1]"])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optim.lr=fast", r"optim\.lr='fast': expected float"),
        ("train_steps=1.5", r"train_steps='1\.5': expected int"),
        ("rollout.guidance=maybe", r"rollout\.guidance='maybe': expected bool"),
        ("student.head_dim=wide", r"student\.head_dim='wide': expected .*int"),
        ("student=tiny", r"student='tiny': expected ModelConfig .*key\.field=value"),
    ],
)
def test_overrides_of_the_wrong_type_name_field_type_and_value(override, message):
    with pytest.raises(ValueError, match=message):
        apply_overrides(get_recipe("tiny_cpu"), [override])


@pytest.mark.parametrize(
    ("override", "suggestion"),
    [
        ("optim.lrr=1", "optim.lr"),
        ("optimizer.lr=1", "optim.lr"),
        ("rollout.temprature=0.5", "rollout.temperature"),
        ("student.num_layer=2", "student.num_layers"),
        ("method.name.x=1", "method.name"),
    ],
)
def test_unknown_override_keys_suggest_close_matches(override, suggestion):
    with pytest.raises(ValueError, match=rf"unknown config key .*did you mean: .*{suggestion}"):
        apply_overrides(get_recipe("tiny_cpu"), [override])


def test_dict_fields_take_a_json_object():
    config = apply_overrides(get_recipe("tiny_cpu"), ['data.chat_template_kwargs={"enable_thinking": false}'])
    assert config.data.chat_template_kwargs == {"enable_thinking": False}
    assert get_recipe("tiny_cpu").data.chat_template_kwargs == {}  # the recipe itself is untouched
    for bad in ("[1]", "{oops", "true"):
        with pytest.raises(ValueError, match=r"data.chat_template_kwargs=.*expected dict .*JSON object"):
            apply_overrides(get_recipe("tiny_cpu"), [f"data.chat_template_kwargs={bad}"])


def test_override_without_equals_is_refused():
    with pytest.raises(ValueError, match="key.sub=value"):
        apply_overrides(RunConfig(), ["optim.lr"])


def test_leaf_keys_cover_every_section():
    keys = set(leaf_keys(RunConfig()))
    assert {"optim.lr", "student.vocab_size", "rollout.guidance", "train_steps", "eval.interval"} <= keys


# ---------------------------------------------------------------------------------------------------------
# python -m megatron_tropd.train
# ---------------------------------------------------------------------------------------------------------


def test_build_config_applies_overrides_resolves_and_validates():
    env = {**PAPER_ENV, "WORLD_SIZE": "64"}
    config = train.build_config("deepseek_math_tropd", ["method.name=opd"], env)
    assert config.method.name == "opd" and config.checkpoint.save_dir == "/runs/x"
    with pytest.raises(ValueError, match=r"= 2 does not divide the world size 63"):
        train.build_config("deepseek_math_tropd", [], {**PAPER_ENV, "WORLD_SIZE": "63"})
    with pytest.raises(ValueError, match=r"WORLD_SIZE='two'"):
        train.build_config("tiny_cpu", [], {"WORLD_SIZE": "two"})
    with pytest.raises(ValueError, match=r"method\.name = 'nope'"):
        train.build_config("tiny_cpu", ["method.name=nope"], {})


def test_main_validates_before_importing_the_trainer(monkeypatch, capsys, empty_cwd):
    monkeypatch.setitem(sys.modules, "megatron_tropd.trainer", None)  # any import of it would fail
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert train.main(["--recipe", "tiny_cpu"]) == 2
    assert "do not split over the student's 3 data-parallel ranks" in capsys.readouterr().err
    monkeypatch.delenv("WORLD_SIZE")
    assert train.main(["--recipe", "tiny_cpu", "optim.lrr=1"]) == 2
    assert "did you mean: optim.lr" in capsys.readouterr().err
    assert train.main(["--recipe", "deepseek_math_tropd"]) == 2  # the paths' variables are not set
    assert "TROPD_RUN_DIR" in capsys.readouterr().err


def test_main_runs_the_trainer_with_the_checked_config(monkeypatch, empty_cwd):
    import types

    received = []
    fake_trainer = types.ModuleType("megatron_tropd.trainer")
    fake_trainer.run = received.append
    monkeypatch.setitem(sys.modules, "megatron_tropd.trainer", fake_trainer)
    import megatron_tropd

    monkeypatch.setattr(megatron_tropd, "trainer", fake_trainer, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert cli.main(["train", "--recipe", "tiny_cpu_opd", "train_steps=2"]) == 0
    assert [(c.name, c.method.name, c.train_steps) for c in received] == [("tiny_cpu_opd", "opd", 2)]
    for name, value in PAPER_ENV.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("WORLD_SIZE", "64")
    with pytest.raises(SystemExit) as stopped:  # the paper's prompt files do not exist here
        train.launch("deepseek_math_tropd", ["optim.lr=1e-6"])
    assert stopped.value.code == 2 and len(received) == 1
    monkeypatch.setattr(train, "preflight_status", lambda config: 0)  # as if the files were there
    train.launch("deepseek_math_tropd", ["optim.lr=1e-6"])
    assert received[-1].optim.lr == 1e-6 and received[-1].checkpoint.save_dir == "/runs/x"


def test_print_config_and_list(capsys, monkeypatch, empty_cwd):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert train.main(["--recipe", "deepseek_math_tropd", "--print-config"]) == 0
    out = capsys.readouterr().out
    assert '"save_dir": "${TROPD_RUN_DIR}"' in out and '"name": "deepseek_math_tropd"' in out
    assert train.main(["--list"]) == 0
    assert "tiny_cpu  (world size 2)" in capsys.readouterr().out
    assert train.main([]) == 2


def test_module_exits_non_zero_quickly_when_the_world_size_does_not_fit(tmp_path):
    env = {**os.environ, "WORLD_SIZE": "3", "PYTHONPATH": str(REPO)}
    start = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "megatron_tropd.train", "--recipe", "tiny_cpu"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    elapsed = time.monotonic() - start
    assert result.returncode == 2, result.stderr
    assert "do not split over the student's 3 data-parallel ranks" in result.stderr
    assert "torch" not in result.stderr
    assert elapsed < 10, f"validation took {elapsed:.1f} s: it must fail before torch is imported"
    assert list(tmp_path.iterdir()) == []


def test_recipes_and_train_import_no_torch(tmp_path):
    """Building every recipe and checking it must not need torch (so it fails fast on a login node)."""
    code = (
        "import sys, recipes, megatron_tropd.train; [f() for f in recipes.RECIPES.values()]; "
        "print(sorted(m for m in ('torch', 'megatron.core', 'nemo_run') if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_table5_rows_are_math_recipes_and_print_config_shows_the_effective_guidance(capsys, monkeypatch):
    from megatron_tropd.methods import METHOD_SPECS, TABLE5_METHODS

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert set(TABLE5_METHODS) <= set(METHOD_NAMES) and "fkl_outlier" in TABLE5_METHODS
    guided = {"tropd", "tropd_mask", "tropd_clip", "tropd_aopd", "tropd_full"}  # the TrOPD family only
    assert {name for name, spec in METHOD_SPECS.items() if spec.guidance} == guided
    for method in TABLE5_METHODS:
        assert get_recipe(f"deepseek_math_{method}").rollout.guidance is None  # the method decides
        for overrides, expected in (([], method in guided), (["rollout.guidance=true"], True),
                                    (["rollout.guidance=false"], False)):  # fmt: skip
            argv = ["--recipe", f"deepseek_math_{method}", *overrides, "--print-config"]
            assert train.main(argv) == 0
            printed = json.loads(capsys.readouterr().out)
            assert printed["rollout"]["guidance"] is expected, (method, overrides)
    other = train.build_config("deepseek_math_tropd", ["method.name=opd"], PAPER_ENV)
    assert other.rollout.guidance is False  # follows the overridden method, not the recipe's
