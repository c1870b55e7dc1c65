"""The generation engine's two decode paths, step by step, against a full forward of the whole sequence.

``decoder="cached"`` (``rollout/decoder.py``: the model's own parameters, keys rotated once into the cache)
and ``decoder="megatron"`` (``GPTModel.forward`` with Megatron's static KV cache) must both give, at
every position, the logits a full no-cache forward gives: for each model family (Qwen2 q/k/v biases,
Qwen3 q/k norms and a tied head, Llama-3 RoPE scaling), at TP1, TP2 and PP2; so must the cached decoder's
continuous-batching steps (per-slot positions, chunked prefill, a reused slot). Also: the engine's
first-batch check replaces a cached decoder that misreads the model, and "auto" falls back on features
the cached decoder does not implement.
"""

from __future__ import annotations

import pytest
import torch

from megatron_tropd.spawn import run_on_ranks
from tests.model_reference import full_logits

ARCHITECTURES = ("qwen2", "qwen3", "llama")
BATCH, PREFILL, TOTAL = 3, 5, 9
TOLERANCE = 1e-4  # fp32 on CPU; the two sides sum in different orders


def _build(architecture: str, groups, layout, **overrides):
    from megatron_tropd.models import build_gpt_model, tiny

    return build_gpt_model(
        tiny(architecture, **overrides), groups.pg_collection, pre_process=groups.is_first_stage,
        post_process=groups.is_last_stage, tensor_parallel_size=layout.tensor_parallel,
        pipeline_parallel_size=layout.pipeline_parallel, seed=5,
    ).eval()  # fmt: skip


def _placed(model, groups):
    """The engine's view of a test model: its stage, groups and (vocabulary 300) shape."""
    from megatron_tropd.models import tiny
    from megatron_tropd.placed import PlacedModel

    return PlacedModel(model, groups, tiny("qwen2"))


def _stepwise_error(engine, model, groups, tokens: torch.Tensor) -> float | None:
    """Prefill ``PREFILL`` positions, then feed one token at a time; the largest logit difference from
    the full forward over all steps (on the last stage; None elsewhere)."""
    reference = full_logits(model, groups, tokens)[:, :, : engine.vocab_size]  # [b, S, V]
    stage = engine._new_stage(BATCH, TOTAL)
    worst, start, end = 0.0, 0, PREFILL
    while end <= TOTAL:
        logits = engine._forward(stage, tokens[:, start:end])
        if logits is not None:
            difference = logits[:, : engine.vocab_size] - reference[:, end - 1]
            worst = max(worst, difference.abs().max().item())
        start, end = end, end + 1
    return worst if groups.is_last_stage else None


def _slot_error(engine, model, groups, tokens: torch.Tensor) -> float | None:
    """Teacher-force the rows through continuous-batching steps: 2 slots for 3 rows of different prompt
    lengths, prefilled 3 tokens per step, so a prefill chunk shares a step with decode tokens, and the
    third row reuses the first row's slot, whose stale keys beyond the third row's position its decode
    steps must not see (the other slot decodes further along). The largest logit difference from the
    full forward at every drawn position (on the last stage; None elsewhere)."""
    from megatron_tropd.rollout.decoder import CachedDecoder, SlotStep
    from megatron_tropd.rollout.engine import GenerationRequest, SamplingParams
    from megatron_tropd.rollout.slots import SlotScheduler

    reference = full_logits(model, groups, tokens)[:, :, : engine.vocab_size]  # [b, S, V]
    requests = [
        GenerationRequest(tuple(tokens[row, :prompt].tolist()), row, max_new_tokens=TOTAL - prompt)
        for row, prompt in enumerate((PREFILL, 2, 3))
    ]
    scheduler = SlotScheduler(requests, SamplingParams(), num_slots=2, prefill_chunk=3)
    decoder = CachedDecoder(engine.model, 2, TOTAL, engine.device)
    worst, reused = 0.0, False
    while scheduler.refill():
        segments = scheduler.take_step()
        reused |= any(s.sample_id == 2 and s.slot == 0 for s in segments) and len(segments) == 2
        step = SlotStep.build(segments, 2, engine.device)
        logits = engine._forward_slots(decoder, step)
        rows, positions = step.sample_ids.tolist(), step.sample_positions.tolist()
        if logits is not None and rows:
            expected = reference[rows, [position - 1 for position in positions]]
            worst = max(worst, (logits[:, : engine.vocab_size] - expected).abs().max().item())
        forced = [int(tokens[row, position]) for row, position in zip(rows, positions, strict=True)]
        scheduler.record(step.sample_slots, forced, [0.0] * len(rows))
    assert reused, "the third row should take the first row's slot while the second row decodes"
    return worst if groups.is_last_stage else None


def _decoder_worker(rank: int, world_size: int, tensor_parallel: int, pipeline_parallel: int) -> dict:
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from megatron_tropd.rollout.megatron_engine import MegatronGenerationEngine
    from megatron_tropd.runtime import enable_cpu_mode
    from megatron_tropd.topology import ParallelLayout, build_topology

    enable_cpu_mode()
    layout = ParallelLayout(tensor_parallel, pipeline_parallel)
    groups = build_topology(layout, layout).student
    model_parallel_cuda_manual_seed(1234)
    tokens = torch.randint(1, 300, (BATCH, TOTAL), generator=torch.Generator().manual_seed(3))
    errors = {}
    with torch.no_grad():
        for architecture in ARCHITECTURES:
            model = _build(architecture, groups, layout)
            for decoder in ("cached", "megatron"):
                engine = MegatronGenerationEngine(_placed(model, groups), TOTAL, BATCH, decoder=decoder)
                errors[architecture, decoder] = _stepwise_error(engine, model, groups, tokens)
            errors[architecture, "cached slots"] = _slot_error(engine, model, groups, tokens)
            for parameter in model.parameters():  # an optimizer step updates weights in place
                parameter.mul_(1.25)
            engine = MegatronGenerationEngine(_placed(model, groups), TOTAL, BATCH, decoder="cached")
            errors[architecture, "cached after update"] = _stepwise_error(engine, model, groups, tokens)
    return {
        "errors": errors,
        "fallback": _fallback(groups, layout),
        "self_check": _self_check(groups, layout),
    }


def _self_check(groups, layout) -> dict:
    """The engine compares the cached decoder with Megatron's forward on its first batch: an intact
    decoder keeps generating; one that misreads the model (here: it forgets RoPE) is replaced by
    Megatron's forward, and the tokens are still right."""
    from megatron_tropd.rollout import decoder as decoder_module
    from megatron_tropd.rollout.engine import GenerationRequest, SamplingParams
    from megatron_tropd.rollout.megatron_engine import MegatronGenerationEngine

    model = _build("qwen2", groups, layout)
    requests = [GenerationRequest((5, 17, 42, 9), sample_id=0), GenerationRequest((8, 7, 6), sample_id=1)]
    greedy = SamplingParams(temperature=0.0, max_new_tokens=4)

    def tokens(engine):
        return [r.generated_token_ids for r in engine.generate(requests, greedy)]

    reference = tokens(MegatronGenerationEngine(_placed(model, groups), 16, 2, decoder="megatron"))
    intact = MegatronGenerationEngine(_placed(model, groups), 16, 2)
    intact_tokens = tokens(intact)
    misreading = MegatronGenerationEngine(_placed(model, groups), 16, 2)
    original = decoder_module._Rope.rotate
    decoder_module._Rope.rotate = lambda self, t, start: t
    try:
        misread_tokens = tokens(misreading)
    finally:
        decoder_module._Rope.rotate = original
    return {
        "intact": (intact.decoder, intact_tokens == reference),
        "misreading": (misreading.decoder, misread_tokens == reference),
    }


def _fallback(groups, layout) -> dict:
    """A feature the cached decoder does not implement (sliding-window attention, set on the model's
    config): "auto" must choose Megatron's forward and "cached" must refuse, naming the feature."""
    from megatron_tropd.rollout.megatron_engine import MegatronGenerationEngine

    model = _build("qwen2", groups, layout)
    model.config.window_size = (4, 0)
    chosen = MegatronGenerationEngine(_placed(model, groups), TOTAL, BATCH).decoder
    try:
        MegatronGenerationEngine(_placed(model, groups), TOTAL, BATCH, decoder="cached")
        refusal = None
    except ValueError as error:
        refusal = str(error)
    return {"auto": chosen, "refusal": refusal}


@pytest.mark.parametrize("tensor_parallel,pipeline_parallel", [(1, 1), (2, 1), (1, 2)])
def test_both_decoders_match_the_full_forward_at_every_step(tensor_parallel, pipeline_parallel):
    results = run_on_ranks(
        _decoder_worker, tensor_parallel * pipeline_parallel, tensor_parallel, pipeline_parallel
    )
    measured = [r["errors"] for r in results if next(iter(r["errors"].values())) is not None]
    assert measured, "no rank held the last pipeline stage"
    for errors in measured:
        assert len(errors) == 4 * len(ARCHITECTURES)
        for (architecture, decoder), worst in errors.items():
            assert worst < TOLERANCE, f"{architecture} {decoder}: logits differ by {worst:.2e}"
    for result in results:
        assert result["self_check"] == {"intact": ("cached", True), "misreading": ("megatron", True)}
    for fallback in (r["fallback"] for r in results):
        assert fallback["auto"] == "megatron"
        assert fallback["refusal"] and "sliding-window attention" in fallback["refusal"]


def test_an_unknown_decoder_is_refused():
    from megatron_tropd.rollout.megatron_engine import _choose_decoder

    with pytest.raises(ValueError, match="decoder='fast' is not one of auto, cached, megatron"):
        _choose_decoder("fast", torch.nn.Linear(2, 2))
