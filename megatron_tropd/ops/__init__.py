"""Distillation ops: the vocab-parallel extension, its single-device reference, divergences, trust draw."""

from .divergence import FKL_FAMILIES, agreement_ratio, jsd_topk_teacher_term, topk_forward_kl, topk_mass
from .full_vocab import (
    FULL_DIVERGENCES,
    FullDivergence,
    teacher_output_weight_shard,
    vocab_parallel_full_divergence,
    vocab_parallel_full_divergence_with_stats,
    vocab_parallel_teacher_log_probs_at,
)
from .trust import draw_trust_mask, trust_uniform
from .vocab_parallel import (
    LogSoftmaxStats,
    VocabShard,
    vocab_parallel_agreement_ratio,
    vocab_parallel_entropy,
    vocab_parallel_jsd_teacher_term,
    vocab_parallel_log_prob,
    vocab_parallel_log_probs_at,
    vocab_parallel_log_softmax_stats,
    vocab_parallel_token_stats,
    vocab_parallel_topk,
    vocab_parallel_topk_forward_kl,
    vocab_shard,
)

__all__ = [
    "FKL_FAMILIES",
    "FULL_DIVERGENCES",
    "FullDivergence",
    "LogSoftmaxStats",
    "VocabShard",
    "agreement_ratio",
    "draw_trust_mask",
    "jsd_topk_teacher_term",
    "teacher_output_weight_shard",
    "topk_forward_kl",
    "topk_mass",
    "trust_uniform",
    "vocab_parallel_agreement_ratio",
    "vocab_parallel_entropy",
    "vocab_parallel_full_divergence",
    "vocab_parallel_full_divergence_with_stats",
    "vocab_parallel_jsd_teacher_term",
    "vocab_parallel_log_prob",
    "vocab_parallel_log_probs_at",
    "vocab_parallel_log_softmax_stats",
    "vocab_parallel_teacher_log_probs_at",
    "vocab_parallel_token_stats",
    "vocab_parallel_topk",
    "vocab_parallel_topk_forward_kl",
    "vocab_shard",
]
