"""Prompt files: schema errors name file and line; overlong prompts; tokenizers; resumable sampling."""

from __future__ import annotations

import io
import json

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
