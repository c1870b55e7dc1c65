"""The lm-eval adapter: log-likelihoods against a full forward on one rank (TP1, TP2, DP2 and PP2), greedy
flags, stop strings, lm-eval's own evaluator on local multiple-choice and generation tasks, rank-0-only
result files, log lines and progress bars under a launcher; and parity with lm-eval's own ``hf`` backend
on a converted tiny HF model (per-sample log-likelihoods to 1e-4 nats in fp32 and equal greedy text, with
and without BOS, with truncation; measured 4.3e-6 per request, 1.9e-5 on rolling totals of ~700 nats),
its chat template, ``dtype``, and the refusals of unknown model_args and of TP without a launcher."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest

pytest.importorskip("lm_eval")

from megatron_tropd.spawn import run_on_ranks  # noqa: E402
from tests import lm_eval_parity as parity  # noqa: E402
from tests.eval_setup import build_tiny_model, train_tokenizer  # noqa: E402

TASKS = Path(__file__).parent / "fixtures" / "lmeval"
MAX_LENGTH = 32  # short, so the long context below is left-truncated
REQUESTS = [
    ("what is 2 plus 3? the answer is", " 5."),
    ("", "the answer is 7."),  # empty context: conditioned on the end-of-sequence token
    ("the answer is ", "9"),  # the trailing space moves to the continuation
    ("what is 12 plus 13? " * 8, "the answer is 25."),  # longer than MAX_LENGTH
]
GREEDY_CONTEXT = "what is 2 plus 3?"
GENERATION_KWARGS = {"until": [], "max_gen_toks": 8}
LAYOUTS = ((2, 1), (1, 1), (1, 2))  # (TP, PP) on two ranks: TP2, DP2, PP2


def _instance(request_type: str, arguments: tuple):
    from lm_eval.api.instance import Instance

    return Instance(request_type=request_type, doc={}, arguments=arguments, idx=0)


def _loglikelihoods(adapter):
    return adapter.loglikelihood([_instance("loglikelihood", r) for r in REQUESTS])


def _generate(adapter, until: list[str]) -> str:
    request = _instance("generate_until", (GREEDY_CONTEXT, {**GENERATION_KWARGS, "until": until}))
    return adapter.generate_until([request])[0]


def _full_forward_log_probs(model, vocab_size: int, row: list[int]):
    """``[len(row), V]`` float64 log-probs of one full forward (no cache, no sharding): the reference."""
    import torch

    with torch.no_grad():
        tokens = torch.tensor([row])
        logits = model(tokens, torch.arange(len(row)).unsqueeze(0), None)[0, :, :vocab_size]
    return torch.log_softmax(logits.double(), dim=-1)


def _reference(model, vocab_size: int, context_ids: list[int], continuation_ids: list[int]):
    row = (context_ids + continuation_ids)[-(MAX_LENGTH + 1) :]  # the model reads MAX_LENGTH tokens
    log_probs = _full_forward_log_probs(model, vocab_size, row)
    count = len(continuation_ids)
    positions = list(range(len(row) - 1 - count, len(row) - 1))
    targets = row[-count:]
    total = sum(float(log_probs[p, t]) for p, t in zip(positions, targets, strict=True))
    greedy = all(int(log_probs[p].argmax()) == t for p, t in zip(positions, targets, strict=True))
    return total, greedy


def _greedy_tokens(model, vocab_size: int, context_ids: list[int], count: int) -> list[int]:
    row = list(context_ids)
    for _ in range(count):
        row.append(int(_full_forward_log_probs(model, vocab_size, row)[-1].argmax()))
    return row[len(context_ids) :]


def _lm_eval_metrics(adapter) -> dict:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    os.chdir(TASKS)  # the task files name their data relative to their folder
    manager = TaskManager(include_path=str(TASKS), include_defaults=False)
    results = simple_evaluate(
        model=adapter, tasks=["tropd_tiny_mc", "tropd_tiny_gen"], task_manager=manager, bootstrap_iters=0,
        log_samples=False,
    )  # fmt: skip
    return {task: dict(metrics) for task, metrics in results["results"].items()}


def _single_rank_worker(rank, world_size, base):
    from megatron_tropd.checkpoint import save_model_weights
    from megatron_tropd.data import Tokenizer
    from megatron_tropd.eval.lm_eval_adapter import MegatronLM
    from megatron_tropd.placed import PlacedModel

    base = Path(base)
    model, groups, config = build_tiny_model()
    save_model_weights(base / "weights", model, config)
    tokenizer = Tokenizer(str(base / "sp.model"))
    placed = PlacedModel(model, groups, config)
    adapter = MegatronLM.from_model(placed, tokenizer, batch_size=3, max_length=MAX_LENGTH)
    pairs = [adapter._encode_pair(*r) for r in REQUESTS]
    context_ids = tokenizer.encode(GREEDY_CONTEXT)
    greedy = _greedy_tokens(model, config.vocab_size, context_ids, 3)
    not_greedy = greedy[:-1] + [(greedy[-1] + 1) % config.vocab_size]
    short_text = "the answer is 7."
    return {
        "truncated": len(pairs[-1][0]) + len(pairs[-1][1]) > MAX_LENGTH + 1,
        "loglikelihood": _loglikelihoods(adapter),
        "reference": [_reference(model, config.vocab_size, *pair) for pair in pairs],
        "greedy_flags": [
            flag
            for _, flag in adapter.loglikelihood_tokens([(context_ids, greedy), (context_ids, not_greedy)])
        ],
        "rolling": adapter.loglikelihood_rolling([_instance("loglikelihood_rolling", (short_text,))])[0],
        "rolling_reference": _reference(
            model, config.vocab_size, [tokenizer.eos_token_id], tokenizer.encode(short_text)
        )[0],
        "generated": _generate(adapter, []),
        "generated_until": {stop: _generate(adapter, [stop]) for stop in _stops(_generate(adapter, []))},
        "metrics": _lm_eval_metrics(adapter),
    }


def _stops(text: str) -> list[str]:
    """Two stop strings that occur inside ``text`` (after its first character)."""
    return [text[len(text) // 2 : len(text) // 2 + 2], text[1:2]]


def _two_rank_worker(rank, world_size, base):
    """The adapter built from the checkpoint on TP2, on DP2, then on PP2."""
    from megatron_tropd.eval.lm_eval_adapter import MegatronLM

    results = {}
    for layout in LAYOUTS:
        adapter = MegatronLM(
            checkpoint=str(Path(base) / "weights"), tokenizer=str(Path(base) / "sp.model"),
            tensor_parallel=layout[0], pipeline_parallel=layout[1], batch_size=3, max_length=MAX_LENGTH,
        )  # fmt: skip
        results[layout] = {
            "loglikelihood": _loglikelihoods(adapter),
            "generated": _generate(adapter, []),
        }
    results["console"] = _console_output(rank, adapter)
    return results


def _console_output(rank: int, adapter) -> str:
    """What a rank writes to stderr: lm-eval's log lines (configured as the command line configures
    them) and the adapter's progress bars."""
    import contextlib
    import io
    import logging

    from megatron_tropd.eval.lm_eval_adapter import configure_logging

    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        configure_logging(rank)
        logging.getLogger("lm_eval.evaluator").info("an lm-eval info line")
        logging.getLogger("lm_eval.evaluator").warning("an lm-eval warning")
        adapter.loglikelihood([_instance("loglikelihood", r) for r in REQUESTS])
    return stderr.getvalue()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("lmeval")
    train_tokenizer(base / "sp.model")
    with pytest.MonkeyPatch.context() as patch:  # the spawned ranks inherit it: nothing is downloaded
        patch.setenv("HF_DATASETS_OFFLINE", "1")
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setenv("HF_DATASETS_CACHE", str(base / "hf-datasets"))
        single = run_on_ranks(_single_rank_worker, 1, str(base))[0]
        layouts = run_on_ranks(_two_rank_worker, 2, str(base))
    return single, layouts


def test_loglikelihood_equals_a_full_forward_on_one_rank(runs):
    single, _ = runs
    assert single["truncated"], "the long request should exceed max_length"
    for (value, greedy), (expected, expected_greedy) in zip(
        single["loglikelihood"], single["reference"], strict=True
    ):
        assert value == pytest.approx(expected, abs=1e-5) and value < 0
        assert greedy == expected_greedy
    assert single["rolling"] == pytest.approx(single["rolling_reference"], abs=1e-5)


def test_is_greedy_flags_the_argmax_continuation(runs):
    single, _ = runs
    assert single["greedy_flags"] == [True, False]


def test_tensor_data_and_pipeline_parallel_layouts_give_the_same_answers(runs):
    single, layouts = runs
    answers = [{layout: rank[layout] for layout in LAYOUTS} for rank in layouts]
    assert answers[0] == answers[1], "the two ranks returned different answers"
    for layout in LAYOUTS:
        result = layouts[0][layout]
        assert result["generated"] == single["generated"]
        for (value, greedy), (expected, expected_greedy) in zip(
            result["loglikelihood"], single["reference"], strict=True
        ):
            assert value == pytest.approx(expected, abs=1e-5)
            assert greedy == expected_greedy


def test_generate_until_cuts_at_the_first_stop_string(runs):
    single, _ = runs
    full = single["generated"]
    assert len(full) >= 2, f"the greedy text {full!r} is too short to place a stop string in"
    for stop, text in single["generated_until"].items():
        assert text == full[: full.index(stop)] and len(text) < len(full)


def test_lm_eval_runs_local_tasks_on_the_adapter(runs):
    metrics = runs[0]["metrics"]
    for task, metric in (("tropd_tiny_mc", "acc,none"), ("tropd_tiny_gen", "exact_match,none")):
        value = metrics[task][metric]
        assert isinstance(value, float) and not math.isnan(value) and 0.0 <= value <= 1.0


def test_log_lines_and_progress_bars_come_from_rank_zero_only(runs):
    _, layouts = runs
    first, second = layouts[0]["console"], layouts[1]["console"]
    assert "an lm-eval info line" in first and "Running loglikelihood requests" in first
    assert "an lm-eval info line" not in second and "Running loglikelihood requests" not in second
    assert "an lm-eval warning" in first and "an lm-eval warning" in second


def test_only_rank_zero_writes_lm_eval_results():
    from megatron_tropd.eval.lm_eval_adapter import rank_zero_arguments

    argv = ["--model", "megatron_tropd", "--output_path", "out", "--log_samples", "--tasks", "gsm8k",
            "--wandb_args=project=x", "-o", "other", "--limit", "4"]  # fmt: skip
    assert rank_zero_arguments(argv, 0) == argv
    assert rank_zero_arguments(argv, 1) == ["--model", "megatron_tropd", "--tasks", "gsm8k", "--limit", "4"]


# ---------------------------------------------------------------------------------------------------------
# Parity with lm-eval's own hf backend on the same weights
# ---------------------------------------------------------------------------------------------------------

LL_ATOL = 1e-4  # nats, fp32: HF and Megatron sum the same math in a different order


def _parity_worker(rank, world_size, base):
    """The HF model converted, then the adapter over each tokenizer (Llama 3's named by its tokenizer.json),
    and once more in bf16."""
    from megatron_tropd.eval.lm_eval_adapter import MegatronLM
    from megatron_tropd.hf import convert

    base = Path(base)
    convert.hf_to_megatron(base / "hf", base / "megatron")
    results = {}
    for family in parity.FAMILIES:
        tokenizer = base / family / "tokenizer.json" if family == "llama3" else base / family
        adapter = MegatronLM(
            checkpoint=str(base / "megatron"), tokenizer=str(tokenizer), max_length=parity.MAX_LENGTH,
            batch_size=4,
        )  # fmt: skip
        chat = parity.chat_prompt(adapter)
        template = adapter.chat_template(True)
        results[family] = {"chat": chat, "template": template, **parity.answers(adapter, chat)}
    results["chat_tasks"] = parity.chat_task_samples(adapter, TASKS)  # Llama 3's tokenizer
    bf16 = MegatronLM(
        checkpoint=str(base / "megatron"), tokenizer=str(base / "qwen2_5"), max_length=parity.MAX_LENGTH,
        dtype="bfloat16",
    )  # fmt: skip
    results["bf16"] = {
        "dtypes": sorted({str(p.dtype) for p in bf16.placed.stage.parameters()}),
        "rolling": parity.answers(bf16, results["qwen2_5"]["chat"])["rolling"],
    }
    return results


@pytest.fixture(scope="module")
def parity_runs(tmp_path_factory):
    """The adapter's answers (from one rank) and the hf backend's, per tokenizer family."""
    base = tmp_path_factory.mktemp("lmeval-parity")
    parity.build_parity_files(base)
    with pytest.MonkeyPatch.context() as patch:  # the spawned rank inherits it: nothing is downloaded
        patch.setenv("HF_DATASETS_OFFLINE", "1")
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setenv("HF_DATASETS_CACHE", str(base / "hf-datasets"))
        adapter = run_on_ranks(_parity_worker, 1, str(base))[0]
        reference = {}
        for family in parity.FAMILIES:
            hf = parity.hf_backend(base, family)
            chat = parity.chat_prompt(hf)
            reference[family] = {"chat": chat, "lm": hf, **parity.answers(hf, chat)}
        reference["chat_tasks"] = parity.chat_task_samples(hf, TASKS)
    return base, adapter, reference


def _max_difference(values, expected) -> float:
    return max(abs(a - b) for a, b in zip(values, expected, strict=True))


@pytest.mark.parametrize("family", parity.FAMILIES)
def test_adapter_scores_and_generates_as_lm_eval_hf_backend(parity_runs, family):
    _, adapter, reference = parity_runs
    mine, hf = adapter[family], reference[family]
    tokens = hf["lm"].tok_encode(parity.LONG_TEXT)
    assert len(tokens) > parity.MAX_LENGTH + 1, "the long requests should be truncated"
    assert (tokens[0] == hf["lm"].tokenizer.bos_token_id) == (family == "llama3")
    assert mine["chat"] == hf["chat"]
    assert (
        _max_difference([v for v, _ in mine["loglikelihood"]], [v for v, _ in hf["loglikelihood"]]) < LL_ATOL
    )
    assert [g for _, g in mine["loglikelihood"]] == [g for _, g in hf["loglikelihood"]]
    assert _max_difference(mine["rolling"], hf["rolling"]) < LL_ATOL
    assert mine["generated"] == hf["generated"]


def test_chat_template_is_read_from_chat_template_jinja(parity_runs):
    base, adapter, _ = parity_runs
    for family in parity.FAMILIES:
        assert adapter[family]["template"] == (base / family / "chat_template.jinja").read_text(
            encoding="utf-8"
        )
    assert adapter["llama3"]["chat"].startswith("<|begin_of_text|>")


def test_apply_chat_template_runs_lm_eval_tasks_as_the_hf_backend_does(parity_runs):
    _, adapter, reference = parity_runs
    mine, hf = adapter["chat_tasks"], reference["chat_tasks"]
    assert mine.keys() == hf.keys() == {"tropd_tiny_mc", "tropd_tiny_gen"}
    for task in mine:
        assert [arguments for arguments, _ in mine[task]] == [arguments for arguments, _ in hf[task]]
        assert all("<|start_header_id|>user" in str(arguments) for arguments, _ in mine[task])
    assert [resps for _, resps in mine["tropd_tiny_gen"]] == [resps for _, resps in hf["tropd_tiny_gen"]]
    scores = [(value, greedy) for _, resps in mine["tropd_tiny_mc"] for value, greedy in resps]
    expected = [(value, greedy) for _, resps in hf["tropd_tiny_mc"] for value, greedy in resps]
    assert _max_difference([v for v, _ in scores], [v for v, _ in expected]) < LL_ATOL
    assert [g for _, g in scores] == [g for _, g in expected]


def test_dtype_builds_the_model_in_that_precision(parity_runs):
    _, adapter, reference = parity_runs
    assert adapter["bf16"]["dtypes"] == ["torch.bfloat16"]
    rolling = adapter["bf16"]["rolling"]
    assert rolling != adapter["qwen2_5"]["rolling"]
    assert _max_difference(rolling, reference["qwen2_5"]["rolling"]) < 1.0


def test_unknown_model_args_and_dtypes_are_refused():
    from megatron_tropd.eval.lm_eval_adapter import MegatronLM

    with pytest.raises(ValueError, match="'tensor_paralel' \\(did you mean 'tensor_parallel'\\?\\)"):
        MegatronLM(checkpoint="ckpt", tokenizer="tok", tensor_paralel=2)
    with pytest.raises(ValueError, match="dtype='float33' is not one of auto, float32"):
        MegatronLM(checkpoint="ckpt", tokenizer="tok", dtype="float33")


def test_tensor_parallel_without_a_launcher_says_how_to_launch(monkeypatch):
    from megatron_tropd.eval.lm_eval_adapter import MegatronLM

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(ValueError, match="this job has 1; launch one per rank: torchrun --nproc_per_node=2"):
        MegatronLM(checkpoint="ckpt", tokenizer="tok", tensor_parallel=2)
