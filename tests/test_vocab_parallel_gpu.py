"""The fused (torch.compile) CUDA path of the vocab-parallel ops equals the dense reference (TP = 1)."""

from __future__ import annotations

import pytest
import torch

from megatron_tropd.ops import reference as ref
from megatron_tropd.ops import vocab_parallel as vp
from tests.vocab_cases import CASES, make_logits

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
@pytest.mark.parametrize("dtype,atol", [(torch.float64, 1e-10), (torch.float32, 2e-5)], ids=["fp64", "fp32"])
def test_cuda_token_stats_and_topk_match_reference(case, dtype, atol):
    teacher, student, targets, weights = (t.cuda() for t in make_logits(case, 1, dtype))
    ids, lp_teacher = vp.vocab_parallel_topk(teacher, case.k, None, case.vocab_size, chunk_tokens=4)
    want_ids, want_lp = ref.vocab_parallel_topk(teacher.double(), case.k, case.vocab_size)
    if dtype == torch.float64 or case.kind != "ties":
        assert torch.equal(ids, want_ids)
    torch.testing.assert_close(lp_teacher.double(), want_lp, atol=atol, rtol=0)
    all_ids = torch.cat([targets[:, None], ids], -1)
    leaf, dense = student.clone().requires_grad_(True), student.double().clone().requires_grad_(True)
    lp, entropy = vp.vocab_parallel_token_stats(leaf, all_ids, None, case.vocab_size, True, 4)
    want_lp_s, want_entropy = ref.vocab_parallel_token_stats(dense, all_ids, case.vocab_size)
    w_lp, w_h = weights[:, : case.k + 1], weights[:, case.k + 1]
    ((lp * w_lp).sum() + (entropy * w_h).sum()).backward()
    ((want_lp_s * w_lp.double()).sum() + (want_entropy * w_h.double()).sum()).backward()
    torch.testing.assert_close(lp.double(), want_lp_s, atol=atol, rtol=0)
    torch.testing.assert_close(entropy.double(), want_entropy, atol=atol, rtol=0)
    torch.testing.assert_close(leaf.grad.double(), dense.grad, atol=atol, rtol=0)
