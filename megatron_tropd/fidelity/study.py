"""The fidelity study: every Table 5 method on the fidelity task, several seeds, the same budget.

Per seed: a word-level tokenizer, prompts and a held-out benchmark; a teacher and a smaller student trained
by SFT on their writers (``demo.pretrain``, data parallel on 2 CPU ranks); the regime's own figures measured
on the student's samples (``probe``); then each method distils that same student through the package's loop
(``trainer.run``) with identical prompts, seeds and budget; at the end each final student is probed again.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from megatron_tropd.config import (
    CheckpointConfig,
    DataConfig,
    EvalConfig,
    EvalSettings,
    LoggingConfig,
    MethodConfig,
    OptimConfig,
    RolloutConfig,
    RunConfig,
)
from megatron_tropd.demo.prepare import write_heldout, write_prompts
from megatron_tropd.demo.pretrain import HeldOutEvaluation, PretrainSpec
from megatron_tropd.demo.run import DemoFiles, distill_worker, model_pair
from megatron_tropd.fidelity import task
from megatron_tropd.model_config import ModelConfig

logger = logging.getLogger("megatron_tropd.fidelity")

WORLD_SIZE = 2
VOCAB_SIZE = task.TOKENS
TOPK = 64  # k / V = 1 / 64
UNK, EOS = "<unk>", "</s>"
# The paper's Table 5 rows, in its order. Guidance is set explicitly for every method (never a default):
# on for the TrOPD rows only; "fkl_outlier" is TrOPD's loss without guidance.
METHODS = ("opd", "mask_outlier", "clip_outlier", "fkl", "fkl_outlier", "tropd_mask", "tropd_clip", "tropd")
GUIDED = frozenset({"tropd_mask", "tropd_clip", "tropd"})
EVAL_TEMPERATURE = 0.6
PROMPT_TOKENS = 12  # every prompt is 9 tokens ("Q:", start, 3 x (marker, operation), "A:")


@dataclass(frozen=True)
class StudySize:
    """Every knob that differs between the full study and ``--quick``."""

    teacher_steps: int
    student_steps: int
    sft_batch: int
    distill_steps: int
    eval_interval: int
    heldout: int
    k: int
    prompts_per_step: int
    samples_per_prompt: int
    response_tokens: int
    probe_prompts: int
    # SFT steps on short reflections (the curriculum), then the rest on the long writer. The teacher
    # needs many long steps: it learns to carry the answer across the reflection only there (seed 1,
    # 490 short steps: 31% held-out after 210 long steps, 5% after 1,200 short + 210 long, 91% after 510
    # long).
    teacher_curriculum_steps: int
    student_curriculum_steps: int

    def __post_init__(self):
        for name in ("teacher", "student"):
            short, steps = getattr(self, f"{name}_curriculum_steps"), getattr(self, f"{name}_steps")
            if not 0 <= short < steps:
                raise ValueError(
                    f"{name}_curriculum_steps = {short} must lie in [0, {name}_steps = {steps}): the SFT "
                    "has to end on the long writer"
                )


FULL = StudySize(
    teacher_steps=1000, student_steps=500, sft_batch=32, distill_steps=16, eval_interval=16, heldout=64, k=2,
    prompts_per_step=8, samples_per_prompt=4, response_tokens=256, probe_prompts=32,
    teacher_curriculum_steps=490, student_curriculum_steps=350,
)  # fmt: skip
QUICK = StudySize(
    teacher_steps=3, student_steps=3, sft_batch=4, distill_steps=1, eval_interval=1, heldout=2, k=1,
    prompts_per_step=2, samples_per_prompt=1, response_tokens=24, probe_prompts=2,
    teacher_curriculum_steps=1, student_curriculum_steps=1,
)  # fmt: skip


def model_configs(size: StudySize) -> tuple[ModelConfig, ModelConfig]:
    """The demo's (teacher, student) shapes over this task's vocabulary and trace length."""
    return model_pair(VOCAB_SIZE, PROMPT_TOKENS + size.response_tokens + 8)


def write_tokenizer(directory: Path) -> Path:
    """A word-level tokenizer over the task's words (``tokenizer.json`` + ``tokenizer_config.json``):
    one token per whitespace-separated word, exactly ``VOCAB_SIZE`` ids, decoding joins with spaces."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = [UNK, EOS, *task.vocabulary()]
    if len(words) != VOCAB_SIZE:
        raise ValueError(f"the task has {len(words)} words, not {VOCAB_SIZE}: adjust task.WORDS")
    tokenizer = Tokenizer(models.WordLevel({word: i for i, word in enumerate(words)}, unk_token=UNK))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(directory / "tokenizer.json"))
    config = {"eos_token": EOS, "unk_token": UNK, "tokenizer_class": "PreTrainedTokenizerFast"}
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return directory


def prepare_data(root: Path, size: StudySize, seed: int) -> DemoFiles:
    """Tokenizer, held-out benchmark and distillation prompts (held-out prompts excluded from training)."""
    root.mkdir(parents=True, exist_ok=True)
    heldout = task.problems(seed, size.heldout)
    train = task.problems(seed + 1, 2000, exclude={p.prompt for p in heldout})
    models = root / "models"
    return DemoFiles(
        root=root, tokenizer=write_tokenizer(root / "tokenizer"),
        prompts=write_prompts(root / "prompts.jsonl", train),
        heldout=write_heldout(root / "heldout", heldout),
        teacher=models / "teacher", student=models / "student",
    )  # fmt: skip


def _rows_per_rank(size: StudySize) -> int:
    return size.prompts_per_step * size.samples_per_prompt // WORLD_SIZE


def eval_settings(files: DemoFiles, size: StudySize, seed: int) -> HeldOutEvaluation:
    settings = EvalSettings(
        samples_per_prompt=size.k, temperature=EVAL_TEMPERATURE, max_new_tokens=size.response_tokens,
        raw_prompts=True,
    )  # fmt: skip
    return HeldOutEvaluation(str(files.heldout), settings, max_batch_size=_rows_per_rank(size), seed=seed)


def pretrain_specs(size: StudySize, seed: int) -> list[PretrainSpec]:
    """The teacher learns its writer (every step, Zipf words); the student the writer with habits. Both
    start on short reflections (``*_curriculum_steps``), where the chain is half the loss."""
    teacher, student = model_configs(size)
    common = dict(batch_size=size.sft_batch, lr=3e-3, problem_maker=task.make_problem)
    specs = []
    for name, model, steps, short_steps, offset, writer in (
        ("teacher", teacher, size.teacher_steps, size.teacher_curriculum_steps, 0, task.TEACHER_WRITER),
        ("student", student, size.student_steps, size.student_curriculum_steps, 1, task.STUDENT_WRITER),
    ):
        curriculum = dict(curriculum_writer=writer.short(), curriculum_steps=short_steps)
        specs.append(
            PretrainSpec(name, model, steps, seed=seed + offset, writer=writer, **common, **curriculum)
        )
    return specs


def distill_config(method: str, files: DemoFiles, size: StudySize, seed: int) -> RunConfig:
    """One method's run: identical for every method except its loss and (explicitly) its guidance."""
    teacher, student = model_configs(size)
    return RunConfig(
        name=f"fidelity_{method}", student=student, teacher=teacher,
        method=MethodConfig(name=method, topk=TOPK),
        optim=OptimConfig(lr=5e-4, micro_batch_size=_rows_per_rank(size)),
        rollout=RolloutConfig(
            prompts_per_step=size.prompts_per_step, samples_per_prompt=size.samples_per_prompt,
            max_prompt_length=PROMPT_TOKENS, max_new_tokens=size.response_tokens,
            guidance=method in GUIDED, seed=seed,
        ),
        data=DataConfig(
            train_prompts=str(files.prompts), tokenizer=str(files.tokenizer), chat_template="none"
        ),
        checkpoint=CheckpointConfig(
            save_dir=str(files.run_dir(method)), save_interval=size.distill_steps, keep_last=1,
            student_init=str(files.student), teacher=str(files.teacher), resume="never",
        ),
        eval=EvalConfig(
            interval=size.eval_interval, benchmarks=str(files.heldout), samples_per_prompt=size.k,
            temperature=EVAL_TEMPERATURE, max_new_tokens=size.response_tokens, raw_prompts=True,
            at_start=False,  # every method starts from the same student, scored once after its SFT
        ),
        logging=LoggingConfig(tensorboard=False),
        train_steps=size.distill_steps, seed=seed,
    )  # fmt: skip


def teacher_writer_length(tokenizer_dir: Path, seed: int, count: int = 200) -> float:
    """Mean length in tokens (with EOS) of the teacher writer's responses: the task's trace length."""
    import random

    from megatron_tropd.data import Tokenizer

    tokenizer, rng = Tokenizer(str(tokenizer_dir)), random.Random(seed)
    texts = [task.TEACHER_WRITER(task.make_problem(rng), rng) for _ in range(count)]
    lengths = [len(tokenizer.encode(text)) + 1 for text in texts]
    return sum(lengths) / len(lengths)


def _run_seed(seed: int, root: Path, size: StudySize, methods: list[str]) -> dict:
    from megatron_tropd.demo.pretrain import pretrain
    from megatron_tropd.fidelity.probe import probe_worker
    from megatron_tropd.spawn import run_on_ranks

    started = time.perf_counter()
    files = prepare_data(root, size, seed)
    specs = pretrain_specs(size, seed)
    settings = eval_settings(files, size, seed)
    models = run_on_ranks(
        pretrain, WORLD_SIZE, specs, str(files.tokenizer), [str(files.teacher), str(files.student)], settings
    )[0]
    timings = {"pretrain": time.perf_counter() - started}
    accuracy = {m["name"]: m["accuracy"] for m in models}
    logger.info("seed %d: teacher %.3f, student %.3f", seed, accuracy["teacher"], accuracy["student"])
    for method in methods:
        method_started = time.perf_counter()
        run_on_ranks(distill_worker, WORLD_SIZE, distill_config(method, files, size, seed))
        timings[method] = time.perf_counter() - method_started
        logger.info("seed %d: %s done in %.0f s", seed, method, timings[method])
    probe_started = time.perf_counter()
    students = {"initial": str(files.student)} | {m: str(files.run_dir(m) / "checkpoints") for m in methods}
    teacher, student = model_configs(size)
    probes = run_on_ranks(
        probe_worker, WORLD_SIZE, teacher, student, str(files.teacher), students, str(files.tokenizer),
        str(files.prompts), size.probe_prompts, size.response_tokens, TOPK, seed,
    )[0]  # fmt: skip
    timings["probe"] = time.perf_counter() - probe_started
    timings["total"] = time.perf_counter() - started
    return {
        "seed": seed,
        "models": models,
        "teacher_trace_tokens": teacher_writer_length(files.tokenizer, seed),
        "probes": probes,
        # every run starts from the student's SFT score (its loop skips the step-0 evaluation)
        "runs": {m: run_summary(files.run_dir(m), accuracy["student"]) for m in methods},
        "timings_s": timings,
    }


def run_summary(run_dir: Path, accuracy_before: float) -> dict:
    """Accuracy before (the initial student's, measured once after its SFT with the runs' protocol) and
    after, and the loop's logged training signals of one run (``metrics.jsonl``)."""
    from megatron_tropd.demo.report import method_summary, read_metrics

    summary = method_summary(run_dir)
    summary["accuracy_before"] = accuracy_before
    summary["accuracy_curve"] = [(0, accuracy_before), *summary["accuracy_curve"]]
    steps, _ = read_metrics(run_dir / "metrics.jsonl")
    summary["mean_teacher_topk_mass"] = _mean([s.get("teacher_topk_mass") for s in steps])
    summary["mean_prefix_share"] = _mean([s.get("prefix_share") for s in steps])
    config = json.loads((run_dir / "config.json").read_text(encoding="utf-8"))
    summary["loss"] = config["method"]["name"]
    summary["guidance"] = config["rollout"]["guidance"]
    return summary


def _mean(values: list) -> float:
    finite = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    return sum(finite) / len(finite) if finite else math.nan


def run_study(
    out: Path, seeds: list[int], methods: list[str], quick: bool, fresh: bool, on_seed=None
) -> dict:
    """Run every seed (each in ``out/seed<N>``); returns the study's results. ``on_seed(results)`` gets
    the results so far after each seed (a long study reports its finished seeds as it goes)."""
    size = QUICK if quick else FULL
    if fresh and out.exists():
        shutil.rmtree(out)
    started, per_seed = time.perf_counter(), []
    for seed in seeds:
        root = out / f"seed{seed}"
        if (root / "runs").exists():
            raise SystemExit(f"{root} holds an earlier study: pass --fresh to replace it or --out elsewhere")
        per_seed.append(_run_seed(seed, root, size, methods))
        logger.info("seed %d finished after %.0f s", seed, time.perf_counter() - started)
        if on_seed is not None:
            on_seed(_results(size, methods, quick, per_seed, time.perf_counter() - started))
    return _results(size, methods, quick, per_seed, time.perf_counter() - started)


def _results(size: StudySize, methods: list[str], quick: bool, per_seed: list[dict], wall_s: float) -> dict:
    return {
        "quick": quick,
        "size": size.__dict__,
        "vocab_size": VOCAB_SIZE,
        "topk": TOPK,
        "methods": methods,
        "guided": sorted(GUIDED & set(methods)),
        "zipf_top64_mass": task.zipf_topk_mass(TOPK),
        "seeds": per_seed,
        "wall_s": wall_s,
    }
