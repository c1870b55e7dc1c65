"""YAML config files, user recipes and the Hydra-style override grammar: pure config work, no torch."""

from __future__ import annotations

import dataclasses
import json
import sys
import textwrap

import pytest

from megatron_tropd import train
from megatron_tropd.config import OptimConfig, RunConfig
from megatron_tropd.config_file import compose, load_recipe, write_yaml
from megatron_tropd.overrides import apply_overrides, resolve_placeholders
from recipes import get_recipe

PAPER_ENV = {"TROPD_RUN_DIR": "/runs/x", "TROPD_DATA_DIR": "/data", "TROPD_MODELS_DIR": "/models"}


def _write(path, text):
    path.write_text(textwrap.dedent(text).lstrip(), encoding="utf-8")
    return path


# --- Files: round trip, inheritance, errors ----------------------------------------------------------------


def test_every_recipe_written_as_yaml_composes_back_to_the_same_config(tmp_path):
    from recipes import RECIPES

    for name in RECIPES:
        config = get_recipe(name)
        path = write_yaml(config, tmp_path / f"{name}.yaml")
        assert compose(path, get_recipe) == config, name
    paper = (tmp_path / "deepseek_math_tropd.yaml").read_text()
    assert "${TROPD_RUN_DIR}" in paper  # placeholders stay text until launch


def test_print_config_as_yaml_loads_back_to_the_same_run(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    argv = ["--recipe", "tiny_cpu", "optim.lr=3e-6", "eval.names=[MATH500,AIME24]"]
    assert train.main([*argv, "--print-config", "--format", "yaml"]) == 0
    printed = _write(tmp_path / "printed.yaml", capsys.readouterr().out)
    assert train.main([*argv, "--print-config"]) == 0
    expected = json.loads(capsys.readouterr().out)
    assert train.main(["--config", str(printed), "--print-config"]) == 0
    assert json.loads(capsys.readouterr().out) == expected
    assert expected["optim"]["lr"] == 3e-6 and expected["eval"]["names"] == ["MATH500", "AIME24"]


def test_defaults_inherit_a_recipe_then_files_then_self(tmp_path):
    _write(
        tmp_path / "base.yaml",
        """
        defaults: [tiny_cpu]
        optim: {lr: 1e-6, clip_grad: 0.5}
        train_steps: 5
        """,
    )
    _write(
        tmp_path / "run.yaml",
        """
        defaults:
          - base.yaml
          - _self_
        train_steps: 7
        name: 123
        rollout:
          temperature: 0.7
        """,
    )
    config = compose(tmp_path / "run.yaml", get_recipe)
    tiny = get_recipe("tiny_cpu")
    assert (config.optim.lr, config.optim.clip_grad, config.train_steps) == (1e-6, 0.5, 7)
    assert config.rollout.temperature == 0.7 and config.name == "123"
    assert config.student == tiny.student and config.method == tiny.method  # the rest is the recipe's
    # _self_ first: the included file wins over this file's own keys.
    _write(tmp_path / "self_first.yaml", "defaults: [_self_, base.yaml]\ntrain_steps: 9\n")
    with pytest.raises(ValueError, match="recipe builds a whole config"):
        compose(tmp_path / "self_first.yaml", get_recipe)  # base.yaml's recipe cannot come second
    _write(tmp_path / "tweak.yaml", "train_steps: 5\n")
    _write(tmp_path / "self_then_file.yaml", "defaults: [tiny_cpu, _self_, tweak.yaml]\ntrain_steps: 9\n")
    assert compose(tmp_path / "self_then_file.yaml", get_recipe).train_steps == 5


def test_config_file_on_top_of_recipe_from_the_command_line(tmp_path, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    path = _write(tmp_path / "lr.yaml", "optim:\n  lr: 2.0e-6\n")
    config = train.build_config("tiny_cpu", ["train_steps=3"], {}, config_file=path)
    assert config.optim.lr == 2e-6 and config.train_steps == 3
    assert config.student == get_recipe("tiny_cpu").student
    no_recipe = compose(path, get_recipe)  # on the schema defaults
    assert no_recipe.optim.lr == 2e-6 and no_recipe.student == RunConfig().student


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("optim: {lrr: 1}\n", r"bad\.yaml: unknown config key 'optim\.lrr'.*did you mean: optim\.lr"),
        ("optim: {lr: fast}\n", r"bad\.yaml: optim\.lr='fast': expected float"),
        ("train_steps: 1.5\n", r"bad\.yaml: train_steps: 1\.5 is not int"),
        ("optim: 3\n", r"bad\.yaml: optim must be a mapping"),
        ("- a\n- b\n", r"must hold a mapping of keys"),
        ("optim: {lr: [1\n", r"is not valid YAML"),
        ("defaults: [tiny_cpu, tiny_cpu_opd]\n", r"'tiny_cpu_opd' is a recipe.*list it first"),
        ("defaults: [no_such_recipe]\n", r"unknown recipe 'no_such_recipe'"),
        ("defaults: {a: 1}\n", r"defaults must be a list"),
        ("defaults: [bad.yaml]\n", r"cycle: .*bad\.yaml -> .*bad\.yaml"),
        ("defaults: [missing.yaml]\n", r"config file .*missing\.yaml does not exist"),
    ],
)
def test_bad_files_are_refused_naming_the_file_and_the_fix(text, message, tmp_path):
    path = _write(tmp_path / "bad.yaml", text)
    with pytest.raises(ValueError, match=message):
        compose(path, get_recipe)


def test_bad_config_file_exits_2_before_anything_starts(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    path = _write(tmp_path / "bad.yaml", "defaults: [tiny_cpu]\nrollout: {temprature: 1}\n")
    assert train.main(["--config", str(path)]) == 2
    assert "rollout.temperature" in capsys.readouterr().err
    assert train.main(["--config", str(tmp_path / "none.yaml")]) == 2
    assert "none.yaml does not exist" in capsys.readouterr().err


# --- module:function recipes -------------------------------------------------------------------------------


def test_a_users_recipe_function_by_module_and_name(tmp_path, monkeypatch):
    _write(
        tmp_path / "my_recipes.py",
        """
        import dataclasses
        from recipes import get_recipe

        def short_tiny():
            return dataclasses.replace(get_recipe("tiny_cpu"), train_steps=2, name="short")

        def not_a_config():
            return 3
        """,
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "my_recipes", raising=False)
    config = train.build_config("my_recipes:short_tiny", ["optim.lr=1e-6"], {})
    assert (config.train_steps, config.name, config.optim.lr) == (2, "short", 1e-6)
    _write(tmp_path / "uses.yaml", "defaults: ['my_recipes:short_tiny']\ntrain_steps: 4\n")
    assert compose(tmp_path / "uses.yaml", get_recipe).train_steps == 4
    for name, message in (
        ("no_module_here:f", "cannot import module 'no_module_here'"),
        ("my_recipes:missing", "has no function 'missing'"),
        ("my_recipes:not_a_config", "returned a int; a recipe function returns a RunConfig"),
    ):
        with pytest.raises(ValueError, match=message):
            load_recipe(name, get_recipe)


# --- The override grammar ----------------------------------------------------------------------------------


def test_lists_and_dicts_in_the_flow_style_hydra_users_type():
    config = apply_overrides(
        get_recipe("tiny_cpu"),
        ["eval.names=[AIME24,AIME25]", "data.chat_template_kwargs={enable_thinking: false}"],
    )
    assert config.eval.names == ("AIME24", "AIME25")
    assert config.data.chat_template_kwargs == {"enable_thinking": False}
    json_spelling = apply_overrides(get_recipe("tiny_cpu"), ['eval.names=["AIME24", "AIME25"]'])
    assert json_spelling.eval.names == config.eval.names
    with pytest.raises(ValueError, match=r"eval\.names=.*expected tuple.*element 1 is not str"):
        apply_overrides(get_recipe("tiny_cpu"), ["eval.names=[1,AIME25]"])


def test_plus_adds_dict_entries_and_refuses_what_exists():
    base = get_recipe("tiny_cpu")
    added = apply_overrides(base, ["+data.chat_template_kwargs.enable_thinking=false"])
    assert added.data.chat_template_kwargs == {"enable_thinking": False}
    changed = apply_overrides(added, ["data.chat_template_kwargs.enable_thinking=true"])
    assert changed.data.chat_template_kwargs == {"enable_thinking": True}
    forced = apply_overrides(base, ["++data.chat_template_kwargs.effort=high", "++optim.lr=0.25"])
    assert forced.data.chat_template_kwargs == {"effort": "high"} and forced.optim.lr == 0.25
    with pytest.raises(ValueError, match=r"the entry exists; set it with"):
        apply_overrides(added, ["+data.chat_template_kwargs.enable_thinking=true"])
    with pytest.raises(ValueError, match=r"no entry 'x'; add it with \+data\.chat_template_kwargs\.x=1"):
        apply_overrides(base, ["data.chat_template_kwargs.x=1"])
    with pytest.raises(ValueError, match=r"optim\.lr exists already .*set it with optim\.lr=1"):
        apply_overrides(base, ["+optim.lr=1"])


def test_tilde_resets_a_field_to_its_schema_default_and_removes_entries():
    base = apply_overrides(get_recipe("tiny_cpu"), ["optim.lr=0.5", "+data.chat_template_kwargs.a=1"])
    reset = apply_overrides(base, ["~optim.lr", "~data.chat_template_kwargs.a"])
    assert reset.optim.lr == OptimConfig().lr != 0.5
    assert reset.data.chat_template_kwargs == {}
    assert apply_overrides(base, ["~optim.lr=0.5"]).optim.lr == OptimConfig().lr
    with pytest.raises(ValueError, match=r"~optim\.lr=0\.1: the current value is 0\.5"):
        apply_overrides(base, ["~optim.lr=0.1"])
    with pytest.raises(ValueError, match=r"no entry 'b' to remove"):
        apply_overrides(base, ["~data.chat_template_kwargs.b"])
    with pytest.raises(ValueError, match=r"unknown config key 'optim\.lrr'"):
        apply_overrides(base, ["~optim.lrr"])


def test_oc_env_placeholders_with_and_without_default():
    config = dataclasses.replace(
        get_recipe("tiny_cpu"), name="${oc.env:RUN_NAME}-${oc.env:SUFFIX,'a b'}-${oc.env:TAG, x}"
    )
    resolved = resolve_placeholders(config, {"RUN_NAME": "r1"})
    assert resolved.name == "r1-a b-x"
    assert resolve_placeholders(config, {"RUN_NAME": "r", "SUFFIX": "s", "TAG": "t"}).name == "r-s-t"
    with pytest.raises(ValueError, match=r"\$\{RUN_NAME\} \(used by name\)"):
        resolve_placeholders(config, {})
    path_config = apply_overrides(get_recipe("tiny_cpu"), ["checkpoint.save_dir=${oc.env:RUNS,/tmp/r}/one"])
    assert resolve_placeholders(path_config, {}).checkpoint.save_dir == "/tmp/r/one"


# --- A model by its Hugging Face directory ----------------------------------------------------------------


def _hf_dir(tmp_path, **fields):
    hf_config = {
        "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "num_hidden_layers": 3,
        "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2,
        "vocab_size": 512, "max_position_embeddings": 256, "rope_theta": 1e6, "rms_norm_eps": 1e-6,
        "tie_word_embeddings": True, **fields,
    }  # fmt: skip
    directory = tmp_path / "hf_model"
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(hf_config))
    return directory


def test_from_hf_takes_the_shape_from_config_json(tmp_path, monkeypatch):
    directory = _hf_dir(tmp_path, head_dim=16)
    tiny = get_recipe("tiny_cpu")
    config = apply_overrides(tiny, [f"student.from_hf={directory}"])
    student = config.student
    assert (student.architecture, student.num_layers, student.hidden_size, student.head_dim) == (
        "qwen3",
        3,
        64,
        16,
    )
    assert student.tie_word_embeddings and student.qk_layernorm and student.rotary_base == 1e6
    assert student.make_vocab_size_divisible_by == tiny.student.make_vocab_size_divisible_by
    assert config.teacher == tiny.teacher
    # A file: from_hf first, then the section's own fields refine it.
    _write(
        tmp_path / "run.yaml", f"defaults: [tiny_cpu]\nteacher:\n  from_hf: {directory}\n  num_layers: 2\n"
    )
    teacher = compose(tmp_path / "run.yaml", get_recipe).teacher
    assert (teacher.hidden_size, teacher.num_layers) == (64, 2)
    monkeypatch.setenv("HF_MODELS", str(tmp_path))
    by_env = apply_overrides(tiny, ["student.from_hf=${oc.env:HF_MODELS}/hf_model"])
    assert by_env.student == student


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("student.from_hf={missing}", r"student\.from_hf=.*config\.json does not exist"),
        ("student.from_hff={dir}", r"unknown config key 'student\.from_hff'.*did you mean: student\.from_hf"),
        ("student.from_hf=${{NO_SUCH_VAR_X}}/m", r"set the environment variables NO_SUCH_VAR_X"),
        ("student.from_hf={sliding}", r"sliding"),
    ],
)
def test_from_hf_errors_name_the_key_and_the_file(override, message, tmp_path):
    directory = _hf_dir(tmp_path)
    sliding = _hf_dir(tmp_path / "sliding", use_sliding_window=True, sliding_window=64)
    text = override.format(missing=tmp_path / "none", dir=directory, sliding=sliding)
    with pytest.raises(ValueError, match=message):
        apply_overrides(get_recipe("tiny_cpu"), [text])


# --- Precision -------------------------------------------------------------------------------------------


def test_precision_settings_are_validated():
    tiny = get_recipe("tiny_cpu")
    assert apply_overrides(tiny, ["train.precision=bf16", "train.teacher_precision=fp16"]).validate() is None
    with pytest.raises(ValueError, match=r"train\.precision = 'fp16' is not offered .*use bf16"):
        apply_overrides(tiny, ["train.precision=fp16"]).validate()
    with pytest.raises(ValueError, match=r"train\.teacher_precision = 'half' is not allowed"):
        apply_overrides(tiny, ["train.teacher_precision=half"]).validate()
