"""Rollout generation: the KV-cache engine against full recomputation, across TP/PP layouts, with
continuous and with static batching.

The reference for every generated token is a full forward of the whole sequence so far (no KV cache),
run on the same layout with explicit stage hand-off and a TP gather. One spawn per layout runs all the
checks and returns the tokens, so the layouts can be compared with each other in the parent.
"""

from __future__ import annotations

import torch

from megatron_tropd.rollout.engine import (
    GenerationRequest,
    GenerationResult,
    SamplingParams,
    to_rollout_batch,
)
from megatron_tropd.rollout.megatron_engine import filter_logprobs, sample_tokens
from megatron_tropd.spawn import run_on_ranks
from tests.model_reference import full_logits, right_padded

VOCAB_SIZE = 300  # tiny(): not a multiple of the padding, so padded logit columns exist
MODEL_SEED = 7
MAX_NEW = 6


def _requests() -> list[GenerationRequest]:
    """Five rows (more than max_batch_size=4): different prompt lengths, one with a teacher prefix."""
    prompts = [(5, 17, 42), (9, 8, 7, 6, 5), (100, 200, 31, 4), (250,) * 7, (11, 12)]
    requests = [GenerationRequest(p, sample_id=10 + i) for i, p in enumerate(prompts)]
    requests[2] = GenerationRequest(prompts[2], sample_id=12, prefix_token_ids=(77, 78, 79))
    return requests


# ---------------------------------------------------------------------------------------------------------
# Multi-process worker
# ---------------------------------------------------------------------------------------------------------


def _greedy_reference(model, groups, requests: list[GenerationRequest], max_new: int) -> list[list[int]]:
    """Greedy continuations by recomputing every whole sequence each step (argmax over the true vocab)."""
    rows = [[*r.prompt_token_ids, *r.prefix_token_ids] for r in requests]
    for _ in range(max_new):
        logits = full_logits(model, groups, right_padded(rows))  # [b, max_len, V_padded]
        for i, row in enumerate(rows):
            row.append(int(logits[i, len(row) - 1, :VOCAB_SIZE].argmax()))
    return [row[r.forced_length :] for row, r in zip(rows, requests, strict=True)]


def _check_sampled_logprobs(model, groups, results: list[GenerationResult], sampling: SamplingParams):
    """Engine log-probs == the filtered log_softmax(logits / T) of a full forward at the chosen tokens."""
    all_logits = full_logits(model, groups, right_padded([r.token_ids for r in results]))
    worst = 0.0
    for row, result in enumerate(results):
        forced = result.prompt_length + result.prefix_length
        logits = all_logits[row, :, :VOCAB_SIZE]
        logprobs = filter_logprobs(
            torch.log_softmax(logits.float() / sampling.temperature, -1), sampling.top_k, sampling.top_p
        )
        positions = torch.arange(forced - 1, len(result.token_ids) - 1)  # logits that predict each token
        expected = logprobs[positions, torch.tensor(result.generated_token_ids)]
        assert torch.isfinite(expected).all(), "a generated token lies outside the top-k / top-p set"
        worst = max(worst, (expected - torch.tensor(result.generated_logprobs)).abs().max().item())
    assert worst < 1e-4, f"sampled log-probs differ from the full-forward reference by {worst}"


def _check_greedy(model, groups, engine) -> list[list[int]]:
    requests = _requests()
    results = engine.generate(requests, SamplingParams(temperature=0.0, max_new_tokens=MAX_NEW))
    references = _greedy_reference(model, groups, requests, MAX_NEW)
    for request, result, reference in zip(requests, results, references, strict=True):
        forced = [*request.prompt_token_ids, *request.prefix_token_ids]
        assert result.token_ids[: len(forced)] == forced, "the prompt + prefix was not reproduced"
        assert result.prompt_length == len(request.prompt_token_ids)
        assert result.prefix_length == len(request.prefix_token_ids)
        assert result.generated_token_ids == reference, (
            f"KV cache {result.generated_token_ids} != {reference}"
        )
        assert result.token_ids == forced + reference and not result.finished_by_stop
    return [r.generated_token_ids for r in results]


def _check_stop(engine, greedy: list[list[int]]) -> None:
    """A stop token (row 0's 3rd greedy token) ends each row at its first occurrence; padding is masked."""
    stop = greedy[0][2]
    sampling = SamplingParams(temperature=0.0, max_new_tokens=MAX_NEW, stop_token_ids=(stop,))
    results = engine.generate(_requests(), sampling)
    for result, full in zip(results, greedy, strict=True):
        expected = full[: full.index(stop) + 1] if stop in full else full
        assert result.generated_token_ids == expected and result.finished_by_stop == (stop in full)
    assert len(results[0].generated_token_ids) <= 3 and results[0].finished_by_stop
    batch = to_rollout_batch(results)
    for row, result in enumerate(results):
        length = len(result.token_ids)
        assert batch.tokens[row, length:].eq(0).all() and not batch.loss_mask[row, length - 1 :].any()
        assert batch.loss_mask[row].sum() == result.prefix_length + len(result.generated_token_ids)


def _check_sampling(model, groups, engine) -> list[list[int]]:
    requests = _requests()
    plain = SamplingParams(temperature=1.0, max_new_tokens=5, seed=3)
    results = engine.generate(requests, plain)
    _check_sampled_logprobs(model, groups, results, plain)
    assert [r.generated_token_ids for r in engine.generate(requests, plain)] == [
        r.generated_token_ids for r in results
    ], "sampling is not reproducible"
    alone = engine.generate([requests[3]], plain)[0]
    assert alone.generated_token_ids == results[3].generated_token_ids, "a row depends on its batch"
    filtered = SamplingParams(temperature=0.7, top_k=5, top_p=0.8, max_new_tokens=5, seed=4)
    _check_sampled_logprobs(model, groups, engine.generate(requests, filtered), filtered)
    return [r.generated_token_ids for r in results]


def _check_request_budget(engine, greedy: list[list[int]]) -> None:
    """A request's own ``max_new_tokens`` caps that row only (a guided rollout's budget less its prefix)."""
    requests = _requests()
    budgets = [1, None, 0, 3, 2]
    capped = [GenerationRequest(r.prompt_token_ids, r.sample_id, r.prefix_token_ids, b)
              for r, b in zip(requests, budgets, strict=True)]  # fmt: skip
    results = engine.generate(capped, SamplingParams(temperature=0.0, max_new_tokens=MAX_NEW))
    for result, full, budget in zip(results, greedy, budgets, strict=True):
        assert result.generated_token_ids == full[: MAX_NEW if budget is None else budget]


def _generation_worker(rank: int, world_size: int, tensor_parallel: int, pipeline_parallel: int):
    from megatron_tropd.models import tiny
    from megatron_tropd.placed import one_model_groups, place_model
    from megatron_tropd.rollout.megatron_engine import MegatronGenerationEngine

    groups = one_model_groups(tensor_parallel, pipeline_parallel, seed=1234)
    placed = place_model(tiny("qwen2"), groups, seed=MODEL_SEED)
    model = placed.stage
    assert placed.vocab_size == VOCAB_SIZE
    tokens = {}
    for batching in ("continuous", "static"):
        engine = MegatronGenerationEngine(placed, max_sequence_length=32, max_batch_size=4, batching=batching)
        with torch.no_grad():
            greedy = _check_greedy(model, groups, engine)
            _check_stop(engine, greedy)
            _check_request_budget(engine, greedy)
            sampled = _check_sampling(model, groups, engine)
        tokens[batching] = {"greedy": greedy, "sampled": sampled}
    assert tokens["continuous"] == tokens["static"], "continuous and static batching generated differently"
    return tokens["continuous"]


def test_kv_cache_generation_matches_full_recompute_at_tp1_tp2_pp2():
    by_layout = {}
    for tensor_parallel, pipeline_parallel in ((1, 1), (2, 1), (1, 2)):
        results = run_on_ranks(
            _generation_worker, tensor_parallel * pipeline_parallel, tensor_parallel, pipeline_parallel
        )
        assert all(r == results[0] for r in results), "ranks of one replica generated different tokens"
        by_layout[(tensor_parallel, pipeline_parallel)] = results[0]
    # Same seed, same model at every layout: the tokens must not depend on the layout. (Sampled tokens
    # could only differ if a uniform fell within float rounding of a CDF boundary; fixed seeds, so stable.)
    for layout in ((2, 1), (1, 2)):
        for kind in ("greedy", "sampled"):
            assert by_layout[layout][kind] == by_layout[(1, 1)][kind], (
                f"{layout} {kind} tokens differ from TP1"
            )


# ---------------------------------------------------------------------------------------------------------
# Single-process unit tests
# ---------------------------------------------------------------------------------------------------------


def test_padded_vocab_columns_are_never_sampled():
    logits = torch.zeros(4, 384)
    logits[:, 300:] = 100.0  # padded columns dominate: they must still never be drawn
    uniforms = torch.tensor([1e-9, 0.3, 0.7, 1 - 1e-9], dtype=torch.float64)
    for sampling in (SamplingParams(temperature=0.0), SamplingParams(temperature=1.0)):
        tokens, _ = sample_tokens(logits, 300, sampling, uniforms)
        assert (tokens < 300).all()


def test_inverse_cdf_sampling_follows_the_filtered_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0, 0.0]]).expand(20000, 5)
    uniforms = (torch.arange(20000, dtype=torch.float64) + 0.5) / 20000  # stratified: near-exact counts
    sampling = SamplingParams(temperature=0.8, top_k=4, top_p=0.9)
    tokens, logprobs = sample_tokens(logits, 5, sampling, uniforms)
    expected = filter_logprobs(torch.log_softmax(logits[:1] / 0.8, -1), 4, 0.9)[0].exp()
    frequencies = torch.bincount(tokens, minlength=5).double() / 20000
    assert torch.allclose(frequencies, expected.double(), atol=1e-3), (frequencies, expected)
    assert expected[3] == 0 and frequencies[3] == 0, "the token outside the top-k was sampled"
    assert torch.allclose(logprobs, expected.log()[tokens])


def test_to_rollout_batch_masks_prefix_and_generated_labels():
    results = [
        GenerationResult([1, 2, 3, 40, 41, 50, 51, 52], 3, 2, [50, 51, 52], [-1.0] * 3, True, sample_id=7),
        GenerationResult([4, 5, 60, 61, 62, 63], 2, 0, [60, 61, 62, 63], [-1.0] * 4, False, sample_id=8),
    ]
    batch = to_rollout_batch(results, pad_token_id=0)
    assert batch.tokens.tolist() == [[1, 2, 3, 40, 41, 50, 51, 52], [4, 5, 60, 61, 62, 63, 0, 0]]
    # Label t is tokens[t + 1]: row 0's response starts at index 3, so labels 2..6 are trained on.
    assert batch.loss_mask.int().tolist() == [[0, 0, 1, 1, 1, 1, 1, 0], [0, 1, 1, 1, 1, 0, 0, 0]]
    assert batch.is_teacher_prefix.int().tolist() == [[0, 0, 1, 1, 0, 0, 0, 0], [0] * 8]
    assert batch.labels[0][batch.loss_mask[0]].tolist() == [40, 41, 50, 51, 52]
    assert batch.labels[1][batch.loss_mask[1]].tolist() == [60, 61, 62, 63]
    assert batch.sample_ids.tolist() == [7, 8]
