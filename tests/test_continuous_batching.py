"""Continuous batching: the same requests give the same tokens and log-probs whatever the batching.

The workload mixes what makes slots churn: prompts of 1 to 23 tokens, teacher prefixes, per-request
budgets (0 included), a stop token. Continuous batching must reproduce static batching exactly (tokens)
and to fp32 summation order (log-probs), for any number of slots, prefill chunk and arrival order, at
TP1, TP2 and PP2; sampled log-probs must also equal a full forward's. The scheduler's policy is tested
on its own with a fake model.
"""

from __future__ import annotations

import random
from collections import Counter

import pytest
import torch

from megatron_tropd.config import RolloutConfig
from megatron_tropd.rollout.decoder import Segment, SlotStep
from megatron_tropd.rollout.engine import GenerationRequest, SamplingParams
from megatron_tropd.rollout.megatron_engine import MegatronGenerationEngine, _check_batching
from megatron_tropd.rollout.slots import SlotScheduler
from megatron_tropd.spawn import run_on_ranks

VOCAB_SIZE = 300  # tiny("qwen2")
LOGPROB_TOLERANCE = 1e-5  # fp32: a row's logits are summed in another order when the batch shape differs
# (slots, prefill_chunk, arrival order reversed) of each continuous run compared with the static one
CONTINUOUS_RUNS = ((4, 512, False), (3, 4, False), (1, 2, True), (12, 1, True))


def _workload() -> list[GenerationRequest]:
    """Eleven requests: very different prompt lengths, prefixes on some, mixed budgets (0 included)."""
    rng = random.Random(5)
    lengths = [1, 23, 4, 2, 17, 9, 1, 12, 3, 6, 15]
    budgets = [None, 3, 0, 7, 1, None, 5, 2, None, 4, 6]
    requests = []
    for index, (length, budget) in enumerate(zip(lengths, budgets, strict=True)):
        prompt = tuple(rng.randrange(1, VOCAB_SIZE) for _ in range(length))
        prefix = tuple(rng.randrange(1, VOCAB_SIZE) for _ in range(index % 3)) if index % 4 == 1 else ()
        requests.append(GenerationRequest(prompt, 40 + index, prefix, budget))
    return requests


# ---------------------------------------------------------------------------------------------------------
# The scheduler alone, driven by a fake model
# ---------------------------------------------------------------------------------------------------------


def _fake_token(sample_id: int, position: int) -> int:
    return (sample_id * 31 + position * 17) % 11


def _drive(requests, num_slots: int, prefill_chunk: int, stop: tuple[int, ...] = (3,)):
    """Run the scheduler with a model whose token depends on (sample id, position) only; check each
    step's segments against the policy on the way."""
    sampling = SamplingParams(max_new_tokens=5, stop_token_ids=stop)
    scheduler = SlotScheduler(requests, sampling, num_slots, prefill_chunk)
    next_start = {}
    while scheduler.refill():
        segments = scheduler.take_step()
        waiting = bool(scheduler.waiting)
        assert not waiting or len(segments) == num_slots, "a slot stayed empty while requests waited"
        for segment in segments:
            assert 1 <= len(segment.token_ids) <= prefill_chunk
            assert segment.start == next_start.get(segment.sample_id, 0), "a slot skipped or re-fed positions"
            next_start[segment.sample_id] = segment.end
        drawn = [s for s in segments if s.samples]
        tokens = [_fake_token(s.sample_id, s.end) for s in drawn]
        scheduler.record([s.slot for s in drawn], tokens, [-float(t) for t in tokens])
    return scheduler


def test_the_scheduler_refills_slots_and_results_do_not_depend_on_the_slots():
    requests = _workload()
    reference = _drive(requests, 1, 1000).results
    for num_slots, prefill_chunk in ((2, 3), (4, 1), (11, 5), (20, 2)):
        assert _drive(requests, num_slots, prefill_chunk).results == reference
    for request, result in zip(requests, reference, strict=True):
        budget = 5 if request.max_new_tokens is None else request.max_new_tokens
        generated = [_fake_token(request.sample_id, request.forced_length + i) for i in range(budget)]
        if 3 in generated:
            generated = generated[: generated.index(3) + 1]
        assert result.generated_token_ids == generated
        assert result.token_ids == [*request.prompt_token_ids, *request.prefix_token_ids, *generated]
        assert result.finished_by_stop == (3 in generated)


def test_the_scheduler_counts_useful_slot_steps():
    """Without stop tokens every request feeds forced + budget - 1 tokens, so a single slot with a
    chunk of 1 is busy on every step, and the step count is the sum of those lengths."""
    requests = _workload()
    scheduler = _drive(requests, 1, 1, stop=())
    fed = sum(r.forced_length + (5 if r.max_new_tokens is None else r.max_new_tokens) - 1 for r in requests
              if r.max_new_tokens != 0)  # fmt: skip
    assert scheduler.stats.steps == scheduler.stats.useful_slot_steps == fed
    assert scheduler.stats.occupancy == 1.0
    wide = _drive(requests, 30, 4, stop=()).stats
    assert wide.slot_steps == 30 * wide.steps and wide.useful_slot_steps < wide.slot_steps


def test_a_slot_step_hides_keys_past_each_slot_position():
    segments = [
        Segment(slot=0, start=4, token_ids=(9,), sample_id=0, samples=True),
        Segment(slot=1, start=0, token_ids=(1, 2, 3), sample_id=1, samples=False),
        Segment(slot=2, start=2, token_ids=(8,), sample_id=2, samples=True),
    ]
    step = SlotStep.build(segments, 3, torch.device("cpu"))
    assert step.tokens.tolist() == [[9, 8, 1, 2, 3]] and step.positions.tolist() == [4, 2, 0, 1, 2]
    assert step.slots.tolist() == [0, 2, 1, 1, 1] and step.single_slots.tolist() == [0, 2]
    # slot 1 decodes nothing: its row sees key 0 only (dropped); slot 2 must not see slot 0's length
    assert step.single_mask.view(3, -1).int().tolist() == [[1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 1, 0, 0]]
    assert step.sample_slots == [0, 2] and step.sample_positions.tolist() == [5, 3]
    same = [Segment(slot, 6, (slot,), slot, True) for slot in range(3)]
    aligned = SlotStep.build(same, 3, torch.device("cpu"))
    assert aligned.single_mask is None and aligned.single_slots is None and aligned.single_length == 7


def test_an_unknown_batching_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="batching='dynamic' is not one of continuous, static"):
        _check_batching("dynamic", 512)
    with pytest.raises(ValueError, match="prefill_chunk=0"):
        _check_batching("continuous", 0)
    with pytest.raises(ValueError, match="rollout.batching = 'dynamic' is not allowed; choose one of"):
        RolloutConfig(batching="dynamic").validate()
    assert RolloutConfig().batching == "continuous"


# ---------------------------------------------------------------------------------------------------------
# The engine on a tiny model, across layouts
# ---------------------------------------------------------------------------------------------------------


def _outputs(results) -> list[tuple]:
    return [(r.token_ids, r.generated_logprobs, r.finished_by_stop) for r in results]


def _assert_same(outputs, reference, what: str) -> None:
    for (tokens, logprobs, stopped), (ref_tokens, ref_logprobs, ref_stopped) in zip(
        outputs, reference, strict=True
    ):
        assert tokens == ref_tokens and stopped == ref_stopped, f"{what}: {tokens} != {ref_tokens}"
        worst = max((abs(a - b) for a, b in zip(logprobs, ref_logprobs, strict=True)), default=0.0)
        assert worst < LOGPROB_TOLERANCE, f"{what}: log-probs differ by {worst}"


def _continuous(placed, requests, sampling, slots: int, chunk: int, reverse: bool):
    engine = MegatronGenerationEngine(placed, 40, slots, batching="continuous", prefill_chunk=chunk)
    order = list(reversed(range(len(requests)))) if reverse else list(range(len(requests)))
    results = engine.generate([requests[i] for i in order], sampling)
    assert engine.stats.steps > 0 and engine.stats.generated_tokens == sum(
        len(r.generated_token_ids) for r in results
    )
    by_request = dict(zip(order, results, strict=True))
    return _outputs([by_request[i] for i in range(len(requests))])


def _invariance_worker(rank: int, world_size: int, tensor_parallel: int, pipeline_parallel: int) -> dict:
    from megatron_tropd.models import tiny
    from megatron_tropd.placed import one_model_groups, place_model
    from tests.test_rollout import _check_sampled_logprobs

    groups = one_model_groups(tensor_parallel, pipeline_parallel, seed=1234)
    placed = place_model(tiny("qwen2"), groups, seed=11)
    requests = _workload()
    greedy = SamplingParams(temperature=0.0, max_new_tokens=6)
    plain = MegatronGenerationEngine(placed, 40, 4, batching="static").generate(requests, greedy)
    # The model's most frequent greedy token: several rows stop early, at different steps.
    stop = Counter(t for r in plain for t in r.generated_token_ids).most_common(1)[0][0]
    by_sampling = {
        "greedy": SamplingParams(temperature=0.0, max_new_tokens=6, stop_token_ids=(stop,)),
        "sampled": SamplingParams(temperature=1.0, top_k=40, top_p=0.9, max_new_tokens=6, seed=2),
    }
    outputs = {}
    with torch.no_grad():
        for name, sampling in by_sampling.items():
            static = MegatronGenerationEngine(placed, 40, 4, batching="static").generate(requests, sampling)
            outputs[name] = _outputs(static)
            for slots, chunk, reverse in CONTINUOUS_RUNS:
                got = _continuous(placed, requests, sampling, slots, chunk, reverse)
                _assert_same(got, outputs[name], f"{name} slots={slots} chunk={chunk} reverse={reverse}")
        sampled = MegatronGenerationEngine(placed, 40, 3, prefill_chunk=5).generate(
            requests, by_sampling["sampled"]
        )
        generating = [result for result in sampled if result.generated_token_ids]  # budget 0: nothing
        _check_sampled_logprobs(placed.stage, groups, generating, by_sampling["sampled"])
        fallback = MegatronGenerationEngine(placed, 40, 4, decoder="megatron", batching="continuous")
        _assert_same(
            _outputs(fallback.generate(requests, by_sampling["greedy"])), outputs["greedy"], "megatron"
        )
    outputs["stopped"] = sum(stopped for _, _, stopped in outputs["greedy"])
    outputs["fallback"] = fallback._effective_batching()
    return outputs


@pytest.fixture(scope="module")
def tp1_outputs() -> dict:
    return run_on_ranks(_invariance_worker, 1, 1, 1)[0]


def test_continuous_batching_equals_static_at_tp1(tp1_outputs):
    assert tp1_outputs["stopped"] >= 2, "the stop token should end several greedy rows early"
    assert tp1_outputs["fallback"] == "static"


@pytest.mark.parametrize("tensor_parallel,pipeline_parallel", [(2, 1), (1, 2)])
def test_continuous_batching_is_invariant_to_the_layout(tp1_outputs, tensor_parallel, pipeline_parallel):
    results = run_on_ranks(
        _invariance_worker, tensor_parallel * pipeline_parallel, tensor_parallel, pipeline_parallel
    )
    for result in results:
        for name in ("greedy", "sampled"):
            _assert_same(
                result[name], tp1_outputs[name], f"{name} at TP{tensor_parallel} PP{pipeline_parallel}"
            )
