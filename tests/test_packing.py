"""Sequence packing: the plan, the block-diagonal attention, and packed == padded in signals, losses and
gradients at TP1, TP2 and PP2 (2 gloo ranks; the teacher on another layout each time).

The rollouts have very different lengths: one equal to the token budget, one longer than half of it,
several short ones. Packed and padded differ only in the order of floating-point sums, so fp32 values
agree to 1e-5 (relative to the largest value).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from megatron_tropd.batch import RolloutBatch
from megatron_tropd.config import MethodConfig, OptimConfig, RunConfig
from megatron_tropd.packing import (
    pack_fields,
    padding_share,
    plan_packs,
    sequence_lengths,
    token_balanced_ranges,
    unpack_rows,
)
from megatron_tropd.spawn import run_on_ranks
from tests.distill_setup import setup_models, student_config

BUDGET = 32
LENGTHS = [32, 4, 20, 6, 17, 5, 9, 12]  # one at the budget, one > half of it
METHOD = MethodConfig(name="tropd", topk=8)
SIGNALS = ("lp_teacher", "topk_ids", "topk_logprobs", "lp_student_old", "entropy_student_old", "trust_mask")


def heavy_tailed_batch() -> RolloutBatch:
    """Right-padded rows of ``LENGTHS`` tokens: a 3-token prompt, a response, a teacher prefix in odd rows."""
    generator = torch.Generator().manual_seed(5)
    rows, width = len(LENGTHS), max(LENGTHS)
    tokens = torch.randint(1, student_config().vocab_size, (rows, width), generator=generator)
    loss_mask = torch.zeros(rows, width, dtype=torch.bool)
    prefix = torch.zeros_like(loss_mask)
    for row, length in enumerate(LENGTHS):
        tokens[row, length:] = 0
        loss_mask[row, 2 : length - 1] = True  # labels 3 .. length - 1
        if row % 2:
            prefix[row, 2 : min(4, length - 1)] = True
    return RolloutBatch(tokens, loss_mask, prefix, torch.arange(rows) + 40)


# ---------------------------------------------------------------------------------------------------------
# The plan (pure)
# ---------------------------------------------------------------------------------------------------------


def test_sequence_lengths_are_read_from_the_loss_mask():
    assert sequence_lengths(heavy_tailed_batch()) == LENGTHS


def test_first_fit_decreasing_places_every_row_once_within_the_budget():
    lengths = [30, 2, 17, 16, 16, 1, 32, 9, 9, 5]
    packs = plan_packs(lengths, 32)
    assert sorted(row for pack in packs for row in pack) == list(range(len(lengths)))
    assert all(sum(lengths[row] for row in pack) <= 32 for pack in packs)
    assert [6] in packs  # the sequence equal to the budget fills a microbatch alone
    assert len(packs) == 5  # the lower bound: 137 tokens need ceil(137 / 32) = 5 microbatches
    assert packs == [[6], [0, 1], [2, 5, 7, 9], [3, 4], [8]]  # deterministic: longest first, ties by row


def test_a_sequence_longer_than_the_budget_is_refused_with_the_setting_to_change():
    with pytest.raises(ValueError, match="sequence 1 has 40 tokens.*optim.max_tokens_per_microbatch is 32"):
        plan_packs([3, 40], 32)


def test_data_parallel_ranges_balance_tokens_not_rows():
    lengths = [200, 10, 10, 10, 10, 10, 10, 10, 10, 10, 10, 10]
    ranges = token_balanced_ranges(lengths, 2)
    assert ranges[0].start == 0 and ranges[0].stop == ranges[1].start and ranges[1].stop == len(lengths)
    assert ranges == [slice(0, 1), slice(1, 12)]  # 200 vs 110 tokens; equal rows would give 250 vs 60
    assert all(r.stop > r.start for r in token_balanced_ranges([5] * 4, 4))
    with pytest.raises(ValueError, match="3 sequences cannot be split over 4"):
        token_balanced_ranges([1, 2, 3], 4)


def test_pack_and_unpack_round_trip_with_padding_as_its_own_sequence():
    batch = heavy_tailed_batch()
    pack = pack_fields({"tokens": batch.tokens}, [1, 3], LENGTHS, pad_to=16)
    assert pack.fields["tokens"].shape == (1, 16)
    assert pack.cu_seqlens.tolist() == [0, 4, 10, 16]
    assert pack.position_ids[0].tolist() == [0, 1, 2, 3, 0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5]
    assert padding_share([pack]) == pytest.approx(6 / 16)
    restored = unpack_rows([{"tokens": pack.fields["tokens"]}], [pack], 8, batch.seq_length)
    for row in (1, 3):
        assert torch.equal(restored["tokens"][row], batch.tokens[row])


def test_block_causal_mask_is_causal_within_and_closed_across_sequences():
    from megatron_tropd.attention import block_causal_mask

    mask = block_causal_mask(torch.tensor([0, 2, 5], dtype=torch.int32), 5)[0, 0]
    allowed = ~mask
    expected = torch.zeros(5, 5, dtype=torch.bool)
    expected[:2, :2] = torch.tril(torch.ones(2, 2, dtype=torch.bool))
    expected[2:, 2:] = torch.tril(torch.ones(3, 3, dtype=torch.bool))
    assert torch.equal(allowed, expected)


def test_the_budget_must_hold_the_longest_rollout():
    config = RunConfig()
    config.rollout.max_prompt_length, config.rollout.max_new_tokens = 100, 400
    assert config.packing_tokens == 500  # 0 means the longest rollout
    config.optim.max_tokens_per_microbatch = 499
    with pytest.raises(ValueError, match="cannot hold a rollout of .* = 500 tokens"):
        config._check_packing_budget()
    config.optim.sequence_packing = False
    assert config.packing_tokens == 0


# ---------------------------------------------------------------------------------------------------------
# Packed == padded, on 2 gloo ranks
# ---------------------------------------------------------------------------------------------------------


def _gradients(student) -> list[torch.Tensor]:
    """The reduced gradients of the last update (DDP's main grads; plain all-reduce, every rank whole)."""
    return [p.main_grad.detach().clone() for p in student.module.parameters()]


def _score_and_train(topology, student, teacher, max_tokens: int):
    from megatron_tropd.scoring import ScoringSpec, score_batch
    from megatron_tropd.training import batch_context, train_step

    batch = heavy_tailed_batch()
    spec = ScoringSpec.for_method(student_config().vocab_size, METHOD, 1, max_tokens=max_tokens)
    scored = score_batch(batch, student.placed, teacher, spec, 0)
    context = batch_context(METHOD, scored, 0, 4, topology.student, guidance=True)
    result = train_step(student, scored, METHOD, context)
    lengths = sequence_lengths(batch)
    rows = student.placed.rows(batch.num_sequences, lengths if max_tokens else None)
    signals = None
    if topology.student.is_last_stage:
        signals = {name: getattr(scored, name) for name in SIGNALS}
    return {
        "rows": (rows.start, rows.stop), "signals": signals, "metrics": result.metrics,
        "grad_norm": result.grad_norm, "grads": _gradients(student),
    }  # fmt: skip


def packing_worker(rank, world_size, student_layout, teacher_layout):
    """The same student (same seed) trained one step padded and one step packed, on one teacher."""
    from megatron_tropd.training import build_student
    from tests.distill_setup import STUDENT_SEED

    padded = OptimConfig(lr=1e-4, micro_batch_size=1, use_distributed_optimizer=False, sequence_packing=False)
    packed = dataclasses.replace(padded, sequence_packing=True, max_tokens_per_microbatch=BUDGET)
    topology, padded_student, teacher = setup_models(student_layout, teacher_layout, padded, 4)
    packed_student = build_student(student_config(), packed, topology.student, 4, STUDENT_SEED)
    return {
        "padded": _score_and_train(topology, padded_student, teacher, 0),
        "packed": _score_and_train(topology, packed_student, teacher, BUDGET),
    }


@pytest.fixture(scope="module", params=[((1, 1), (2, 1)), ((2, 1), (1, 2)), ((1, 2), (2, 1))], ids=str)
def per_rank(request):
    student_layout, teacher_layout = request.param
    return run_on_ranks(packing_worker, 2, student_layout, teacher_layout)


def _global(per_rank, name):
    """The signals of every row, from the ranks that hold them (rows, field -> tensor)."""
    merged = {}
    for result in per_rank:
        if result[name]["signals"] is not None:
            start, stop = result[name]["rows"]
            for field, value in result[name]["signals"].items():
                merged.setdefault(field, {})[start] = value
    return {field: torch.cat([parts[s] for s in sorted(parts)]) for field, parts in merged.items()}


def test_packed_signals_equal_padded_signals_within_each_sequence(per_rank):
    padded, packed = _global(per_rank, "padded"), _global(per_rank, "packed")
    for row, length in enumerate(LENGTHS):
        for field in SIGNALS:
            got, want = packed[field][row, :length], padded[field][row, :length]
            if field in ("topk_ids", "trust_mask"):
                assert torch.equal(got, want), (row, field)
            else:
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=f"{row} {field}")


def test_packed_losses_and_gradients_equal_padded(per_rank):
    last = [r for r in per_rank if r["packed"]["signals"] is not None]
    for result in last:
        for name, want in result["padded"]["metrics"].items():
            assert result["packed"]["metrics"][name] == pytest.approx(want, rel=1e-5, abs=1e-6), name
    for result in per_rank:
        assert result["packed"]["grad_norm"] == pytest.approx(result["padded"]["grad_norm"], rel=1e-5)
        for got, want in zip(result["packed"]["grads"], result["padded"]["grads"], strict=True):
            scale = want.abs().max().clamp_min(1e-12)
            assert ((got - want).abs().max() / scale).item() <= 1e-5
