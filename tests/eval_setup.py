"""Shared set-up of the checkpoint-evaluation tests: a tiny sentencepiece tokenizer and a saved tiny model."""

from __future__ import annotations

import io
from pathlib import Path

MODEL_SEED = 7


def train_tokenizer(path: Path) -> str:
    """A 64-piece BPE sentencepiece model (the tiny model is built with the same vocabulary)."""
    import sentencepiece

    text = [f"what is {a} plus {b}? the answer is {a + b}." for a in range(30) for b in range(30)]
    text += ["tell me a story about a cat.", "write a poem about the sea.", "the capital of france is paris."]
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(text), model_writer=model, vocab_size=64, model_type="bpe"
    )
    path.write_bytes(model.getvalue())
    return str(path)


def build_tiny_model(tensor_parallel: int = 1, pipeline_parallel: int = 1):
    """``(model, groups, model_config)``: the seeded tiny qwen2 model on a fresh TP x PP topology."""
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from megatron_tropd.models import build_gpt_model, tiny
    from megatron_tropd.runtime import enable_cpu_mode
    from megatron_tropd.topology import ParallelLayout, build_topology

    enable_cpu_mode()
    layout = ParallelLayout(tensor_parallel, pipeline_parallel)
    groups = build_topology(layout, layout).student
    model_parallel_cuda_manual_seed(0)
    config = tiny("qwen2", vocab_size=64)  # the tokenizer's vocabulary: every sampled id decodes
    model = build_gpt_model(
        config, groups.pg_collection, pre_process=groups.is_first_stage, post_process=groups.is_last_stage,
        tensor_parallel_size=tensor_parallel, pipeline_parallel_size=pipeline_parallel, seed=MODEL_SEED,
    )  # fmt: skip
    return model.eval(), groups, config
