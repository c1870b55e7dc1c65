"""On a GPU: packed scoring (THD ``PackedSeqParams``, Transformer-Engine attention when installed) gives
the padded path's signals, in bf16, on one process."""

from __future__ import annotations

import pytest
import torch

from megatron_tropd.spawn import run_on_ranks

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def packed_gpu_worker(rank, world_size):
    from megatron_tropd.models import tiny
    from megatron_tropd.placed import place_model
    from megatron_tropd.runtime import start
    from megatron_tropd.scoring import forward_signals, student_signal_fn
    from megatron_tropd.topology import ParallelLayout
    from tests.test_packing import LENGTHS, heavy_tailed_batch

    groups = start(ParallelLayout(1, 1), seed=3).student
    config = tiny("qwen3", hidden_size=128, num_attention_heads=4, num_query_groups=2, head_dim=32)
    model = place_model(config, groups, seed=4, params_dtype=torch.bfloat16)
    batch = heavy_tailed_batch().to(torch.device("cuda"))
    signal_fn = student_signal_fn(None, config.vocab_size)
    padded = forward_signals(model, batch.tokens, 2, signal_fn)
    packed = forward_signals(model, batch.tokens, 2, signal_fn, lengths=LENGTHS, max_tokens=32)
    return [
        (padded[name][row, :length].float().cpu(), packed[name][row, :length].float().cpu())
        for row, length in enumerate(LENGTHS)
        for name in ("lp_student_old", "entropy_student_old")
    ]


def test_packed_signals_equal_padded_on_gpu():
    pairs = run_on_ranks(packed_gpu_worker, 1, backend="nccl")[0]
    for want, got in pairs:
        torch.testing.assert_close(got, want, atol=5e-2, rtol=2e-2)  # bf16 activations
