"""Chat prompts match ``AutoTokenizer.apply_chat_template`` token for token, with and without transformers.

Four tokenizer families are built here, locally: a tiny byte-level BPE ``tokenizer.json`` (trained with
the ``tokenizers`` library) carrying each family's special tokens, and a ``tokenizer_config.json`` with its
real chat template (``tests/fixtures/chat_templates``) and special-token settings. The DeepSeek-R1-Distill
and Llama 3 tokenizers also add BOS in their post-processor, as the real ones do, so a prompt encoded with
special tokens on top of its template would start with two BOS tokens.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from megatron_tropd.data import Tokenizer, encode_prompt, load_prompts, render_prompt

transformers = pytest.importorskip("transformers")

TEMPLATES = Path(__file__).parent / "fixtures" / "chat_templates"

# The pre-tokenizer splits of Qwen2 and Llama 3 (their tokenizer.json "Split" patterns).
QWEN_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
    r"\s+(?!\S)|\s+"
)
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
    r"\s*[\r\n]+|\s+(?!\S)|\s+"
)
CORPUS = [
    "What is 2 plus 3? The answer is 5.",
    "Solve for x: x^2 = 49, so x = 7 or x = -7.",
    "Let me think step by step about the problem.",
    "Write a Python function that returns the sum of a list.",
    "The quick brown fox jumps over the lazy dog.",
]

QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
DEEPSEEK_BOS, DEEPSEEK_EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"


def _added(content: str) -> dict:
    return {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": True, "rstrip": False,
            "single_word": False}  # fmt: skip


FAMILIES = {
    "qwen2_5": {
        "template": "qwen2_5.jinja",
        "split": QWEN_SPLIT,
        "special": QWEN_SPECIALS,
        "added": ["<tool_call>", "</tool_call>"],
        "bos": None,
        "config": {
            "add_prefix_space": False, "bos_token": None, "eos_token": "<|im_end|>",
            "pad_token": "<|endoftext|>", "errors": "replace", "model_max_length": 131072,
            "split_special_tokens": False,
            "tokenizer_class": "Qwen2Tokenizer", "unk_token": None, "clean_up_tokenization_spaces": False,
        },
    },
    "qwen3": {
        "template": "qwen3.jinja",
        "split": QWEN_SPLIT,
        "special": QWEN_SPECIALS,
        "added": ["<tool_call>", "</tool_call>", "<think>", "</think>"],
        "bos": None,
        "config": {
            "add_bos_token": False, "add_prefix_space": False, "bos_token": None, "eos_token": "<|im_end|>",
            "pad_token": "<|endoftext|>", "errors": "replace", "model_max_length": 131072,
            "split_special_tokens": False, "tokenizer_class": "Qwen2Tokenizer", "unk_token": None,
            "clean_up_tokenization_spaces": False,
        },
    },
    "deepseek_r1_distill_qwen": {
        "template": "deepseek_r1_distill_qwen.jinja",
        "split": QWEN_SPLIT,
        "special": [DEEPSEEK_EOS, DEEPSEEK_BOS, "<|im_start|>", "<|im_end|>"],
        "added": ["<｜User｜>", "<｜Assistant｜>", "<think>", "</think>"],
        "bos": DEEPSEEK_BOS,
        "config": {
            "add_bos_token": True, "add_eos_token": False, "bos_token": _added(DEEPSEEK_BOS),
            "eos_token": _added(DEEPSEEK_EOS), "pad_token": _added(DEEPSEEK_EOS), "legacy": True,
            "model_max_length": 16384, "sp_model_kwargs": {}, "unk_token": None,
            "tokenizer_class": "LlamaTokenizerFast", "clean_up_tokenization_spaces": False,
        },
    },
    "llama3": {
        "template": "llama3_2.jinja",
        "split": LLAMA3_SPLIT,
        "special": ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                    "<|eot_id|>", "<|eom_id|>", "<|python_tag|>"],  # fmt: skip
        "added": [],
        "bos": "<|begin_of_text|>",
        "config": {
            "bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "clean_up_tokenization_spaces": True,
            "model_input_names": ["input_ids", "attention_mask"], "model_max_length": 131072,
            "tokenizer_class": "PreTrainedTokenizerFast",
        },
    },
}  # fmt: skip

PROMPTS = [
    "What is 2 plus 3?",
    "  Solve for x:\n\nx^2 = 49.  ",  # edge whitespace: Llama 3 trims it, the others keep it
    'Quote "this" & <that>, then {curly} braces — and ünïcode ✓.',
    "Write a Python function:\n```python\ndef f(xs):\n    return sum(xs)\n```",
]


def _template_text(family: str) -> str:
    return (TEMPLATES / FAMILIES[family]["template"]).read_text(encoding="utf-8")


def build_tokenizer_dir(directory: Path, family: str, *, template_file: bool = False) -> Path:
    """A tiny tokenizer of ``family``; ``template_file``: the template in ``chat_template.jinja``."""
    from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from tokenizers import Tokenizer as HFTokenizer

    spec = FAMILIES[family]
    tokenizer = HFTokenizer(models.BPE())
    if family != "llama3":
        tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(spec["split"]), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])  # fmt: skip
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tokenizer.train_from_iterator(CORPUS * 4, trainer)
    tokenizer.add_special_tokens(spec["special"])
    tokenizer.add_tokens(spec["added"])
    bos = spec["bos"]
    if bos:  # the real DeepSeek-R1-Distill and Llama 3 tokenizers put BOS in front when asked to
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tokenizer.token_to_id(bos))]
        )
    else:
        tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(directory / "tokenizer.json"))
    config = dict(spec["config"])
    if template_file:
        (directory / "chat_template.jinja").write_text(_template_text(family), encoding="utf-8")
        config["chat_template"] = "{{ 'a stale template the file must win over' }}"
    else:
        config["chat_template"] = _template_text(family)
    (directory / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False), encoding="utf-8")
    return directory


@pytest.fixture(scope="module")
def tokenizer_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("chat_tokenizers")
    return {family: build_tokenizer_dir(root / family, family) for family in FAMILIES}


def _reference(directory: Path, text: str, **kwargs) -> list[int]:
    hf = transformers.AutoTokenizer.from_pretrained(str(directory))
    messages = [{"role": "user", "content": text}]
    ids = hf.apply_chat_template(
        messages, tokenize=True, add_generation_prompt=True, return_dict=False, **kwargs
    )
    return list(ids)


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("use_transformers", [True, False], ids=["transformers", "fallback"])
def test_prompts_match_apply_chat_template_token_for_token(tokenizer_dirs, family, use_transformers):
    directory = tokenizer_dirs[family]
    tokenizer = Tokenizer(str(directory), use_transformers=use_transformers)
    assert tokenizer.backend == ("transformers" if use_transformers else "tokenizers")
    for text in PROMPTS:
        ours = encode_prompt(text, "auto", tokenizer)
        assert ours == _reference(directory, text), (family, text)
        assert text.strip() in tokenizer.decode(ours)


@pytest.mark.parametrize("family", ["deepseek_r1_distill_qwen", "llama3"])
def test_the_templates_bos_is_kept_once(tokenizer_dirs, family):
    """The template writes BOS; nothing adds a second (the tokenizers' post-processors would)."""
    directory = tokenizer_dirs[family]
    for use_transformers in (True, False):
        tokenizer = Tokenizer(str(directory), use_transformers=use_transformers)
        bos_id = tokenizer._hf.token_to_id(FAMILIES[family]["bos"])
        ids = encode_prompt(PROMPTS[0], "auto", tokenizer)
        assert ids[0] == bos_id and ids.count(bos_id) == 1
    text = render_prompt(PROMPTS[0], "auto", Tokenizer(str(tokenizer_dirs["deepseek_r1_distill_qwen"])))
    assert text == f"{DEEPSEEK_BOS}<｜User｜>{PROMPTS[0]}<｜Assistant｜><think>\n"


@pytest.mark.parametrize("use_transformers", [True, False], ids=["transformers", "fallback"])
def test_template_kwargs_reach_the_template(tokenizer_dirs, use_transformers):
    directory = tokenizer_dirs["qwen3"]
    tokenizer = Tokenizer(str(directory), use_transformers=use_transformers)
    plain = render_prompt(PROMPTS[0], "auto", tokenizer)
    off = render_prompt(PROMPTS[0], "auto", tokenizer, {"enable_thinking": False})
    assert plain.endswith("<|im_start|>assistant\n") and off == plain + "<think>\n\n</think>\n\n"
    ids = encode_prompt(PROMPTS[0], "auto", tokenizer, {"enable_thinking": False})
    assert ids == _reference(directory, PROMPTS[0], enable_thinking=False)
    llama = Tokenizer(str(tokenizer_dirs["llama3"]), use_transformers=use_transformers)
    dated = encode_prompt(PROMPTS[0], "auto", llama, {"date_string": "01 Jan 2025"})
    assert dated == _reference(tokenizer_dirs["llama3"], PROMPTS[0], date_string="01 Jan 2025")
    assert "Today Date: 01 Jan 2025" in llama.decode(dated)


@pytest.mark.parametrize("use_transformers", [True, False], ids=["transformers", "fallback"])
def test_chat_template_jinja_beside_the_config_wins(tmp_path, use_transformers):
    directory = build_tokenizer_dir(tmp_path / "qwen3", "qwen3", template_file=True)
    tokenizer = Tokenizer(str(directory), use_transformers=use_transformers)
    assert tokenizer.chat_template == _template_text("qwen3")
    ids = encode_prompt(PROMPTS[0], "auto", tokenizer)
    assert ids == _reference(directory, PROMPTS[0]) and "stale" not in tokenizer.decode(ids)


@pytest.mark.parametrize("use_transformers", [True, False], ids=["transformers", "fallback"])
def test_template_environment_features(tokenizer_dirs, use_transformers):
    """raise_exception, tojson, namespace, loop controls and {% generation %} behave as in transformers."""
    directory = tokenizer_dirs["qwen2_5"]
    tokenizer = Tokenizer(str(directory), use_transformers=use_transformers)
    custom = (
        "{% set ns = namespace(n=0) %}{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}"
        "{% set ns.n = ns.n + 1 %}{% generation %}{{ m | tojson }}{% endgeneration %}{% endfor %}"
        "{{ ns.n }}{{ eos_token }}{{ dict(a=1) | tojson }}{% if add_generation_prompt %}!{% endif %}"
    )
    text = render_prompt("ü<b>", custom, tokenizer)
    assert text == '{"role": "user", "content": "ü<b>"}1<|im_end|>{"a": 1}!'
    # Block tags own their line (trim_blocks + lstrip_blocks): only the content lines remain.
    spaced = "{% for m in messages %}\n  {% if m.role %}\n[{{ m.content }}]\n  {% endif %}\n{% endfor %}\n"
    reference = transformers.AutoTokenizer.from_pretrained(str(directory)).apply_chat_template(
        [{"role": "user", "content": "hi"}], chat_template=spaced, tokenize=False, add_generation_prompt=True
    )
    assert render_prompt("hi", spaced, tokenizer) == reference == "[hi]\n"
    refusing = "{{ raise_exception('only system and user roles, got ' + messages[0].role) }}"
    with pytest.raises(ValueError, match="failed to render: only system and user roles, got user"):
        render_prompt("hi", refusing, tokenizer)
    with pytest.raises(ValueError, match="'add_generation_prompt' is set by the renderer"):
        render_prompt("hi", "auto", tokenizer, {"add_generation_prompt": False})


def test_fallback_equals_transformers_on_a_prompt_file(tokenizer_dirs, tmp_path):
    """load_prompts gives the same ids on both paths, and kwargs reach it."""
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps({"id": f"q{i}", "prompt": p}) + "\n" for i, p in enumerate(PROMPTS)))
    directory = tokenizer_dirs["qwen3"]
    loaded = [
        load_prompts(
            str(path),
            Tokenizer(str(directory), use_transformers=flag),
            "auto",
            256,
            "fail",
            template_kwargs={"enable_thinking": False},
        )  # fmt: skip
        for flag in (True, False)
    ]
    assert loaded[0] == loaded[1]
    expected = [_reference(directory, p, enable_thinking=False) for p in PROMPTS]
    assert [list(p.token_ids) for p in loaded[0]] == expected


# ---------------------------------------------------------------------------------------------------------
# data.chat_template_kwargs reaches every place that renders a prompt
# ---------------------------------------------------------------------------------------------------------

NO_THINKING = {"enable_thinking": False}


def test_kwargs_reach_the_run_prompts_and_evaluation(tokenizer_dirs, tmp_path):
    """Training prompts (rollouts and teacher scoring), the eval length check and the eval generator."""
    import dataclasses

    from megatron_tropd.data import load_run_prompts
    from megatron_tropd.eval.harness import check_prompt_lengths
    from megatron_tropd.eval.schema import Benchmark, Item
    from megatron_tropd.rollout.text import TextGenerator
    from recipes import get_recipe

    directory = tokenizer_dirs["qwen3"]
    tokenizer = Tokenizer(str(directory))
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"id": "q", "prompt": PROMPTS[0]}) + "\n")
    base = get_recipe("tiny_cpu")
    data = dataclasses.replace(
        base.data, train_prompts=str(path), tokenizer=str(directory), chat_template="auto",
        chat_template_kwargs=NO_THINKING,
    )  # fmt: skip
    student = dataclasses.replace(base.student, vocab_size=512)
    rollout = dataclasses.replace(base.rollout, max_prompt_length=64)
    config = dataclasses.replace(base, data=data, student=student, rollout=rollout)
    expected = _reference(directory, PROMPTS[0], enable_thinking=False)
    assert list(load_run_prompts(config, tokenizer)[0].token_ids) == expected

    generator = TextGenerator(None, tokenizer, max_new_tokens=4, chat_template_kwargs=NO_THINKING)
    requests = generator._requests([PROMPTS[0]], k=2)
    assert [list(r.prompt_token_ids) for r in requests] == [expected, expected]

    benchmark = Benchmark(name="b", family="math", items=(Item(id="i1", prompt=PROMPTS[0], answer="5"),))
    plain = len(_reference(directory, PROMPTS[0]))
    context = plain + 4  # fits without the empty think block, not with it
    check_prompt_lengths(
        [benchmark], tokenizer, chat_template="auto", raw_prompts=True, max_new_tokens=4,
        context_length=context,
    )  # fmt: skip
    with pytest.raises(ValueError, match=rf"item 'i1': the prompt has {len(expected)} tokens"):
        check_prompt_lengths(
            [benchmark], tokenizer, chat_template="auto", chat_template_kwargs=NO_THINKING, raw_prompts=True,
            max_new_tokens=4, context_length=context,
        )  # fmt: skip


def test_tropd_eval_takes_chat_template_kwargs_as_json():
    from megatron_tropd.eval.command import _evaluation_options, build_parser

    args = build_parser().parse_args(["--out", "x", "--chat-template-kwargs", '{"enable_thinking": false}'])
    assert _evaluation_options(args)["chat_template_kwargs"] == NO_THINKING
    assert _evaluation_options(build_parser().parse_args(["--out", "x"]))["chat_template_kwargs"] == {}
    for bad in ("{oops", "[1]", '{"tokenize": true}'):
        with pytest.raises(SystemExit) as exited:
            build_parser().parse_args(["--out", "x", "--chat-template-kwargs", bad])
        assert exited.value.code == 2
