"""One set of evaluation settings: the loop's ``eval.*``, ``tropd eval`` and the harness share them."""

from __future__ import annotations

import dataclasses
import re

import pytest

from megatron_tropd.config import EvalConfig, EvalSettings, RunConfig
from megatron_tropd.eval.command import build_parser, eval_settings, main


def _settings(*argv):
    return eval_settings(build_parser().parse_args(["--out", "x", *argv]))


def test_tropd_eval_and_the_loop_start_from_the_same_defaults():
    assert _settings() == EvalSettings() == RunConfig().eval.settings
    loop = EvalConfig(interval=2, benchmarks="b", samples_per_prompt=8, temperature=0.0)
    assert loop.settings == EvalSettings(samples_per_prompt=8, temperature=0.0)
    assert {f.name for f in dataclasses.fields(EvalSettings)} < {
        f.name for f in dataclasses.fields(EvalConfig)
    }


def test_flags_and_key_value_overrides_set_the_same_fields():
    by_flags = _settings("--k", "3", "--temperature", "0", "--names", "AIME24,MATH500", "--raw-prompts")
    by_keys = _settings(
        "samples_per_prompt=3", "eval.temperature=0", "names=[AIME24,MATH500]", "raw_prompts=true"
    )
    assert (
        by_flags
        == by_keys
        == EvalSettings(names=("AIME24", "MATH500"), samples_per_prompt=3, temperature=0.0, raw_prompts=True)
    )
    assert _settings("--k", "3", "samples_per_prompt=5").samples_per_prompt == 5  # key=value comes last


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["samples_per_promt=2"],
            r"unknown config key 'samples_per_promt'.*did you mean: samples_per_prompt",
        ),
        (["--k", "0"], r"samples_per_prompt must be"),
        (["temperature=-1"], r"temperature"),
        (["max_new_tokens=many"], r"max_new_tokens='many': expected int"),
    ],
)
def test_bad_settings_exit_2_naming_the_key(argv, message, capsys, tmp_path):
    paths = ["--checkpoint", str(tmp_path), "--tokenizer", "t", "--benchmarks", "b"]
    assert main([*paths, "--out", str(tmp_path), *argv]) == 2
    assert re.search(message, capsys.readouterr().err)
