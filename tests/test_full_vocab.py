"""ops/full_vocab.py equals the dense fp64 reference (ops/reference.py) in value and gradient on TP = 1, 2, 4
gloo processes, keeps no teacher logits beyond one chunk, and runs the teacher's matmul once per step.

Each rank computes the divergence from its slice of the student logits, the teacher's hidden states and
its own rows of the teacher's output weight (``teacher_output_weight_shard``); the parent concatenates
the per-rank gradient slices and compares them to the dense reference, which takes the teacher logits
``h_T @ W_T^T``. Tolerances: fp64 atol 1e-10 (the design's); fp32 against the fp64 reference atol 2e-5 on
the gradient and ``2e-5 + 1e-6 * |value|`` on the value and the log-sum-exps (the peaked case's reverse
KL is about 40, and fp32 rounds the inputs at about 6e-8 relative).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
import torch.distributed as dist

from megatron_tropd.memory import peak_cpu_tensor_bytes
from megatron_tropd.ops import full_vocab as fv
from megatron_tropd.ops import reference as ref
from megatron_tropd.ops.vocab_parallel import VocabShard, vocab_shard
from megatron_tropd.spawn import run_on_ranks
from tests.vocab_cases import TINY_TAIL_MASS, shard

VALUE_TOLERANCE = {torch.float64: (1e-10, 0.0), torch.float32: (2e-5, 1e-6)}  # (atol, rtol)
GRAD_TOLERANCE = {torch.float64: 1e-10, torch.float32: 2e-5}
# Chunked against unchunked: the same per-token sums, but the matmul's blocking may differ with the
# number of rows (measured: about 1e-15 in fp64, 2e-6 in fp32).
CHUNKING_TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-5}
DTYPES = (torch.float64, torch.float32)
DIVERGENCES = [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.5), ("jsd", 0.2)]
CHUNK_SIZES = (5, 7, None)  # 5 and 7 divide no case's token count; None: the default budget, one chunk here
PEAK_GAP = 40.0  # the peaked teacher's top logit over the rest: its other tokens hold about 1e-17


@dataclass(frozen=True)
class FullCase:
    name: str
    vocab_size: int  # true vocabulary, shared by both models
    extra_padding: int  # student's padded columns beyond the vocabulary (before rounding up to TP)
    teacher_padding: int  # teacher's padded rows beyond the vocabulary (independent of the student's)
    num_tokens: int
    hidden: int  # teacher hidden size (the identity-weight kinds use the vocabulary size)
    kind: str = "random"  # random | peaked_teacher | tiny_tail


CASES = [
    FullCase("random_vocab37", 37, 0, 0, 23, 8),
    FullCase("teacher_padded_larger", 29, 3, 19, 19, 8),
    FullCase("rank_without_real_columns", 5, 0, 3, 11, 4),  # TP 4: local 2, rank 3 holds ids [6, 8)
    FullCase("peaked_teacher", 31, 1, 2, 17, 31, "peaked_teacher"),
    FullCase("tiny_student_tail", 33, 3, 0, 13, 33, "tiny_tail"),
]


@dataclass
class Problem:
    student: torch.Tensor  # [T, V_padded] fp64, garbage in the padded columns
    hidden: torch.Tensor  # [T, H] teacher final hidden states
    weight: torch.Tensor  # [V + teacher_padding, H] teacher output weight, garbage in the padding rows
    teacher_logits: torch.Tensor  # [T, V] = hidden @ weight[:V]^T
    grad_weights: torch.Tensor  # [T] upstream gradient
    token_mask: torch.Tensor  # [T] bool
    ids: torch.Tensor  # [T, 3] ids for the teacher log-probs


def _teacher(case: FullCase, generator):
    """Teacher hidden states and output weight. The extreme kinds use the identity weight, so their hidden
    states are the teacher's logits and any distribution can be written."""
    vocab, tokens = case.vocab_size, case.num_tokens
    if case.kind == "random":
        hidden = torch.randn(tokens, case.hidden, generator=generator, dtype=torch.float64)
        weight = torch.randn(
            vocab + case.teacher_padding, case.hidden, generator=generator, dtype=torch.float64
        )
        return hidden, weight * 0.7
    hidden = torch.randn(tokens, vocab, generator=generator, dtype=torch.float64) * 2.0
    if case.kind == "peaked_teacher":
        top = torch.randint(0, vocab, (tokens,), generator=generator)
        hidden[torch.arange(tokens), top] += PEAK_GAP
    weight = torch.cat([torch.eye(vocab, dtype=torch.float64), torch.zeros(case.teacher_padding, vocab)])
    return hidden, weight


def _tiny_tail(student, teacher_logits, vocab: int, top: int = 4):
    """The student with mass ``TINY_TAIL_MASS`` outside the teacher's ``top`` tokens."""
    inside = torch.zeros_like(student, dtype=torch.bool)
    inside[:, :vocab] = inside[:, :vocab].scatter(-1, teacher_logits.topk(top, -1).indices, True)
    outside = ~inside & (torch.arange(student.shape[1]) < vocab)
    log_in = torch.logsumexp(student.masked_fill(~inside, -math.inf), -1, keepdim=True)
    log_out = torch.logsumexp(student.masked_fill(~outside, -math.inf), -1, keepdim=True)
    return torch.where(outside, student + log_in - log_out + math.log(TINY_TAIL_MASS), student)


def make_problem(case: FullCase, tp: int) -> Problem:
    generator = torch.Generator().manual_seed(sum(map(ord, case.name)))
    padded = -(-(case.vocab_size + case.extra_padding) // tp) * tp
    vocab, tokens = case.vocab_size, case.num_tokens
    hidden, weight = _teacher(case, generator)
    teacher_logits = hidden @ weight[:vocab].T
    student = torch.randn(tokens, padded, generator=generator, dtype=torch.float64) * 1.5
    if case.kind == "tiny_tail":
        student = _tiny_tail(student, teacher_logits, vocab)
    student[:, vocab:] = 50.0  # garbage in padded columns and rows must never leak into a result
    weight[vocab:] = 7.0
    token_mask = torch.rand(tokens, generator=generator) < 0.7
    token_mask[:2] = torch.tensor([True, False])
    grad_weights = torch.randn(tokens, generator=generator, dtype=torch.float64)
    ids = torch.randint(0, vocab, (tokens, 3), generator=generator)
    return Problem(student, hidden, weight, teacher_logits, grad_weights, token_mask, ids)


def _sharded_run(problem, rank, tp, group, vocab, dtype, kind, beta, chunk, mask, inplace):
    """Value, both log-sum-exps and this rank's gradient slice of ``sum(value * grad_weights)``."""
    leaf = shard(problem.student, rank, tp).to(dtype).clone().requires_grad_(True)
    student_shard = vocab_shard(leaf.shape[-1], group, vocab)
    weight = fv.teacher_output_weight_shard(problem.weight, student_shard, vocab, vocab, dtype)
    out = fv.vocab_parallel_full_divergence_with_stats(
        leaf, problem.hidden.to(dtype), weight, group, vocab, kind, beta, mask, chunk, inplace
    )
    (out.value * problem.grad_weights.to(dtype)).sum().backward()
    return out.value.detach(), out.teacher_lse, out.student_lse, leaf.grad


def _variants(problem):
    """``name -> (chunk_tokens, token_mask, inplace_backward)``; "unchunked" is one chunk larger than T."""
    variants = {f"chunk{chunk}": (chunk, None, False) for chunk in CHUNK_SIZES}
    variants["unchunked"] = (problem.student.shape[0] + 5, None, False)
    variants["masked"] = (4, problem.token_mask, False)
    variants["inplace"] = (7, None, True)
    return variants


def _case_results(case, rank, tp, group, dtype):
    problem = make_problem(case, tp)
    out = {}
    for kind, beta in DIVERGENCES:
        for name, (chunk, mask, inplace) in _variants(problem).items():
            out[(kind, beta, name)] = _sharded_run(
                problem, rank, tp, group, case.vocab_size, dtype, kind, beta, chunk, mask, inplace
            )
    student_shard = vocab_shard(shard(problem.student, rank, tp).shape[-1], group, case.vocab_size)
    weight = fv.teacher_output_weight_shard(
        problem.weight, student_shard, case.vocab_size, case.vocab_size, dtype
    )
    teacher_lse = out[("forward_kl", 0.5, "chunk5")][1]
    out["teacher_log_probs"] = fv.vocab_parallel_teacher_log_probs_at(
        problem.hidden.to(dtype), weight, problem.ids, teacher_lse, group, case.vocab_size, chunk_tokens=4
    )
    return out


def sharded_worker(rank, world_size):
    group = dist.new_group(list(range(world_size)))
    return {
        (case.name, dtype): _case_results(case, rank, world_size, group, dtype)
        for case in CASES
        for dtype in DTYPES
    }


def _reference(problem, vocab, kind, beta, mask):
    leaf = problem.student.clone().requires_grad_(True)
    value = ref.vocab_parallel_full_divergence(leaf, problem.teacher_logits, vocab, kind, beta, mask)
    (value * problem.grad_weights).sum().backward()
    return value.detach(), leaf.grad


def _close(actual, expected, atol, rtol, what):
    torch.testing.assert_close(actual.to(torch.float64), expected, atol=atol, rtol=rtol, msg=what)


def _check_variant(got, want, mask, dtype, what):
    value, teacher_lse, student_lse, grad = got
    want_value, want_grad, want_teacher_lse, want_student_lse = want
    atol, rtol = VALUE_TOLERANCE[dtype]
    _close(value, want_value, atol, rtol, f"{what} value")
    _close(grad, want_grad, GRAD_TOLERANCE[dtype], 0.0, f"{what} gradient")
    keep = torch.ones_like(want_value, dtype=torch.bool) if mask is None else mask
    _close(teacher_lse[keep], want_teacher_lse[keep], atol, rtol, f"{what} teacher lse")
    _close(student_lse[keep], want_student_lse[keep], atol, rtol, f"{what} student lse")
    if mask is not None:  # masked tokens are skipped: exact zeros, not small numbers
        assert torch.equal(value[~mask], torch.zeros_like(value[~mask])), what
        assert torch.equal(grad[~mask], torch.zeros_like(grad[~mask])), what


def _check_chunking(results, kind, beta, dtype, what):
    """Every chunking gives the unchunked value and gradient; the in-place gradient is the copied one."""

    def gathered(name):
        return results[0][(kind, beta, name)][0], torch.cat([r[(kind, beta, name)][3] for r in results], -1)

    unchunked_value, unchunked_grad = gathered("unchunked")
    for chunk in CHUNK_SIZES:
        value, grad = gathered(f"chunk{chunk}")
        _close(value, unchunked_value.double(), CHUNKING_TOLERANCE[dtype], 0.0, f"{what} chunk{chunk} value")
        _close(grad, unchunked_grad.double(), CHUNKING_TOLERANCE[dtype], 0.0, f"{what} chunk{chunk} gradient")
    assert torch.equal(gathered("inplace")[1], gathered("chunk7")[1]), f"{what}: in-place gradient differs"


def _check_case(case, per_rank, tp, dtype):
    problem = make_problem(case, tp)
    vocab = case.vocab_size
    results = [r[(case.name, dtype)] for r in per_rank]
    lse_pair = (torch.logsumexp(problem.teacher_logits, -1), torch.logsumexp(problem.student[:, :vocab], -1))
    for kind, beta in DIVERGENCES:
        references = {
            masked: _reference(problem, vocab, kind, beta, problem.token_mask if masked else None)
            for masked in (False, True)
        }
        for name, (_, mask, _) in _variants(problem).items():
            what = f"TP{tp} {dtype} {case.name} {kind}({beta}) {name}"
            key = (kind, beta, name)
            for other in results[1:]:  # replicated outputs are identical on every rank
                assert all(
                    torch.equal(a, b) for a, b in zip(results[0][key][:3], other[key][:3], strict=True)
                )
            got = (*results[0][key][:3], torch.cat([r[key][3] for r in results], -1))
            _check_variant(got, (*references[mask is not None], *lse_pair), mask, dtype, what)
        _check_chunking(results, kind, beta, dtype, f"TP{tp} {dtype} {case.name} {kind}({beta})")
    want_lp = ref.vocab_parallel_log_probs_at(problem.teacher_logits, problem.ids, vocab)
    atol, rtol = VALUE_TOLERANCE[dtype]
    _close(results[0]["teacher_log_probs"], want_lp, atol, rtol, f"TP{tp} {case.name} teacher log-probs")


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_full_divergences_match_reference(tp):
    """TP 1 runs in this process with ``tp_group=None`` (the no-collective path); TP 2 and 4 on gloo."""
    if tp == 1:
        per_rank = [{(c.name, d): _case_results(c, 0, 1, None, d) for c in CASES for d in DTYPES}]
    else:
        per_rank = run_on_ranks(sharded_worker, tp)
    for case in CASES:
        for dtype in DTYPES:
            _check_case(case, per_rank, tp, dtype)


def _memory_problem(num_tokens=512, vocab=96, hidden=8):
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(num_tokens, vocab, generator=generator, dtype=torch.float64).requires_grad_(True)
    teacher_hidden = torch.randn(num_tokens, hidden, generator=generator, dtype=torch.float64)
    teacher_weight = torch.randn(vocab, hidden, generator=generator, dtype=torch.float64)
    return logits, teacher_hidden, teacher_weight


def _saved_and_returned_gradient(kind, inplace):
    """Runs forward and backward under a ``saved_tensors_hooks`` recorder and a gradient hook on the
    logits. Returns the inputs, the saved tensors (the tensor objects) and the logits gradient the
    backward produced (before any accumulation into ``.grad``)."""
    logits, hidden, weight = _memory_problem()
    saved, returned = [], []

    def pack(tensor):
        saved.append(tensor)
        return tensor

    logits.register_hook(returned.append)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        value = fv.vocab_parallel_full_divergence(
            logits, hidden, weight, None, 96, kind, chunk_tokens=8, inplace_backward=inplace
        )
    value.sum().backward()
    return (logits, hidden, weight), saved, returned[0]


def _storage(tensor):
    return tensor.untyped_storage().data_ptr()


@pytest.mark.parametrize("kind", fv.FULL_DIVERGENCES)
def test_saves_only_the_gradient_beyond_per_token_statistics(kind):
    """With a gradient written by the forward, the one logits-sized tensor saved for backward is the
    gradient buffer, and it is exactly the tensor the backward returns as the logits' gradient; every
    other save is an input (no copy) or a per-token statistic of at most T values. Any teacher-derived
    ``[T, V]`` tensor kept for backward would be a second large save and fail."""
    inputs, saved, grad = _saved_and_returned_gradient(kind, inplace=False)
    logits = inputs[0]
    assert saved, "the hook sees the saves"
    input_storages = {_storage(t) for t in inputs}
    large = [t for t in saved if _storage(t) not in input_storages and t.numel() > logits.shape[0]]
    assert len(large) == 1, f"saved for backward beyond per-token statistics: {[t.shape for t in large]}"
    buffer = large[0]
    assert buffer.shape == logits.shape and buffer.dtype == logits.dtype
    assert _storage(buffer) == _storage(grad), "the saved buffer is not the gradient the backward returns"
    assert _storage(buffer) not in input_storages


@pytest.mark.parametrize("kind", fv.FULL_DIVERGENCES)
def test_inplace_backward_saves_no_teacher_logits(kind):
    """With ``inplace_backward`` everything saved is an input (no copy) or a per-token statistic, and the
    gradient is written into the logits' own storage."""
    inputs, saved, grad = _saved_and_returned_gradient(kind, inplace=True)
    logits = inputs[0]
    input_storages = {_storage(t) for t in inputs}
    assert any(_storage(t) == _storage(logits) for t in saved)  # the hook sees the saves
    too_large = [t.shape for t in saved if _storage(t) not in input_storages and t.numel() > logits.shape[0]]
    assert not too_large, f"saved for backward beyond per-token statistics: {too_large}"
    assert _storage(grad) == _storage(logits)


@pytest.mark.parametrize("inplace", [True, False])
@pytest.mark.parametrize("kind", fv.FULL_DIVERGENCES)
def test_backward_runs_no_teacher_matmul(kind, inplace, monkeypatch):
    """The teacher's logits are formed once per chunk in the forward, and never in the backward unless
    ``inplace_backward`` asks for the gradient in the logits' storage (then once more per chunk)."""
    logits, hidden, weight = _memory_problem()
    calls = []
    teacher_logits = fv._teacher_logits

    def counted(hidden_rows, weight_valid):
        calls.append(hidden_rows.shape[0])
        return teacher_logits(hidden_rows, weight_valid)

    monkeypatch.setattr(fv, "_teacher_logits", counted)
    value = fv.vocab_parallel_full_divergence(
        logits, hidden, weight, None, 96, kind, chunk_tokens=8, inplace_backward=inplace
    )
    num_chunks = -(-logits.shape[0] // 8)
    assert len(calls) == num_chunks and sum(calls) == logits.shape[0]
    value.sum().backward()
    assert len(calls) == (2 if inplace else 1) * num_chunks


@pytest.mark.parametrize("kind", fv.FULL_DIVERGENCES)
def test_no_gradient_buffer_without_a_gradient(kind):
    """Under ``torch.no_grad()``, and for logits that do not require grad, the forward allocates less
    than half of one ``[T, V]`` tensor, while with a gradient it holds the gradient buffer (so the
    instrument would see one)."""
    logits, hidden, weight = _memory_problem()
    full_bytes = logits.numel() * logits.element_size()
    kept = []

    def forward(leaf):
        kept.append(fv.vocab_parallel_full_divergence(leaf, hidden, weight, None, 96, kind, chunk_tokens=8))

    with torch.no_grad():
        assert peak_cpu_tensor_bytes(lambda: forward(logits)) < full_bytes / 2
    assert peak_cpu_tensor_bytes(lambda: forward(logits.detach())) < full_bytes / 2
    assert peak_cpu_tensor_bytes(lambda: forward(logits)) >= full_bytes  # kept alive by the graph
    assert kept[-1].requires_grad and not kept[0].requires_grad


@pytest.mark.parametrize("inplace", [True, False])
@pytest.mark.parametrize("kind", fv.FULL_DIVERGENCES)
def test_peak_memory_stays_at_chunk_scale(kind, inplace):
    """Beyond the gradient of the logits (a buffer the forward fills unless ``inplace_backward``), the
    forward allocates less than half of one teacher-logits tensor ``[T, V]``, and forward plus backward
    no more: a teacher-logits tensor of the whole batch, even briefly, fails."""
    logits, hidden, weight = _memory_problem()
    full_bytes = logits.numel() * logits.element_size()
    gradient_bytes = 0 if inplace else full_bytes

    def forward():
        return fv.vocab_parallel_full_divergence(
            logits, hidden, weight, None, 96, kind, chunk_tokens=8, inplace_backward=inplace
        )

    def dense_step():
        value = ref.vocab_parallel_full_divergence(logits, hidden @ weight.T, 96, kind)
        torch.autograd.grad(value.sum(), logits)

    assert peak_cpu_tensor_bytes(dense_step) > 2 * full_bytes  # the instrument sees [T, V] temporaries
    with torch.no_grad():
        assert peak_cpu_tensor_bytes(forward) < full_bytes / 2
    assert peak_cpu_tensor_bytes(forward) < gradient_bytes + full_bytes / 2
    assert (
        peak_cpu_tensor_bytes(lambda: torch.autograd.grad(forward().sum(), logits))
        < gradient_bytes + full_bytes / 2
    )


def test_weight_shard_slices_the_true_vocabulary():
    """Teacher padded vocabulary larger (tied embedding of 56 rows) or exactly the true one, student padded
    to 40 over TP 4: each rank gets its rows, zeros in the student's padded columns, pads never read."""
    vocab, hidden = 37, 5
    generator = torch.Generator().manual_seed(5)
    for teacher_rows in (vocab + 19, vocab):
        weight = torch.randn(teacher_rows, hidden, generator=generator, dtype=torch.float64)
        weight[vocab:] = float("nan")
        shards = [
            fv.teacher_output_weight_shard(
                weight, VocabShard(10 * r, 10, min(10, vocab - 10 * r)), vocab, vocab
            )
            for r in range(4)
        ]
        assert all(s.shape == (10, hidden) and s.dtype == torch.float32 for s in shards)
        stacked = torch.cat(shards)
        assert torch.equal(stacked[:vocab], weight[:vocab].float())
        assert torch.equal(stacked[vocab:], torch.zeros(40 - vocab, hidden))
    bf16 = fv.teacher_output_weight_shard(weight, VocabShard(0, 10, 10), vocab, vocab, torch.bfloat16)
    assert bf16.dtype == torch.bfloat16


def test_bad_inputs_raise_clear_errors():
    logits, hidden, weight = _memory_problem(num_tokens=6, vocab=10, hidden=3)
    with pytest.raises(ValueError, match="different tokenizers"):
        fv.teacher_output_weight_shard(weight, VocabShard(0, 10, 10), 10, 12)
    with pytest.raises(ValueError, match="full output weight"):
        fv.teacher_output_weight_shard(weight[:8], VocabShard(0, 10, 10), 10, 10)
    with pytest.raises(ValueError, match="vocab_shard"):
        fv.teacher_output_weight_shard(weight, VocabShard(0, 10, 7), 10, 10)
    with pytest.raises(ValueError, match="unknown full-vocabulary divergence"):
        fv.vocab_parallel_full_divergence(logits, hidden, weight, None, 10, "tvd")
    for beta in (0.0, 1.0):
        with pytest.raises(ValueError, match="identically 0"):
            fv.vocab_parallel_full_divergence(logits, hidden, weight, None, 10, "jsd", beta)
    with pytest.raises(ValueError, match="teacher_output_weight_shard"):
        fv.vocab_parallel_full_divergence(logits, hidden, weight[:9], None, 10)
    with pytest.raises(ValueError, match="token dims"):
        fv.vocab_parallel_full_divergence(logits, hidden[:5], weight, None, 10)
    with pytest.raises(ValueError, match="token_mask"):
        fv.vocab_parallel_full_divergence(logits, hidden, weight, None, 10, token_mask=torch.ones(6))
    with pytest.raises(ValueError, match="vocab_size"):
        fv.vocab_parallel_full_divergence(logits, hidden, weight, None, 11)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_cuda_fused_path_matches_reference(case):
    """The torch.compile chunk kernels on CUDA (TP 1, fp32) against the fp64 reference."""
    problem = make_problem(case, 1)
    vocab = case.vocab_size
    weight = fv.teacher_output_weight_shard(
        problem.weight, VocabShard(0, problem.student.shape[1], vocab), vocab, vocab
    ).cuda()
    for kind, beta in DIVERGENCES:
        leaf = problem.student.float().cuda().requires_grad_(True)
        value = fv.vocab_parallel_full_divergence(
            leaf, problem.hidden.float().cuda(), weight, None, vocab, kind, beta, chunk_tokens=3
        )
        (value * problem.grad_weights.float().cuda()).sum().backward()
        want_value, want_grad = _reference(problem, vocab, kind, beta, None)
        _close(value.cpu(), want_value, *VALUE_TOLERANCE[torch.float32], f"cuda {case.name} {kind} value")
        _close(
            leaf.grad.cpu(), want_grad, GRAD_TOLERANCE[torch.float32], 0.0, f"cuda {case.name} {kind} grad"
        )


ALSO_CASES = [CASES[0], CASES[2]]  # random; one with a TP-4 rank without real columns (TP 2 here: none)


def _also_results(case, rank, tp, group):
    """Per main kind: (value, gradient slice, also values) with ``also`` = the other kinds, and the same
    from separate calls, masked and chunked, fp32."""
    problem, vocab, dtype = make_problem(case, tp), case.vocab_size, torch.float32
    student = shard(problem.student, rank, tp).to(dtype)
    weight = fv.teacher_output_weight_shard(
        problem.weight, vocab_shard(student.shape[-1], group, vocab), vocab, vocab, dtype
    )
    hidden, grad_weights = problem.hidden.to(dtype), problem.grad_weights.to(dtype)

    def call(kind, also=()):
        leaf = student.clone().requires_grad_(True)
        out = fv.vocab_parallel_full_divergence_with_stats(
            leaf, hidden, weight, group, vocab, kind, 0.3, problem.token_mask, 4, also=also
        )
        (out.value * grad_weights).sum().backward()
        return out.value.detach(), leaf.grad, out.also

    out = {}
    for kind in fv.FULL_DIVERGENCES:
        others = tuple(other for other in fv.FULL_DIVERGENCES if other != kind)
        out[kind] = {"fused": call(kind, (*others, kind)), "alone": call(kind)}
        out[kind]["separate"] = {other: call(other)[0] for other in others}
    return out


def also_worker(rank, world_size):
    group = dist.new_group(list(range(world_size)))
    return {case.name: _also_results(case, rank, world_size, group) for case in ALSO_CASES}


@pytest.mark.parametrize("tp", [1, 2])
def test_also_kinds_equal_separate_calls_bit_for_bit(tp):
    """Kinds computed beside the main one in its pass are exactly the values of their own calls, and the
    main value and gradient are exactly those of a call without them (the same kernels on the same
    chunk log-probs; each element TP-summed once either way)."""
    if tp == 1:
        per_rank = [{case.name: _also_results(case, 0, 1, None) for case in ALSO_CASES}]
    else:
        per_rank = run_on_ranks(also_worker, tp)
    for results in per_rank:
        for case in ALSO_CASES:
            for kind, got in results[case.name].items():
                value, grad, also = got["fused"]
                want_value, want_grad, want_also = got["alone"]
                assert want_also == {}
                assert torch.equal(value, want_value) and torch.equal(grad, want_grad), (case.name, kind)
                assert set(also) == set(fv.FULL_DIVERGENCES), (case.name, kind)
                assert torch.equal(also[kind], value), "a main kind also asked for is the main value"
                for other, separate in got["separate"].items():
                    assert torch.equal(also[other], separate), (tp, case.name, kind, other)
                    assert not also[other].requires_grad


def test_also_kinds_share_the_teacher_matmul_pass(monkeypatch):
    """Three kinds in one call form each chunk's teacher logits once."""
    logits, hidden, weight = _memory_problem()
    calls = []
    teacher_logits = fv._teacher_logits

    def counted(hidden_rows, weight_valid):
        calls.append(hidden_rows.shape[0])
        return teacher_logits(hidden_rows, weight_valid)

    monkeypatch.setattr(fv, "_teacher_logits", counted)
    out = fv.vocab_parallel_full_divergence_with_stats(
        logits, hidden, weight, None, 96, "reverse_kl", chunk_tokens=8, also=("forward_kl", "jsd")
    )
    out.value.sum().backward()
    assert len(calls) == -(-logits.shape[0] // 8) and sum(calls) == logits.shape[0]
    assert set(out.also) == {"forward_kl", "jsd"}


def test_forward_kl_kernel_with_gradient_is_the_two_kernels():
    """The forward KL's one-buffer kernel returns exactly the terms and gradient kernels' results."""
    generator = torch.Generator().manual_seed(3)
    z_student, z_teacher = torch.randn(2, 6, 50, generator=generator) * 3
    lse_student = torch.logsumexp(z_student, -1)
    lp_teacher = fv._log_probs(z_teacher, torch.logsumexp(z_teacher, -1))
    part, grad = fv._forward_kl_terms_and_grad(lp_teacher, z_student, lse_student)
    terms = fv._forward_kl_terms(lp_teacher, z_student, lse_student, 0.5)
    want_grad = fv._forward_kl_grad(lp_teacher, z_student, lse_student, None, 0.5)
    assert torch.equal(part, terms[:, 0]) and torch.equal(grad, want_grad)


def test_unknown_also_kind_is_a_clear_error():
    logits, hidden, weight = _memory_problem(num_tokens=4)
    with pytest.raises(ValueError, match="unknown full-vocabulary divergence 'tvd'"):
        fv.vocab_parallel_full_divergence_with_stats(logits, hidden, weight, None, 96, also=("tvd",))


TWO_TEACHERS = FullCase("two_teachers", 37, 3, 0, 29, 8)  # teacher 1 is 5 wide, teacher 0 8 wide
TWO_TEACHER_WIDTHS = (8, 5)


def _two_teacher_problem(tp: int):
    """The student and two teachers of different widths; each token's teacher index (-1: none) and the
    teacher logits its own teacher gives it ``[T, V]``."""
    problem = make_problem(TWO_TEACHERS, tp)
    generator = torch.Generator().manual_seed(11)
    vocab, tokens = TWO_TEACHERS.vocab_size, TWO_TEACHERS.num_tokens
    weights = [problem.weight, torch.randn(vocab, 5, generator=generator, dtype=torch.float64) * 0.7]
    index = torch.randint(-1, 2, (tokens,), generator=generator)
    index[:3] = torch.tensor([0, 1, -1])
    hidden = problem.hidden.clone()
    hidden[index == 1, 5:] = 99.0  # beyond teacher 1's width: must never be read
    logits = torch.stack(
        [hidden[t, : TWO_TEACHER_WIDTHS[max(int(i), 0)]] @ weights[max(int(i), 0)][:vocab].T
         for t, i in enumerate(index)]
    )  # fmt: skip
    return problem, weights, hidden, index, logits


def _two_teacher_results(rank, tp, group):
    problem, weights, hidden, index, _ = _two_teacher_problem(tp)
    vocab, out = TWO_TEACHERS.vocab_size, {}
    leaf_base = shard(problem.student, rank, tp)
    student_shard = vocab_shard(leaf_base.shape[-1], group, vocab)
    shards = [fv.teacher_output_weight_shard(w, student_shard, vocab, vocab, torch.float64) for w in weights]
    for kind, beta in DIVERGENCES:
        for mask in (None, problem.token_mask):
            for inplace in (False, True):
                leaf = leaf_base.clone().requires_grad_(True)
                value = fv.vocab_parallel_full_divergence_with_stats(
                    leaf, hidden, shards, group, vocab, kind, beta, mask, 4, inplace, teacher_index=index
                ).value
                (value * problem.grad_weights).sum().backward()
                out[(kind, beta, mask is None, inplace)] = (value.detach(), leaf.grad)
    return out


def two_teacher_worker(rank, world_size):
    return _two_teacher_results(rank, world_size, dist.new_group(list(range(world_size))))


@pytest.mark.parametrize("tp", [1, 2])
def test_two_teachers_in_one_pass_match_the_reference(tp):
    """Each token's divergence against its own teacher (of its own width; none for index -1) equals the
    fp64 single-device reference in value and gradient, with one gradient buffer for both teachers."""
    per_rank = [_two_teacher_results(0, 1, None)] if tp == 1 else run_on_ranks(two_teacher_worker, tp)
    problem, _, _, index, teacher_logits = _two_teacher_problem(tp)
    vocab = TWO_TEACHERS.vocab_size
    for (kind, beta, unmasked, inplace), (value, _) in per_rank[0].items():
        mask = (index >= 0) & (True if unmasked else problem.token_mask)
        leaf = problem.student.clone().requires_grad_(True)
        want = ref.vocab_parallel_full_divergence(leaf, teacher_logits, vocab, kind, beta, mask)
        (want * problem.grad_weights).sum().backward()
        grad = torch.cat([r[(kind, beta, unmasked, inplace)][1] for r in per_rank], -1)
        what = f"TP{tp} {kind}({beta}) unmasked={unmasked} inplace={inplace}"
        _close(value, want.detach(), 1e-10, 0.0, f"{what} value")
        _close(grad, leaf.grad, 1e-10, 0.0, f"{what} gradient")
        assert torch.equal(value[~mask], torch.zeros_like(value[~mask])), what


def test_several_teachers_need_their_index_and_fitting_weights():
    logits, hidden, weight = _memory_problem(num_tokens=4)
    with pytest.raises(ValueError, match="2 teacher weights need teacher_index"):
        fv.vocab_parallel_full_divergence(logits, hidden, [weight, weight], None, 96)
    with pytest.raises(
        ValueError, match=r"must be this rank's vocabulary partition \[V_local, H_t\] = \[96, <= 8\]"
    ):
        fv.vocab_parallel_full_divergence_with_stats(
            logits,
            hidden,
            [weight, torch.zeros(96, 9)],
            None,
            96,
            teacher_index=torch.zeros(4, dtype=torch.int64),
        )
