"""Tiny CPU recipes for tests, CI and the demo: 4-layer 64-wide models, 2 gloo ranks, a few seconds a step.

``tiny_cpu`` runs TrOPD; ``tiny_cpu_<method>`` runs each method of ``METHOD_NAMES``. Both models are
``tiny()`` (random init, true vocabulary 300); the prompts are the package's pre-tokenized
``demo/tiny_prompts.jsonl`` (32 prompts of 4-12 token ids). TP1/PP1 on 2 ranks = data parallel 2, which
also fits a single process.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from megatron_tropd.config import (
    METHOD_NAMES,
    CheckpointConfig,
    DataConfig,
    EvalConfig,
    LoggingConfig,
    MethodConfig,
    OptimConfig,
    RolloutConfig,
    RunConfig,
)
from megatron_tropd.model_config import tiny

WORLD_SIZE = 2
# Where the package keeps its built-in prompt file (a path computation, no I/O).
TINY_PROMPTS = str(Path(__file__).resolve().parent.parent / "megatron_tropd" / "demo" / "tiny_prompts.jsonl")


def tiny_cpu(method: str = "tropd") -> RunConfig:
    """4 prompts x 2 rollouts of 16 tokens for 4 steps; checkpoints every 2 steps under ``runs/``."""
    return RunConfig(
        name=f"tiny_cpu_{method}",
        student=tiny(),
        teacher=tiny(),
        method=MethodConfig(name=method, topk=8, eopd_topk=4),
        optim=OptimConfig(lr=1e-3),  # random-init tiny models: a large LR so a few steps move the loss
        rollout=RolloutConfig(
            prompts_per_step=4, samples_per_prompt=2, max_prompt_length=32, max_new_tokens=16
        ),
        data=DataConfig(train_prompts=TINY_PROMPTS, chat_template="none"),
        checkpoint=CheckpointConfig(save_dir=f"runs/tiny_cpu_{method}", save_interval=2, keep_last=2),
        eval=EvalConfig(interval=0, max_new_tokens=16),
        logging=LoggingConfig(tensorboard=False),
        train_steps=4,
    )


def _bind(method: str) -> Callable[[], RunConfig]:
    def recipe() -> RunConfig:
        return tiny_cpu(method)

    recipe.__name__ = f"tiny_cpu_{method}"
    recipe.__doc__ = f"The tiny CPU recipe with method {method}."
    return recipe


def tiny_recipes() -> dict[str, Callable[[], RunConfig]]:
    """``tiny_cpu`` (TrOPD) and ``tiny_cpu_<method>`` for every method."""
    recipes: dict[str, Callable[[], RunConfig]] = {"tiny_cpu": tiny_cpu}
    recipes.update({f"tiny_cpu_{method}": _bind(method) for method in METHOD_NAMES})
    return recipes
