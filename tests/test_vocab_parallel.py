"""Every op of ops/vocab_parallel.py equals ops/reference.py in value and gradient, on TP = 1, 2, 4 gloo
processes, in fp64 (atol 1e-10) and fp32 (atol 2e-5 against the fp64 reference).

Each rank computes the sharded op on its slice of the same logits; the parent process concatenates the
per-rank gradient slices and compares them to the dense single-device reference.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from megatron_tropd.ops import reference as ref
from megatron_tropd.ops import vocab_parallel as vp
from megatron_tropd.ops.divergence import FKL_FAMILIES
from megatron_tropd.spawn import run_on_ranks
from tests.vocab_cases import CASES, make_logits, shard

CHUNK_TOKENS = 4  # small, so every case crosses several chunk boundaries
TOLERANCE = {torch.float64: 1e-10, torch.float32: 2e-5}


def _grad_of(fn, logits, weights):
    """Value of ``fn(leaf)`` and the gradient of ``sum(value * weights)`` w.r.t. the leaf logits."""
    leaf = logits.detach().clone().requires_grad_(True)
    value = fn(leaf)
    values = value if isinstance(value, tuple) else (value,)
    loss = sum((v * w).sum() for v, w in zip(values, weights, strict=True))
    loss.backward()
    return tuple(v.detach() for v in values), leaf.grad


def _weights(case_weights, k):
    return case_weights[:, : k + 1], case_weights[:, k + 1]


def _sharded_results(case, tp, rank, group, dtype):
    teacher, student, targets, weights = make_logits(case, tp, dtype)
    t_shard, s_shard = shard(teacher, rank, tp), shard(student, rank, tp)
    vocab, k = case.vocab_size, case.k
    out = {"stats": vp.vocab_parallel_log_softmax_stats(s_shard, group, vocab, CHUNK_TOKENS)}
    out["topk"] = vp.vocab_parallel_topk(t_shard, k, group, vocab, CHUNK_TOKENS)
    top_ids, top_lp = out["topk"]
    ids = torch.cat([targets[:, None], top_ids], -1)
    w_lp, w_h = _weights(weights, k)
    for inplace in (False, True):
        out[f"token_stats_inplace{inplace}"] = _grad_of(
            lambda x, inplace=inplace: vp.vocab_parallel_token_stats(
                x, ids, group, vocab, True, CHUNK_TOKENS, inplace
            ),
            s_shard,
            (w_lp, w_h),
        )
        out[f"token_stats_tail_inplace{inplace}"] = _grad_of(
            lambda x, inplace=inplace: vp.vocab_parallel_token_stats_with_tail(
                x, ids, group, vocab, 1, True, CHUNK_TOKENS, inplace
            ),
            s_shard,
            (w_lp, w_h, w_h.flip(0)),
        )
    out["log_prob"] = _grad_of(
        lambda x: vp.vocab_parallel_log_prob(x, targets, group, vocab), s_shard, (w_h,)
    )
    out["entropy"] = _grad_of(
        lambda x: vp.vocab_parallel_entropy(x, group, vocab, CHUNK_TOKENS), s_shard, (w_h,)
    )
    for family in FKL_FAMILIES:
        out[f"fkl_{family}"] = _grad_of(
            lambda x, f=family: vp.vocab_parallel_topk_forward_kl(x, top_ids, top_lp, group, vocab, f, 3),
            s_shard,
            (w_h,),
        )
    out["jsd"] = _grad_of(
        lambda x: vp.vocab_parallel_jsd_teacher_term(x, top_ids, top_lp, group, vocab, 0.5), s_shard, (w_h,)
    )
    out["agreement"] = vp.vocab_parallel_agreement_ratio(s_shard, t_shard, targets, group, vocab)
    return out


def sharded_worker(rank, world_size, dtype):
    group = dist.new_group(list(range(world_size)))
    return {case.name: _sharded_results(case, world_size, rank, group, dtype) for case in CASES}


def _reference_results(case, tp):
    teacher, student, targets, weights = make_logits(case, tp, torch.float64)
    vocab, k = case.vocab_size, case.k
    top_ids, top_lp = ref.vocab_parallel_topk(teacher, k, vocab)
    ids = torch.cat([targets[:, None], top_ids], -1)
    w_lp, w_h = _weights(weights, k)
    out = {"stats": ref.vocab_parallel_log_softmax_stats(student, vocab), "topk": (top_ids, top_lp)}
    out["token_stats"] = _grad_of(
        lambda x: ref.vocab_parallel_token_stats(x, ids, vocab), student, (w_lp, w_h)
    )
    out["token_stats_tail"] = _grad_of(
        lambda x: ref.vocab_parallel_token_stats_with_tail(x, ids, vocab, 1),
        student,
        (w_lp, w_h, w_h.flip(0)),
    )
    out["log_prob"] = _grad_of(lambda x: ref.vocab_parallel_log_prob(x, targets, vocab), student, (w_h,))
    out["entropy"] = _grad_of(lambda x: ref.vocab_parallel_entropy(x, vocab), student, (w_h,))
    for family in FKL_FAMILIES:
        out[f"fkl_{family}"] = _grad_of(
            lambda x, f=family: ref.vocab_parallel_topk_forward_kl(x, top_ids, top_lp, vocab, f),
            student,
            (w_h,),
        )
    out["jsd"] = _grad_of(
        lambda x: ref.vocab_parallel_jsd_teacher_term(x, top_ids, top_lp, vocab, 0.5), student, (w_h,)
    )
    out["agreement"] = ref.vocab_parallel_agreement_ratio(student, teacher, targets, vocab)
    return out


def _close(actual, expected, atol, what):
    torch.testing.assert_close(
        actual.to(torch.float64), expected.to(torch.float64), atol=atol, rtol=0, equal_nan=False, msg=what
    )


def _compare_case(case, per_rank, tp, dtype):
    expected = _reference_results(case, tp)
    atol = TOLERANCE[dtype]
    first = per_rank[0][case.name]
    for name, got in first.items():  # replicated outputs must be identical on every rank
        for other in per_rank[1:]:
            assert torch.equal(
                torch.as_tensor(_values(got)[0]), torch.as_tensor(_values(other[case.name][name])[0])
            )
    _close(first["stats"].max, expected["stats"][0], atol, f"{case.name} max")
    _close(first["stats"].lse, expected["stats"][1], atol, f"{case.name} lse")
    if dtype == torch.float64 or case.kind != "ties":  # fp32 rounding may reorder exactly tied logits
        assert torch.equal(first["topk"][0], expected["topk"][0]), f"{case.name}: top-k ids differ"
    _close(first["topk"][1], expected["topk"][1], atol, f"{case.name} top-k log-probs")
    _close(first["agreement"], expected["agreement"], atol, f"{case.name} agreement ratio")
    for name in (
        "token_stats_inplaceFalse",
        "token_stats_tail_inplaceFalse",
        "log_prob",
        "entropy",
        "jsd",
        *(f"fkl_{f}" for f in FKL_FAMILIES),
    ):
        values, _ = first[name]
        expected_values, expected_grad = expected[name.replace("_inplaceFalse", "")]
        for got, want in zip(values, expected_values, strict=True):
            _close(got, want, atol, f"{case.name} {name} value")
        grad = torch.cat([r[case.name][name][1] for r in per_rank], -1)
        _close(grad, expected_grad, atol, f"{case.name} {name} gradient")
    for op in ("token_stats", "token_stats_tail"):
        inplace = [r[case.name][f"{op}_inplaceTrue"][1] for r in per_rank]
        copied = [r[case.name][f"{op}_inplaceFalse"][1] for r in per_rank]
        assert torch.equal(torch.cat(inplace, -1), torch.cat(copied, -1)), f"{case.name} {op} in place"


def _values(result):
    if isinstance(result, vp.LogSoftmaxStats):
        return (result.lse,)
    if isinstance(result, tuple) and isinstance(result[0], tuple):
        return result[0]
    return result if isinstance(result, tuple) else (result,)


@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_sharded_ops_match_reference(tp, dtype):
    per_rank = run_on_ranks(sharded_worker, tp, dtype)
    for case in CASES:
        _compare_case(case, per_rank, tp, dtype)
