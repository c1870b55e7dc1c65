"""Rollout generation behind one Protocol (``engine.py``) and the Megatron KV-cache engine
(``megatron_engine.py``), with continuous batching over slots (``slots.py``) by default.

``megatron_engine`` imports Megatron-Core lazily, so the interface can be imported without it.
"""

from megatron_tropd.rollout.engine import (
    GenerationEngine,
    GenerationRequest,
    GenerationResult,
    SamplingParams,
    to_rollout_batch,
)

__all__ = ["GenerationEngine", "GenerationRequest", "GenerationResult", "SamplingParams", "to_rollout_batch"]
