"""The paper's settings (``docs/method.md``, "Paper settings to ship as recipes") on 8 nodes x 8 GPUs.

Pure functions: each returns a fresh ``RunConfig`` and touches no file, environment variable or device.
Machine-specific paths are ``${VAR}`` placeholders that ``megatron_tropd.train`` resolves at launch:

- ``TROPD_RUN_DIR``    checkpoints, logs and reports of this run (shared storage)
- ``TROPD_DATA_DIR``   prompt files (OpenThoughts3 prompts, JSONL)
- ``TROPD_MODELS_DIR`` Megatron checkpoints from ``tools/convert.py import`` and the HF tokenizers

Hyper-parameters are the paper's "Benchmark Training" table, identical for every method: 200 steps, 128
prompts x 4 rollouts, max generation 8096, k = 64, beta = 0.001, constant LR 5e-6. The LR is 5e-6 for the
DeepSeek student too: paper.md §3 gives 5e-6 for all settings; the 1e-6 sometimes quoted is M2RL's OPD
script, not this paper. Adam (0.9, 0.98), wd 0.1, clip 1.0 and temperature 1.0 are method.md's decisions
where the paper is silent; they are ``RunConfig``'s defaults, so the recipes do not restate them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from megatron_tropd.config import (
    METHOD_NAMES,
    CheckpointConfig,
    DataConfig,
    MethodConfig,
    ParallelConfig,
    RunConfig,
    TeacherConfig,
)
from megatron_tropd.model_config import ModelConfig, qwen2_5_1_5b, qwen2_5_7b, qwen3_1_7b, qwen3_4b

NODES = 8
GPUS_PER_NODE = 8
WORLD_SIZE = NODES * GPUS_PER_NODE

# Qwen2.5 tokenizer (DeepSeek-R1-Distill-Qwen and Skywork-OR1 share it): every id it produces is < 151,936.
QWEN2_5_TRUE_VOCAB = 151936


def _layout() -> ParallelConfig:
    """Student TP2 (DP 32), teacher TP4 (DP 16): each fits an 80 GB GPU with 8k-token rollouts."""
    return ParallelConfig(student_tensor_parallel=2, teacher_tensor_parallel=4)


def _skywork_teacher() -> ModelConfig:
    """A Skywork-OR1(-Math)-7B teacher on the student's true vocabulary.

    The 7B checkpoints store 152,064 embedding rows, the 1.5B student 151,936: both are padded sizes of the
    same tokenizer, and no real token id reaches 151,936. Distillation compares the two distributions over
    the ids they share, so the teacher is declared with the student's 151,936 (``RunConfig.validate``
    requires equal true vocabularies); Megatron pads it back to a multiple of 128 x TP, which at TP 2 or 4
    is exactly 152,064, so the converted teacher checkpoint loads shape for shape. Its rows 151,936..152,063
    are padding and are masked with the rest of the padding.
    """
    return dataclasses.replace(qwen2_5_7b(), vocab_size=QWEN2_5_TRUE_VOCAB)


def _paths(student: str, teacher: str, prompts: str, tokenizer: str) -> tuple[DataConfig, CheckpointConfig]:
    data = DataConfig(
        train_prompts=f"${{TROPD_DATA_DIR}}/{prompts}", tokenizer=f"${{TROPD_MODELS_DIR}}/{tokenizer}"
    )
    checkpoint = CheckpointConfig(
        save_dir="${TROPD_RUN_DIR}",
        student_init=f"${{TROPD_MODELS_DIR}}/{student}",
        teacher=f"${{TROPD_MODELS_DIR}}/{teacher}",
    )
    return data, checkpoint


def deepseek_math(method: str = "tropd") -> RunConfig:
    """Setting 1: DeepSeek-R1-Distill-Qwen-1.5B <- Skywork-OR1-Math-7B on OpenThoughts3 math prompts."""
    data, checkpoint = _paths(
        student="deepseek-r1-distill-qwen-1.5b",
        teacher="skywork-or1-math-7b",
        prompts="openthoughts3_math.jsonl",
        tokenizer="deepseek-r1-distill-qwen-1.5b/hf",
    )
    return RunConfig(
        name=f"deepseek_math_{method}",
        student=qwen2_5_1_5b(),
        teacher=_skywork_teacher(),
        method=MethodConfig(name=method),
        parallel=_layout(),
        data=data,
        checkpoint=checkpoint,
    )


def deepseek_multi(method: str = "tropd") -> RunConfig:
    """Setting 2: DeepSeek-R1-Distill-Qwen-1.5B <- Skywork-OR1-7B on OpenThoughts3 math/code/science."""
    data, checkpoint = _paths(
        student="deepseek-r1-distill-qwen-1.5b",
        teacher="skywork-or1-7b",
        prompts="openthoughts3_multi.jsonl",
        tokenizer="deepseek-r1-distill-qwen-1.5b/hf",
    )
    return RunConfig(
        name=f"deepseek_multi_{method}",
        student=qwen2_5_1_5b(),
        teacher=_skywork_teacher(),
        method=MethodConfig(name=method),
        parallel=_layout(),
        data=data,
        checkpoint=checkpoint,
    )


def qwen3_multi(method: str = "tropd") -> RunConfig:
    """Setting 3: Qwen3-SFT-1.7B <- Qwen3-Nemotron-4B, multi-domain (both 151,936: one Qwen3 tokenizer)."""
    data, checkpoint = _paths(
        student="qwen3-sft-1.7b",
        teacher="qwen3-nemotron-4b",
        prompts="openthoughts3_multi.jsonl",
        tokenizer="qwen3-sft-1.7b/hf",
    )
    return RunConfig(
        name=f"qwen3_multi_{method}",
        student=qwen3_1_7b(),
        teacher=qwen3_4b(),
        method=MethodConfig(name=method),
        parallel=_layout(),
        data=data,
        checkpoint=checkpoint,
    )


def deepseek_multi_two_teachers(method: str = "tropd") -> RunConfig:
    """Setting 2 with one teacher per domain: math prompts to Skywork-OR1-Math-7B, code and science prompts
    to Skywork-OR1-7B (the paper scores every domain with Skywork-OR1-7B; this splits it, each teacher at
    TP4 beside the TP2 student). Prompts route by their ``domain`` field; those without one go to the
    code teacher."""
    config = deepseek_multi(method)
    models = "${TROPD_MODELS_DIR}"
    teachers = {
        "math": TeacherConfig(_skywork_teacher(), f"{models}/skywork-or1-math-7b", tensor_parallel=4),
        "code": TeacherConfig(
            _skywork_teacher(), f"{models}/skywork-or1-7b", tensor_parallel=4, domains=["science"]
        ),
    }
    data = dataclasses.replace(config.data, default_domain="code")
    checkpoint = dataclasses.replace(config.checkpoint, teacher="")
    return dataclasses.replace(
        config, name=f"deepseek_multi_two_teachers_{method}", teachers=teachers, data=data,
        checkpoint=checkpoint,
    )  # fmt: skip


def _bind(base: Callable[[str], RunConfig], method: str) -> Callable[[], RunConfig]:
    def recipe() -> RunConfig:
        return base(method)

    recipe.__name__ = f"{base.__name__}_{method}"
    recipe.__doc__ = f"{base.__doc__.splitlines()[0]} Method: {method}."
    return recipe


def paper_recipes() -> dict[str, Callable[[], RunConfig]]:
    """Every setting x every method of ``METHOD_NAMES``: ``deepseek_math_tropd``, ``qwen3_multi_opd``,
    ``deepseek_multi_two_teachers_tropd``.

    The math setting thereby has every row of the paper's Table 5 (``methods.TABLE5_METHODS``: OPD, Mask
    Outlier, Clip Outlier, stand-alone FKL, FKL Outlier, TrOPD Mask, TrOPD Clip, TrOPD). Recipes leave
    ``rollout.guidance`` at None, the method's own default (TrOPD family only), resolved at launch."""
    recipes: dict[str, Callable[[], RunConfig]] = {}
    for base in (deepseek_math, deepseek_multi, qwen3_multi, deepseek_multi_two_teachers):
        for method in METHOD_NAMES:
            recipes[f"{base.__name__}_{method}"] = _bind(base, method)
    return recipes
