"""Prompt files: schema errors name file and line; overlong prompts; tokenizers; resumable sampling."""

from __future__ import annotations

import io
import json
import re

import pytest
import sentencepiece

from megatron_tropd.data import PromptSampler, Tokenizer, load_prompts


def _write(path, lines):
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    text = [f"what is {a} plus {b}? the answer is {a + b}." for a in range(30) for b in range(30)]
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(text), model_writer=model, vocab_size=64, model_type="bpe"
    )
    path = tmp_path_factory.mktemp("tok") / "sp.model"
    path.write_bytes(model.getvalue())
    return str(path)


def test_token_id_and_text_prompts(tmp_path, sp_model):
    tokenizer = Tokenizer(sp_model)
    path = _write(
        tmp_path / "p.jsonl",
        [{"prompt_token_ids": [5, 6, 7], "answer": "3"}, {"prompt": "what is 2 plus 3?"}],
    )
    prompts = load_prompts(path, tokenizer, "none", 64, "skip")
    assert prompts[0].token_ids == (5, 6, 7) and prompts[0].answer == "3" and prompts[0].id == "1"
    assert tokenizer.decode(prompts[1].token_ids) == "what is 2 plus 3?"


def test_malformed_lines_name_file_and_line(tmp_path):
    cases = [
        (["{not json"], r"p.jsonl:1: not valid JSON"),
        ([{"prompt_token_ids": [1]}, {"text": "x"}], r"p.jsonl:2: missing field 'prompt'"),
        ([{"prompt_token_ids": [1, -2]}], r"p.jsonl:1: 'prompt_token_ids' must be"),
        ([{"prompt": "hello"}], r"p.jsonl:1: text prompts need a tokenizer"),
    ]
    for lines, message in cases:
        with pytest.raises(ValueError, match=message):
            load_prompts(_write(tmp_path / "p.jsonl", lines), None, "none", 64, "skip")
    with pytest.raises(ValueError, match="does not exist"):
        load_prompts(str(tmp_path / "missing.jsonl"), None, "none", 64, "skip")
    with pytest.raises(ValueError, match="no usable prompts"):
        load_prompts(_write(tmp_path / "p.jsonl", [""]), None, "none", 64, "skip")


def test_overlong_prompts_skip_or_fail(tmp_path):
    path = _write(tmp_path / "p.jsonl", [{"prompt_token_ids": [1] * 10}, {"prompt_token_ids": [1, 2]}])
    assert [p.id for p in load_prompts(path, None, "none", 5, "skip")] == ["2"]
    with pytest.raises(
        ValueError, match=r"p.jsonl:1: prompt of 10 tokens exceeds rollout.max_prompt_length=5"
    ):
        load_prompts(path, None, "none", 5, "fail")


def test_missing_chat_template_is_a_clear_error(tmp_path, sp_model):
    path = _write(tmp_path / "p.jsonl", [{"prompt": "hi"}])
    with pytest.raises(ValueError, match="has no chat template"):
        load_prompts(path, Tokenizer(sp_model), "auto", 64, "skip")
    custom = "{% for m in messages %}<user>{{ m['content'] }}{% endfor %}<assistant>"
    prompts = load_prompts(path, Tokenizer(sp_model), custom, 64, "skip")
    assert "hi" in Tokenizer(sp_model).decode(prompts[0].token_ids)


def test_sampler_is_deterministic_covers_epochs_and_resumes(tmp_path):
    path = _write(tmp_path / "p.jsonl", [{"prompt_token_ids": [i + 1]} for i in range(7)])
    prompts = load_prompts(path, None, "none", 8, "skip")
    straight = PromptSampler(prompts, seed=3)
    drawn = [p.id for _ in range(5) for p in straight.next_batch(3)]
    assert sorted(drawn[:7]) == sorted(p.id for p in prompts)  # the first epoch is a permutation
    resumed = PromptSampler(prompts, seed=3, position=6)
    assert [p.id for p in resumed.next_batch(9)] == drawn[6:15]
    assert [p.id for p in PromptSampler(prompts, seed=4).next_batch(7)] != drawn[:7]


def test_out_of_vocabulary_ids_name_file_line_and_prompt(tmp_path, sp_model):
    rows = [{"id": "a", "prompt_token_ids": [1, 2]}, {"id": "b7", "prompt_token_ids": [3, 300, 4]}]
    path = _write(tmp_path / "p.jsonl", rows)
    assert len(load_prompts(path, None, "none", 64, "skip", vocab_size=301)) == 2
    with pytest.raises(
        ValueError, match=r"p.jsonl:2 \(prompt id 'b7'\): token id 300 at position 1 .*\[0, 300\)"
    ):
        load_prompts(path, None, "none", 64, "skip", vocab_size=300)
    with pytest.raises(ValueError, match=r"p.jsonl:1: 'prompt_token_ids' must be"):  # bools are not ids
        load_prompts(
            _write(tmp_path / "p.jsonl", [{"prompt_token_ids": [1, True]}]), None, "none", 64, "skip"
        )
    # A tokenizer with more pieces than the models have rows: its ids are refused too.
    text = _write(tmp_path / "t.jsonl", [{"prompt": "what is 29 plus 28?"}])
    with pytest.raises(ValueError, match=r"t.jsonl:1: token id \d+ at position \d+ of the tokenized prompt"):
        load_prompts(text, Tokenizer(sp_model), "none", 64, "skip", vocab_size=4)


def test_overlong_skips_are_counted_and_logged(tmp_path, caplog):
    rows = [
        {"prompt_token_ids": [1] * 10},
        {"prompt_token_ids": [1, 2]},
        {"id": "x", "prompt_token_ids": [1] * 12},
    ]
    with caplog.at_level("WARNING", logger="megatron_tropd.data"):
        kept = load_prompts(_write(tmp_path / "p.jsonl", rows), None, "none", 5, "skip")
    assert [p.id for p in kept] == ["2"]
    assert "skipped 2 of 3 prompts longer than rollout.max_prompt_length=5" in caplog.text
    assert "the longest, 12 tokens, at" in caplog.text and "p.jsonl:3 (prompt id 'x')" in caplog.text
    with pytest.raises(
        ValueError, match=r"no usable prompts \(1 rows, 1 longer than rollout.max_prompt_length=1"
    ):
        load_prompts(_write(tmp_path / "q.jsonl", rows[:1]), None, "none", 1, "skip")


def test_unreadable_files_are_clear_errors(tmp_path, sp_model):
    path = tmp_path / "p.jsonl"
    path.write_bytes(b'{"prompt_token_ids": [1]}\n{"prompt": "\xff\xfe"}\n')
    with pytest.raises(ValueError, match=r"p.jsonl:2: not UTF-8 text"):
        load_prompts(str(path), None, "none", 64, "skip")
    broken = tmp_path / "tok"
    broken.mkdir()
    (broken / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"tok/tokenizer.json cannot be loaded"):
        Tokenizer(str(broken))
    with pytest.raises(ValueError, match=r"has no tokenizer.json"):
        Tokenizer(str(tmp_path))


# ---------------------------------------------------------------------------------------------------------
# Pre-flight: prompt-file problems stop `python -m megatron_tropd.train` before any process group
# ---------------------------------------------------------------------------------------------------------


def _preflight_cases(tmp_path):
    good = [{"prompt_token_ids": [5, 6]}]
    oov = [*good, {"id": 9, "prompt_token_ids": [300]}]

    def prompts(name, rows):
        return f"data.train_prompts={_write(tmp_path / name, rows)}"

    return [
        ([f"data.train_prompts={tmp_path / 'missing.jsonl'}"], r"missing.jsonl' does not exist"),
        ([prompts("a.jsonl", [*good, "{oops"])], r"a.jsonl:2: not valid JSON"),
        ([prompts("b.jsonl", [{"text": "x"}])], r"b.jsonl:1: missing field"),
        ([prompts("c.jsonl", oov)], r"c.jsonl:2 \(prompt id 9\): token id 300 at position 0 .* \[0, 300\)"),
        (
            [prompts("d.jsonl", [{"prompt_token_ids": [1] * 40}])],
            r"d.jsonl: no usable prompts \(1 rows, 1 longer than rollout.max_prompt_length=32",
        ),
        (
            [prompts("e.jsonl", good), f"data.tokenizer={tmp_path / 'no.model'}"],
            r"tokenizer '.*no.model' does not exist",
        ),
        *_run_dir_cases(tmp_path),
    ]


def _run_dir_cases(tmp_path):
    """A run directory that cannot exist, a ``checkpoints`` that is a file, a resume that must find a
    checkpoint and finds none, and a ``latest`` marker holding garbage."""
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "ckpt_is_file").mkdir()
    (tmp_path / "ckpt_is_file" / "checkpoints").write_text("x")
    (tmp_path / "garbage" / "checkpoints").mkdir(parents=True)
    (tmp_path / "garbage" / "checkpoints" / "latest").write_bytes(b"\xff\xfe\x00junk")
    save_dir = "checkpoint.save_dir="
    return [
        ([f"{save_dir}{tmp_path / 'a_file' / 'run'}"], r"checkpoint.save_dir: .*a_file is a file"),
        ([f"{save_dir}{tmp_path / 'ckpt_is_file'}"], r"ckpt_is_file/checkpoints is a file"),
        (
            [f"{save_dir}{tmp_path / 'empty'}", "checkpoint.resume=required"],
            r"checkpoint.resume=required but .*empty/checkpoints holds no checkpoint",
        ),
        ([f"{save_dir}{tmp_path / 'garbage'}"], r"latest holds .* which is not a step directory name"),
    ]


@pytest.mark.parametrize("rank", ["0", "1"])
def test_preflight_refuses_bad_prompt_files_before_training(tmp_path, monkeypatch, capsys, rank):
    """Exit 2 with one message from rank 0 (silence elsewhere); the trainer is never reached."""
    from megatron_tropd import train

    def unreachable(config):
        raise AssertionError("training started despite a bad input file")

    monkeypatch.setattr(train, "_train", unreachable)
    monkeypatch.setenv("RANK", rank)
    monkeypatch.delenv("LOCAL_RANK", raising=False)  # no signal handlers or parent-death signal here
    for overrides, message in _preflight_cases(tmp_path):
        assert train.main(["--recipe", "tiny_cpu", *overrides]) == 2
        err = capsys.readouterr().err
        if rank == "0":
            assert err.count("error:") == 1 and re.search(message, err), (message, err)
        else:
            assert err == ""


def test_preflight_passes_the_shipped_tiny_prompts():
    from megatron_tropd.preflight import check_run_inputs, preflight_status
    from recipes import get_recipe

    config = get_recipe("tiny_cpu")
    check_run_inputs(config)
    assert preflight_status(config, {"RANK": "0"}) == 0
