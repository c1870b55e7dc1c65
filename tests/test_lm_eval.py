"""The lm-eval adapter: log-likelihoods against a full forward on one rank (TP1, TP2, DP2 and PP2), greedy
flags, stop strings, lm-eval's own evaluator on local multiple-choice and generation tasks, and rank-0-only
result files under a launcher."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest

pytest.importorskip("lm_eval")

from megatron_tropd.spawn import run_on_ranks  # noqa: E402
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
    row = (context_ids + continuation_ids)[-MAX_LENGTH:]
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

    base = Path(base)
    model, groups, config = build_tiny_model()
    save_model_weights(base / "weights", model, config)
    tokenizer = Tokenizer(str(base / "sp.model"))
    adapter = MegatronLM.from_model(model, groups, tokenizer, config, batch_size=3, max_length=MAX_LENGTH)
    pairs = [adapter._encode_pair(*r) for r in REQUESTS]
    context_ids = tokenizer.encode(GREEDY_CONTEXT)
    greedy = _greedy_tokens(model, config.vocab_size, context_ids, 3)
    not_greedy = greedy[:-1] + [(greedy[-1] + 1) % config.vocab_size]
    short_text = "the answer is 7."
    return {
        "truncated": len(pairs[-1][0]) + len(pairs[-1][1]) > MAX_LENGTH,
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
    return results


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
    assert layouts[0] == layouts[1], "the two ranks returned different answers"
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


def test_only_rank_zero_writes_lm_eval_results():
    from megatron_tropd.eval.lm_eval_adapter import rank_zero_arguments

    argv = ["--model", "megatron_tropd", "--output_path", "out", "--log_samples", "--tasks", "gsm8k",
            "--wandb_args=project=x", "-o", "other", "--limit", "4"]  # fmt: skip
    assert rank_zero_arguments(argv, 0) == argv
    assert rank_zero_arguments(argv, 1) == ["--model", "megatron_tropd", "--tasks", "gsm8k", "--limit", "4"]
