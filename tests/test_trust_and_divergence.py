"""The trust-region draw and the [T, k] divergences: hand-checkable values, gradients, bad input."""

from __future__ import annotations

import math

import mpmath
import pytest
import torch

from megatron_tropd.ops import (
    agreement_ratio,
    draw_trust_mask,
    jsd_topk_teacher_term,
    topk_forward_kl,
    topk_mass,
    trust_uniform,
    vocab_parallel_log_probs_at,
    vocab_parallel_topk,
)
from megatron_tropd.ops import reference as ref
from megatron_tropd.ops.divergence import FKL_FAMILIES, log1mexp
from megatron_tropd.ops.vocab_parallel import (
    vocab_parallel_token_stats_with_tail,
    vocab_parallel_topk_forward_kl,
)
from megatron_tropd.spawn import run_on_ranks

NUM_SAMPLES, SEQ_LEN = 64, 500


def _keys():
    flat = torch.arange(NUM_SAMPLES * SEQ_LEN)
    return flat // SEQ_LEN, flat % SEQ_LEN


def trust_worker(rank, world_size, p_trust):
    sample_ids, token_index = _keys()
    return draw_trust_mask(p_trust, seed=1234, step=17, sample_ids=sample_ids, token_index=token_index)


def test_trust_draw_identical_on_every_rank_and_rerun():
    p_trust = torch.rand(
        NUM_SAMPLES * SEQ_LEN, generator=torch.Generator().manual_seed(3), dtype=torch.float64
    )
    masks = run_on_ranks(trust_worker, 2, p_trust)
    rerun = trust_worker(0, 1, p_trust)
    assert torch.equal(masks[0], masks[1])
    assert torch.equal(masks[0], rerun)


def test_trust_draw_is_independent_of_how_tokens_are_split():
    sample_ids, token_index = _keys()
    whole = trust_uniform(7, 3, sample_ids, token_index)
    pieces = [
        trust_uniform(7, 3, s, t) for s, t in zip(sample_ids.split(999), token_index.split(999), strict=True)
    ]
    assert torch.equal(whole, torch.cat(pieces))
    as_matrix = trust_uniform(
        7, 3, sample_ids.view(NUM_SAMPLES, SEQ_LEN), token_index.view(NUM_SAMPLES, SEQ_LEN)
    )
    assert torch.equal(whole, as_matrix.flatten())


@pytest.mark.parametrize("p", [0.05, 0.3, 0.5, 0.9])
def test_trust_draw_mean_matches_p_trust(p):
    sample_ids, token_index = _keys()
    mask = draw_trust_mask(torch.full((NUM_SAMPLES * SEQ_LEN,), p), 99, 5, sample_ids, token_index)
    n = mask.numel()
    sigma = math.sqrt(p * (1 - p) / n)
    assert abs(mask.double().mean().item() - p) < 4.5 * sigma


def test_trust_uniform_is_uniform_and_decorrelated_across_steps_and_seeds():
    sample_ids, token_index = _keys()
    u = trust_uniform(0, 0, sample_ids, token_index)
    n = u.numel()
    empirical = torch.sort(u).values
    ks = (empirical - torch.arange(1, n + 1, dtype=torch.float64) / n).abs().max().item()
    assert ks < 1.63 / math.sqrt(n)  # Kolmogorov-Smirnov at the 1% level
    assert u.min().item() > 0.0 and u.max().item() < 1.0
    for other in (trust_uniform(0, 1, sample_ids, token_index), trust_uniform(1, 0, sample_ids, token_index)):
        correlation = torch.corrcoef(torch.stack([u, other]))[0, 1].item()
        assert abs(correlation) < 4.5 / math.sqrt(n)
    # neighbouring tokens of one sample, and the same token of neighbouring samples, are not correlated
    grid = u.view(NUM_SAMPLES, SEQ_LEN)
    for a, b in ((grid[:, :-1], grid[:, 1:]), (grid[:-1], grid[1:])):
        correlation = torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1].item()
        assert abs(correlation) < 4.5 / math.sqrt(a.numel())


def test_trust_draw_rejects_mismatched_keys():
    with pytest.raises(ValueError, match="must match"):
        trust_uniform(0, 0, torch.arange(3), torch.arange(4))
    with pytest.raises(ValueError, match="integer"):
        trust_uniform(0, 0, torch.arange(3.0), torch.arange(3))


def _two_token_problem():
    """Teacher and student log-probs on a 4-token vocabulary, top-2 support, written out by hand."""
    p_teacher = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.7, 0.1, 0.1, 0.1]], dtype=torch.float64)
    p_student = torch.tensor([[0.25, 0.25, 0.25, 0.25], [0.1, 0.6, 0.2, 0.1]], dtype=torch.float64)
    ids = torch.tensor([[0, 1], [0, 1]])
    return p_teacher, p_student, ids


def test_fkl_families_equal_their_hand_formulas():
    p_t, p_s, ids = _two_token_problem()
    lp_t, lp_s = p_t.gather(1, ids).log(), p_s.gather(1, ids).log()
    raw = [
        0.5 * math.log(0.5 / 0.25) + 0.3 * math.log(0.3 / 0.25),
        0.7 * math.log(0.7 / 0.1) + 0.1 * math.log(0.1 / 0.6),
    ]
    qt0, qs0 = (0.5 / 0.8, 0.3 / 0.8), (0.5, 0.5)
    qt1, qs1 = (0.7 / 0.8, 0.1 / 0.8), (0.1 / 0.7, 0.6 / 0.7)
    renorm = [
        sum(a * math.log(a / b) for a, b in zip(qt, qs, strict=True)) for qt, qs in ((qt0, qs0), (qt1, qs1))
    ]
    tail = [raw[0] + 0.2 * math.log(0.2 / 0.5), raw[1] + 0.2 * math.log(0.2 / 0.3)]
    for family, expected in (("raw", raw), ("renorm", renorm), ("tail", tail)):
        got = topk_forward_kl(lp_s, lp_t, family)
        torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64), atol=1e-12, rtol=0)


@pytest.mark.parametrize("family", FKL_FAMILIES)
def test_fkl_hand_written_backward_passes_gradcheck(family):
    generator = torch.Generator().manual_seed(0)
    lp_s = torch.log_softmax(torch.randn(5, 12, generator=generator, dtype=torch.float64), -1)[:, :6]
    lp_t = torch.log_softmax(torch.randn(5, 12, generator=generator, dtype=torch.float64), -1)[:, :6]
    lp_s.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: topk_forward_kl(x, lp_t, family), (lp_s,))


def test_tail_fkl_with_the_student_tail_passes_gradcheck():
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(5, 12, generator=generator, dtype=torch.float64)
    lp_t = torch.log_softmax(torch.randn(5, 12, generator=generator, dtype=torch.float64), -1)[:, :6]
    lp_s = torch.log_softmax(logits, -1)[:, :6].requires_grad_(True)
    lp_tail = torch.logsumexp(torch.log_softmax(logits, -1)[:, 6:], -1).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x, y: topk_forward_kl(x, lp_t, "tail", y), (lp_s, lp_tail))
    # with the exact tail the value equals the complement form wherever the complement is exact
    torch.testing.assert_close(
        topk_forward_kl(lp_s, lp_t, "tail", lp_tail), topk_forward_kl(lp_s, lp_t, "tail")
    )


def _tiny_tail_problem(tail_mass: float):
    """Student logits ``[6, 48]`` whose mass outside the teacher's top-8 is ``tail_mass``."""
    generator = torch.Generator().manual_seed(4)
    teacher = torch.randn(6, 48, generator=generator, dtype=torch.float64) * 2
    student = torch.randn(6, 48, generator=generator, dtype=torch.float64)
    ids, lp_t = ref.vocab_parallel_topk(teacher, 8, 48)
    outside = torch.ones_like(student, dtype=torch.bool).scatter(-1, ids, False)
    masked = [
        torch.logsumexp(student.masked_fill(m, float("-inf")), -1, keepdim=True) for m in (outside, ~outside)
    ]
    student = torch.where(outside, student + masked[0] - masked[1] + math.log(tail_mass), student)
    return student, ids, lp_t


def _value_and_logits_grad(fn, logits):
    leaf = logits.detach().clone().requires_grad_(True)
    value = fn(leaf)
    value.sum().backward()
    return value.detach().double(), leaf.grad.double()


def test_tail_fkl_in_fp32_is_exact_for_a_student_tail_of_1e_minus_9():
    """``1 - sum(top-k)`` rounds to 0 in fp32 below ~1e-7 of mass; the tail summed over its own columns
    keeps the value and the logits gradient at fp32 accuracy (max |grad| here is ~0.6)."""
    student, ids, lp_t = _tiny_tail_problem(1e-9)
    assert ref.log_mass_outside(student, ids, 48).exp().allclose(torch.tensor(1e-9, dtype=torch.float64))
    expected = _value_and_logits_grad(
        lambda x: ref.vocab_parallel_topk_forward_kl(x, ids, lp_t, 48, "tail"), student
    )
    got = _value_and_logits_grad(
        lambda x: vocab_parallel_topk_forward_kl(x, ids, lp_t.float(), None, 48, "tail"), student.float()
    )
    torch.testing.assert_close(got[0], expected[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(got[1], expected[1], atol=1e-6, rtol=0)
    assert expected[1].abs().max() < 1.0
    # through the loss's own path: token stats with the tail, then the [T, k] divergence
    loss_path = _value_and_logits_grad(lambda x: _fkl_from_stats(x, ids, lp_t.float()), student.float())
    torch.testing.assert_close(loss_path[0], expected[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(loss_path[1], expected[1], atol=1e-6, rtol=0)
    # the complement of fp32 top-k log-probs cannot resolve this tail: the defect the exact tail fixes
    complement = _value_and_logits_grad(
        lambda x: topk_forward_kl(vocab_parallel_log_probs_at(x, ids, None, 48), lp_t.float(), "tail"),
        student.float(),
    )
    assert (complement[1] - expected[1]).abs().max() > 1.0


def _fkl_from_stats(logits, ids, lp_t):
    """The loss's path: log-probs at ``ids`` and the tail outside them, then the ``[T, k]`` divergence."""
    lp_s, _, lp_tail = vocab_parallel_token_stats_with_tail(logits, ids, None, 48, 0, False)
    return topk_forward_kl(lp_s, lp_t, "tail", lp_tail)


def test_log1mexp_is_accurate_at_both_ends():
    x = torch.tensor([-1e-12, -1e-6, -0.5, -math.log(2.0), -5.0, -40.0], dtype=torch.float64)
    # Reference at 50 digits: log(-expm1(x)) itself loses everything near -40 (1 - 4e-18 rounds to 1).
    with mpmath.workdps(50):
        expected = [float(mpmath.log(-mpmath.expm1(mpmath.mpf(v)))) for v in x.tolist()]
    torch.testing.assert_close(log1mexp(x), torch.tensor(expected, dtype=torch.float64), atol=0, rtol=1e-14)
    assert log1mexp(torch.tensor([0.0, 1e-9])).isneginf().all()  # no mass left (rounding above 0 too)


def test_raw_fkl_gradient_on_logits_is_bounded_where_value_is_infinite():
    """d raw-FKL / dz = (sum_{V_k} pi_T) pi_S - pi_T 1[V_k]: finite even with a -inf student logit."""
    teacher = torch.tensor([[2.0, 1.0, 0.0, -1.0, -3.0]], dtype=torch.float64)
    student = torch.tensor([[0.0, float("-inf"), 1.0, 0.5, 0.0]], dtype=torch.float64, requires_grad=True)
    ids, lp_t = vocab_parallel_topk(teacher, 2, None, 5)
    fkl = topk_forward_kl(vocab_parallel_log_probs_at(student, ids, None, 5), lp_t, "raw")
    fkl.sum().backward()
    assert torch.isinf(fkl).all()
    p_t, p_s = torch.softmax(teacher, -1), torch.softmax(student.detach(), -1)
    in_topk = torch.zeros_like(p_t).scatter(1, ids, 1.0)
    expected = p_t.gather(1, ids).sum() * p_s - p_t * in_topk
    torch.testing.assert_close(student.grad, expected, atol=1e-12, rtol=0)


def test_jsd_agreement_and_mass_hand_values():
    p_t, p_s, ids = _two_token_problem()
    lp_t, lp_s = p_t.gather(1, ids).log(), p_s.gather(1, ids).log()
    expected = [
        sum(
            t * math.log(t / (0.5 * t + 0.5 * s))
            for t, s in zip(p_t[i, :2].tolist(), p_s[i, :2].tolist(), strict=True)
        )
        for i in range(2)
    ]
    torch.testing.assert_close(
        jsd_topk_teacher_term(lp_s, lp_t, 0.5), torch.tensor(expected, dtype=torch.float64)
    )
    torch.testing.assert_close(topk_mass(lp_s), torch.tensor([0.5, 0.7], dtype=torch.float64))
    ratio = agreement_ratio(torch.tensor([0.2, 0.9]).log(), torch.tensor([0.4, 0.3]).log())
    torch.testing.assert_close(ratio, torch.tensor([0.5, 1.0]))


def test_bad_input_names_the_problem():
    logits = torch.randn(3, 10)
    with pytest.raises(ValueError, match="family 'kl'.*raw, renorm, tail"):
        topk_forward_kl(torch.zeros(3, 2), torch.zeros(3, 2), "kl")
    with pytest.raises(ValueError, match="0 < k <= vocab_size"):
        vocab_parallel_topk(logits, 0, None, 10)
    with pytest.raises(ValueError, match="0 < k <= vocab_size"):
        vocab_parallel_topk(logits, 11, None, 10)
    with pytest.raises(ValueError, match="same shape"):
        topk_forward_kl(torch.zeros(3, 2), torch.zeros(3, 4))
    with pytest.raises(ValueError, match="does not fit"):
        vocab_parallel_log_probs_at(logits, torch.zeros(3, 1, dtype=torch.long), None, 12)
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        vocab_parallel_log_probs_at(logits, torch.full((3, 1), 10), None, 10)
    with pytest.raises(ValueError, match="token dims"):
        vocab_parallel_log_probs_at(logits, torch.zeros(4, 1, dtype=torch.long), None, 10)
    with pytest.raises(ValueError, match="beta"):
        jsd_topk_teacher_term(torch.zeros(3, 2), torch.zeros(3, 2), 1.0)
    with pytest.raises(ValueError, match="only read by the 'tail' family, not 'raw'"):
        topk_forward_kl(torch.zeros(3, 2), torch.zeros(3, 2), "raw", torch.zeros(3))
    with pytest.raises(ValueError, match=r"lp_student_tail must be \[T\] = \[3\]"):
        topk_forward_kl(torch.zeros(3, 2), torch.zeros(3, 2), "tail", torch.zeros(2))
    with pytest.raises(ValueError, match="tail_from = 3"):
        vocab_parallel_token_stats_with_tail(logits, torch.zeros(3, 2, dtype=torch.long), None, 10, 3)


def test_random_streams_are_independent_and_keep_their_historical_keys():
    """Each named stream draws its own numbers, and the trust stream is ``trust_uniform`` itself (a run
    resumed on a newer release draws what the older release drew)."""
    from megatron_tropd.ops.streams import Stream, stream_uniform

    sample_ids = torch.arange(4000) // 40
    index = torch.arange(4000) % 40
    draws = {stream: stream_uniform(stream, 3, sample_ids, index, step=5) for stream in Stream}
    assert torch.equal(draws[Stream.TRUST], trust_uniform(3, 5, sample_ids, index))
    for first, second in [(Stream.TRUST, Stream.SAMPLING), (Stream.TRUST, Stream.PREFIX_LENGTH),
                          (Stream.SAMPLING, Stream.PREFIX_LENGTH)]:  # fmt: skip
        correlation = torch.corrcoef(torch.stack([draws[first], draws[second]]))[0, 1]
        assert abs(correlation) < 0.05
    # Sampling is independent of the step: a request draws the same tokens whichever step carries it.
    assert torch.equal(stream_uniform(Stream.SAMPLING, 3, sample_ids, index, step=9), draws[Stream.SAMPLING])
    assert not torch.equal(stream_uniform(Stream.TRUST, 3, sample_ids, index, step=9), draws[Stream.TRUST])
