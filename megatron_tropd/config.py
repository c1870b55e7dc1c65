"""Typed run configuration: one dataclass per concern, defaults in one place, validation without I/O.

Every default below comes from ``docs/method.md`` (the paper's settings, or the decision recorded there
where the paper is silent). ``validate()`` raises ``ValueError`` naming the field, the bad value and what
is allowed, so a wrong recipe or command-line override fails before any process group starts.

``RunConfig`` holds one of each section plus the two models' shapes (``model_config.ModelConfig``); recipes
return one, and ``validate(world_size)`` checks the sections together. Nothing here imports torch or
Megatron: a configuration is built and checked before any process group starts.
"""

from __future__ import annotations

import difflib
import math
import multiprocessing
from dataclasses import dataclass, field, fields, replace
from typing import Any

# Loss methods selectable by ``MethodConfig.name`` (``METHOD_NAMES``) and what each needs: the torch-free
# table ``methods.METHOD_SPECS``, whose loss functions ``losses.LOSS_FUNCTIONS`` binds.
from megatron_tropd.methods import METHOD_NAMES, method_spec
from megatron_tropd.model_config import ModelConfig, tiny

# Top-k forward-KL families; must equal ``megatron_tropd.ops.FKL_FAMILIES`` (a test checks it). Repeated
# here so that config stays import-free and can be validated before torch is even touched.
FKL_FAMILIES = ("raw", "renorm", "tail")
TEACHER_PAYLOADS = ("topk", "hidden")


def closest_name_hint(name: str, allowed: tuple[str, ...]) -> str:
    """``"; did you mean 'x'?"`` for the closest allowed name, or ``""`` when nothing is close."""
    matches = difflib.get_close_matches(str(name), allowed, n=1, cutoff=0.5)
    return f"; did you mean {matches[0]!r}?" if matches else ""


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


STUDENT_PRECISIONS = ("auto", "bf16", "fp32")
TEACHER_PRECISIONS = ("auto", "bf16", "fp16", "fp32")


def _check_choice(field: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(
            f"{field} = {value!r} is not allowed; choose one of: {', '.join(allowed)}"
            f"{closest_name_hint(str(value), allowed)}"
        )


def _check_int(field: str, value: object, minimum: int, why: str) -> None:
    if not _is_int(value) or value < minimum:
        raise ValueError(f"{field} must be an integer >= {minimum} ({why}); got {value!r}")


def _check_range(field: str, value: object, low: float, high: float, closed: str, why: str) -> None:
    """``closed`` is one of "()", "[)", "(]", "[]" and says which bounds are allowed."""
    ok = _is_number(value)
    if ok:
        ok = (value >= low if closed[0] == "[" else value > low) and (
            value <= high if closed[1] == "]" else value < high
        )
    if not ok:
        raise ValueError(
            f"{field} must be a finite number in {closed[0]}{low}, {high}{closed[1]} ({why}); got {value!r}"
        )


@dataclass
class MethodConfig:
    """The distillation loss and its hyper-parameters (defaults: ``docs/method.md``)."""

    name: str = "tropd"
    """Loss method, one of ``METHOD_NAMES`` (``methods.METHOD_SPECS``); "reopold" aliases "clip_outlier"."""

    topk: int = 64
    """Teacher top-k size k for every top-k forward-KL term (k = 64 in the paper)."""

    fkl_family: str = "raw"
    """Top-k forward-KL family: "raw" (paper, unrenormalised), "renorm" (inside V_k) or "tail" (+1 bucket)."""

    ppo_clip_eps: float = 0.2
    """PPO ratio clip epsilon; inactive with one optimizer update per rollout batch (ratio == 1)."""

    guidance_beta: float = 0.001
    """Weight beta of the K1 forward-KL (beta-weighted NLL) term on teacher-prefix tokens."""

    jsd_beta: float = 0.5
    """Mixture weight of the generalised JSD baseline: pi_M = beta pi_T + (1 - beta) pi_S."""

    outlier_lambda: float = 0.2
    """Static outlier threshold tau = log(lambda / (1 - lambda)) for Clip/Mask Outlier and REOPOLD."""

    entropy_top_fraction: float = 0.2
    """Entropy-OPD: fraction of student tokens (highest student entropy in the batch) that get loss_pg."""

    reopold_entropy_top_fraction: float = 0.5
    """REOPOLD-2stage, second stage: fraction of student tokens kept by highest student entropy."""

    reopold_switch_fraction: float = 0.5
    """REOPOLD-2stage switches from reward to entropy masking at step ceil(fraction * total_steps)."""

    eopd_entropy_threshold: float = 0.8
    """EOPD: the top-k forward KL is added where the teacher's entropy exceeds this (nats)."""

    eopd_lambda_fkl: float = 1.0
    """EOPD: weight of the entropy-gated top-k forward-KL term."""

    eopd_topk: int = 16
    """EOPD: the forward KL uses the teacher's top ``eopd_topk`` ids (a subset of the top ``topk``)."""

    eopd_family: str = "renorm"
    """EOPD: forward-KL family of its gated term (renormalised inside the top-16, as in EOPD)."""

    aopd_tau: float = 0.0
    """AOPD gate G = 1[pi_T(x) - pi_S_old(x) <= tau] in the probability domain (tau = 0: pi_T <= pi_S)."""

    trust_seed: int = 1234
    """Seed of the counter-based hash that draws the trust mask M ~ Bernoulli(P_trust)."""

    teacher_payload: str = "topk"
    """What scoring sends from the teacher (``TEACHER_PAYLOADS``): "topk" (log-prob of the sampled token,
    top-k ids and log-probs) or "hidden" (those plus its final hidden states ``[N, S, H_t]``, and once per
    job its output-layer rows on each student rank, so the exact full-vocabulary FKL and the ``bias/*``
    metrics can be computed). Methods with a ``full_divergence`` (``fkl_full``, ``rkl_full``,
    ``jsd_full``, ``tropd_full``) always use "hidden" (``hidden_payload``)."""

    @property
    def hidden_payload(self) -> bool:
        """Whether the teacher's hidden states are scored: asked for, or needed by the method's loss."""
        return self.teacher_payload == "hidden" or method_spec(self.name).full_divergence is not None

    @property
    def outlier_tau(self) -> float:
        """tau = log(lambda / (1 - lambda)); log(0.25) ~ -1.386 for lambda = 0.2."""
        return math.log(self.outlier_lambda / (1.0 - self.outlier_lambda))

    def reopold_switch_step(self, total_steps: int) -> int:
        """First training step (0-based) of REOPOLD-2stage's entropy (refinement) stage.

        ``ceil(fraction * total_steps)``: the reward-masking stage gets the larger half of an odd run
        (fraction 0.5 of 5 steps: steps 0-2, then 3-4), and any fraction > 0 keeps at least one step of
        it. The product is rounded to 9 digits first so that e.g. 0.7 * 10 = 7.000000000000001 gives 7.
        """
        return math.ceil(round(self.reopold_switch_fraction * total_steps, 9))

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first invalid field and what it accepts."""
        _check_choice("method.name", self.name, METHOD_NAMES)
        _check_int("method.topk", self.topk, 1, "the number of teacher top-k ids per token, 64 in the paper")
        _check_choice("method.fkl_family", self.fkl_family, FKL_FAMILIES)
        _check_range("method.ppo_clip_eps", self.ppo_clip_eps, 0.0, 1.0, "()", "PPO ratio clip, 0.2 default")
        _check_range("method.guidance_beta", self.guidance_beta, 0.0, math.inf, "[)", "prefix NLL weight")
        _check_range("method.jsd_beta", self.jsd_beta, 0.0, 1.0, "()", "JSD mixture weight, 0.5 default")
        _check_range("method.outlier_lambda", self.outlier_lambda, 0.0, 1.0, "()", "tau = log(l / (1 - l))")
        for name in ("entropy_top_fraction", "reopold_entropy_top_fraction"):
            _check_range(f"method.{name}", getattr(self, name), 0.0, 1.0, "(]", "fraction of tokens kept")
        _check_range(
            "method.reopold_switch_fraction", self.reopold_switch_fraction, 0.0, 1.0, "[]", "of total steps"
        )
        _check_range(
            "method.eopd_entropy_threshold", self.eopd_entropy_threshold, 0.0, math.inf, "[)", "nats"
        )
        _check_range("method.eopd_lambda_fkl", self.eopd_lambda_fkl, 0.0, math.inf, "[)", "FKL weight")
        _check_int("method.eopd_topk", self.eopd_topk, 1, "EOPD's teacher top-k, 16 in EOPD")
        if self.name == "eopd" and self.eopd_topk > self.topk:
            raise ValueError(
                f"method.eopd_topk = {self.eopd_topk} exceeds method.topk = {self.topk}: EOPD takes its ids "
                "from the teacher's top-k signals, so raise method.topk or lower method.eopd_topk"
            )
        _check_choice("method.eopd_family", self.eopd_family, FKL_FAMILIES)
        _check_range("method.aopd_tau", self.aopd_tau, -1.0, 1.0, "[]", "a probability difference")
        _check_int("method.trust_seed", self.trust_seed, 0, "seed of the trust-mask hash")
        _check_choice("method.teacher_payload", self.teacher_payload, TEACHER_PAYLOADS)


LR_SCHEDULES = ("constant", "cosine", "linear")


@dataclass
class OptimConfig:
    """The student's optimizer and learning-rate schedule (defaults: ``docs/method.md``)."""

    lr: float = 5e-6
    """Peak learning rate (constant 5e-6 by default)."""

    min_lr: float = 0.0
    """Final learning rate of the cosine / linear schedules."""

    lr_schedule: str = "constant"
    """One of ``LR_SCHEDULES``."""

    warmup_steps: int = 0
    """Linear warm-up steps from 0 to ``lr``."""

    adam_beta1: float = 0.9
    """Adam first-moment decay."""

    adam_beta2: float = 0.98
    """Adam second-moment decay."""

    adam_eps: float = 1e-8
    """Adam epsilon."""

    weight_decay: float = 0.1
    """Decoupled weight decay (AdamW)."""

    clip_grad: float = 1.0
    """Global gradient-norm clip; 0 disables clipping."""

    micro_batch_size: int = 1
    """Sequences per microbatch (per data-parallel rank) when ``sequence_packing`` is off."""

    sequence_packing: bool = True
    """Score and train on packed microbatches: whole rollouts back to back, at most
    ``max_tokens_per_microbatch`` tokens each, attention kept within each rollout (``packing.py``), and
    data-parallel ranks given balanced token counts. Off: ``micro_batch_size`` rows padded to the
    batch's longest rollout."""

    max_tokens_per_microbatch: int = 0
    """Token budget of a packed microbatch; 0 = the longest possible rollout (``rollout.max_prompt_length
    + rollout.max_new_tokens``). Must hold at least that many tokens: a rollout is never split."""

    use_distributed_optimizer: bool = True
    """Shard optimizer state over data-parallel ranks (Megatron's DistributedOptimizer)."""

    updates_per_batch: int = 1
    """Optimizer updates per rollout batch; > 1 turns on PPO ratio clipping of the K1 term."""

    def validate(self) -> None:
        _check_range("optim.lr", self.lr, 0.0, 1.0, "(]", "peak learning rate")
        _check_range("optim.min_lr", self.min_lr, 0.0, self.lr, "[]", "final learning rate <= lr")
        _check_choice("optim.lr_schedule", self.lr_schedule, LR_SCHEDULES)
        _check_int("optim.warmup_steps", self.warmup_steps, 0, "linear warm-up steps")
        for name in ("adam_beta1", "adam_beta2"):
            _check_range(f"optim.{name}", getattr(self, name), 0.0, 1.0, "[)", "Adam decay")
        _check_range("optim.adam_eps", self.adam_eps, 0.0, 1.0, "()", "Adam epsilon")
        _check_range("optim.weight_decay", self.weight_decay, 0.0, math.inf, "[)", "AdamW decay")
        _check_range("optim.clip_grad", self.clip_grad, 0.0, math.inf, "[)", "0 disables clipping")
        _check_int("optim.micro_batch_size", self.micro_batch_size, 1, "sequences per microbatch")
        _check_int(
            "optim.max_tokens_per_microbatch", self.max_tokens_per_microbatch, 0, "0 = longest rollout"
        )
        if not isinstance(self.sequence_packing, bool):
            raise ValueError(f"optim.sequence_packing must be true or false; got {self.sequence_packing!r}")
        _check_int("optim.updates_per_batch", self.updates_per_batch, 1, "updates per rollout batch")


@dataclass
class ParallelConfig:
    """Each model's tensor x pipeline layout; data parallelism takes the rest of the world."""

    student_tensor_parallel: int = 1
    """Student TP size (must divide its attention heads and KV groups)."""

    student_pipeline_parallel: int = 1
    """Student pipeline stages."""

    teacher_tensor_parallel: int = 1
    """Teacher TP size; may differ from the student's."""

    teacher_pipeline_parallel: int = 1
    """Teacher pipeline stages."""

    def validate(self) -> None:
        for who in ("student", "teacher"):
            for name in (f"{who}_tensor_parallel", f"{who}_pipeline_parallel"):
                _check_int(f"parallel.{name}", getattr(self, name), 1, "a model-parallel size")


def replicas(who: str, tensor_parallel: int, pipeline_parallel: int, world_size: int) -> int:
    """Data-parallel replicas of a TP x PP layout in ``world_size`` ranks; a ValueError that lists the
    sizes that would fit when it does not tile the job."""
    model_parallel = tensor_parallel * pipeline_parallel
    if world_size % model_parallel:
        fitting = [n for n in range(1, world_size + 1) if world_size % n == 0]
        raise ValueError(
            f"{who}: tensor_parallel x pipeline_parallel = {tensor_parallel} x {pipeline_parallel} = "
            f"{model_parallel} does not divide the world size {world_size}; choose TP x PP in {fitting} "
            f"or launch a multiple of {model_parallel} ranks"
        )
    return world_size // model_parallel


GUIDANCE_SCHEDULES = ("cosine", "linear", "constant")
OVERLONG_PROMPT_POLICIES = ("skip", "fail")
DECODERS = ("auto", "cached", "megatron")
BATCHINGS = ("continuous", "static")


@dataclass
class RolloutConfig:
    """Generation of the student's rollouts and the teacher's guidance prefixes (method.md defaults)."""

    prompts_per_step: int = 128
    """Prompts sampled per training step (global)."""

    samples_per_prompt: int = 4
    """Rollouts generated per prompt."""

    max_prompt_length: int = 1024
    """Prompts longer than this are skipped or refused (``data.on_overlong_prompt``)."""

    max_new_tokens: int = 8096
    """Generation budget per rollout (the paper's maximum generation length)."""

    temperature: float = 1.0
    """Sampling temperature of the student's rollouts."""

    top_p: float = 1.0
    """Nucleus sampling mass (1.0 = off)."""

    top_k: int = 0
    """Top-k sampling (0 = off)."""

    guidance: bool | None = None
    """Off-policy guidance: part of the rollouts continue a teacher-written prefix, whose tokens get the
    beta-NLL term. None (default): the method's own default, on for the TrOPD family only
    (``methods.METHOD_SPECS``); true / false force it (an ablation). ``RunConfig.resolved()`` fills it in."""

    guided_fraction: float = 0.5
    """Share of each prompt's rollouts that get a teacher prefix."""

    guidance_schedule: str = "cosine"
    """How the maximum prefix length anneals from ``max_new_tokens`` to 0 over training."""

    teacher_temperature: float = 1.0
    """Sampling temperature of the teacher's guidance responses."""

    seed: int = 0
    """Seed of the sampling and of the prefix-length draws."""

    decoder: str = "auto"
    """Decode path of generation (rollouts, guidance, in-loop evaluation): "cached" reads the model's
    parameters directly and keeps keys rotated in its cache (``rollout/decoder.py``); "megatron" runs
    ``GPTModel.forward`` with Megatron's static KV cache; "auto" takes "cached" wherever it can run the
    model exactly (every family here) and "megatron" otherwise."""

    batching: str = "continuous"
    """How generation fills its batch: "continuous" refills a row's slot with the next request as soon as
    the row ends, prefilling the newcomer while the other rows decode (``rollout/slots.py``); "static"
    decodes each batch until its longest row ends. The "megatron" decoder has no per-slot positions and
    always batches statically."""

    def validate(self) -> None:
        for name in ("prompts_per_step", "samples_per_prompt", "max_prompt_length", "max_new_tokens"):
            _check_int(f"rollout.{name}", getattr(self, name), 1, "a positive count")
        _check_range("rollout.temperature", self.temperature, 0.0, math.inf, "[)", "0 = greedy")
        _check_range(
            "rollout.teacher_temperature", self.teacher_temperature, 0.0, math.inf, "[)", "0 = greedy"
        )
        _check_range("rollout.top_p", self.top_p, 0.0, 1.0, "(]", "nucleus mass")
        _check_int("rollout.top_k", self.top_k, 0, "0 disables top-k sampling")
        _check_range("rollout.guided_fraction", self.guided_fraction, 0.0, 1.0, "[]", "share of rollouts")
        if not (self.guidance is None or isinstance(self.guidance, bool)):
            raise ValueError(
                f"rollout.guidance must be true, false or none (the method's default); got {self.guidance!r}"
            )
        _check_choice("rollout.guidance_schedule", self.guidance_schedule, GUIDANCE_SCHEDULES)
        _check_choice("rollout.decoder", self.decoder, DECODERS)
        _check_choice("rollout.batching", self.batching, BATCHINGS)

    @property
    def rollouts_per_step(self) -> int:
        return self.prompts_per_step * self.samples_per_prompt


@dataclass
class DataConfig:
    """Prompt data and tokenizer."""

    train_prompts: str = ""
    """JSONL or parquet prompt file (see ``megatron_tropd.data`` for the schema)."""

    tokenizer: str = ""
    """A Hugging Face tokenizer directory or a sentencepiece ``.model`` file."""

    chat_template: str = "auto"
    """"auto" (the tokenizer's own), "none" (raw prompt text), or a Jinja template string."""

    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)
    """Extra chat-template variables for every rendered prompt (training, teacher scoring, evaluation),
    e.g. ``{"enable_thinking": false}`` for Qwen3; as JSON on the command line."""

    on_overlong_prompt: str = "skip"
    """"skip" (drop and count) or "fail" for prompts longer than ``rollout.max_prompt_length``."""

    shuffle_seed: int = 0
    """Seed of the deterministic epoch shuffles."""

    default_domain: str = ""
    """With several ``teachers``: the teacher of prompts that have no ``domain`` field (empty: every prompt
    must name one)."""

    def validate(self) -> None:
        from megatron_tropd.data import check_template_kwargs  # torch-free, like this module

        _check_choice("data.on_overlong_prompt", self.on_overlong_prompt, OVERLONG_PROMPT_POLICIES)
        _check_int("data.shuffle_seed", self.shuffle_seed, 0, "seed")
        check_template_kwargs(self.chat_template_kwargs)


RESUME_MODES = ("auto", "required", "never")
ON_DAMAGED = ("fail", "previous")
"""What a resume does with a damaged checkpoint (``checkpoint.on_damaged``, ``load_checkpoint``)."""
OPTIMIZER_FORMATS = ("dp_reshardable", "fully_reshardable")
"""The DistributedOptimizer's state on disk (``checkpoint.optimizer_format``, ``save_checkpoint``)."""
_RESUME_ALIASES = {True: "auto", False: "never"} | {
    word: mode
    for words, mode in ((("true", "yes", "on"), "auto"), (("false", "no", "off"), "never"))
    for word in words
}


def _resume_mode(value: object) -> object:
    """``checkpoint.resume`` with its boolean spellings mapped to modes; anything else is left for
    ``validate`` to name."""
    key = value.lower() if isinstance(value, str) else value
    return _RESUME_ALIASES.get(key, value) if isinstance(key, (bool, str)) else value


@dataclass
class CheckpointConfig:
    """Where runs save and resume, and where the models come from."""

    save_dir: str = "runs/tropd"
    """Checkpoints, logs and reports of the run (shared storage on a cluster)."""

    save_interval: int = 50
    """Save every this many steps (and at the end)."""

    keep_last: int = 3
    """Step checkpoints kept; older ones are deleted once a newer one is complete."""

    student_init: str = ""
    """Megatron checkpoint of the initial student (from ``tools/convert.py import``); empty = random init."""

    teacher: str = ""
    """Megatron checkpoint of the teacher, loaded read-only; empty = random init (tests only)."""

    resume: str = "auto"
    """``auto``: continue from ``save_dir/checkpoints/latest`` when it exists, else start from scratch;
    ``required``: refuse to start without a checkpoint to resume (a mistyped ``save_dir`` is an error, not
    a fresh run); ``never``: always start from scratch. ``true`` / ``false`` mean ``auto`` / ``never``."""

    on_damaged: str = "fail"
    """A checkpoint whose files no longer match the sizes and hashes recorded at save: ``fail`` (stop,
    naming the files) or ``previous`` (resume the newest intact earlier step, with a warning; the damaged
    directory is moved aside as ``damaged-step-...``, never deleted)."""

    optimizer_format: str = "dp_reshardable"
    """How the distributed optimizer's state is saved: ``dp_reshardable`` (each rank writes its own shard,
    no gather; a resume must keep the student's TP and PP, any DP) or ``fully_reshardable`` (gathered over
    DP while saving; resumable on any layout). The non-distributed optimizer always reshards freely."""

    async_save: bool = False
    """Write the periodic saves in the background (Megatron's asynchronous sharded save): training goes on
    once the state is copied off its buffers; the step is published (``latest`` repointed) when every
    rank's writer is done, checked after each step and waited for by the next save. Saves on a stop
    signal and at the end of training are synchronous; a crash mid-write leaves ``latest`` as it was."""

    def __post_init__(self) -> None:
        self.resume = _resume_mode(self.resume)

    def validate(self) -> None:
        _check_int("checkpoint.save_interval", self.save_interval, 1, "steps between saves")
        _check_int("checkpoint.keep_last", self.keep_last, 1, "checkpoints kept")
        _check_choice("checkpoint.resume", self.resume, RESUME_MODES)
        _check_choice("checkpoint.on_damaged", self.on_damaged, ON_DAMAGED)
        _check_choice("checkpoint.optimizer_format", self.optimizer_format, OPTIMIZER_FORMATS)
        self._check_async_save()

    def _check_async_save(self) -> None:
        if not isinstance(self.async_save, bool):
            raise ValueError(f"checkpoint.async_save must be true or false; got {self.async_save!r}")
        if self.async_save and "fork" not in multiprocessing.get_all_start_methods():
            raise ValueError(
                "checkpoint.async_save=true needs the 'fork' start method, which this platform lacks: "
                "Megatron's background writer is a process forked from each rank. Set "
                "checkpoint.async_save=false"
            )


@dataclass
class EvalSettings:
    """How a model is evaluated: which benchmarks and how its answers are sampled. One set of defaults for
    the loop's evaluation (``eval.*``), ``tropd eval`` (its flags and ``key=value`` overrides) and
    ``eval.harness.evaluate_checkpoint``; the defaults are the paper's protocol (avg@4 at 0.6)."""

    names: tuple[str, ...] = ()
    """Benchmarks of the benchmarks directory to run (empty = all)."""

    samples_per_prompt: int = 4
    """k of avg@k."""

    temperature: float = 0.6
    """Sampling temperature (0 = greedy)."""

    max_new_tokens: int = 8096
    """Generation budget per sample."""

    max_prompts: int = 0
    """Evaluate on at most this many prompts of each benchmark (0 = all)."""

    raw_prompts: bool = False
    """Send each item's prompt as written, without the family's answer-format instruction (for tasks
    whose prompts already say how to answer, such as the demo's)."""

    def validate(self, prefix: str = "eval.") -> None:
        """``prefix``: how the keys are spelled where they were set (``eval.`` in a run's config)."""
        _check_int(f"{prefix}samples_per_prompt", self.samples_per_prompt, 1, "k of avg@k")
        _check_range(f"{prefix}temperature", self.temperature, 0.0, math.inf, "[)", "0 = greedy")
        _check_int(f"{prefix}max_new_tokens", self.max_new_tokens, 1, "generation budget")
        _check_int(f"{prefix}max_prompts", self.max_prompts, 0, "0 = all")


@dataclass
class EvalConfig(EvalSettings):
    """In-training evaluation: the shared ``EvalSettings`` plus when, and on which benchmark files."""

    interval: int = 0
    """Evaluate every this many steps, before the first and after the last (0 = never)."""

    at_start: bool = True
    """Also evaluate before the first step (NeMo-RL's ``val_at_start``); off when the starting model's
    score is already known, e.g. several runs from the same checkpoint."""

    benchmarks: str = ""
    """Directory with ``benchmarks.json`` (``tools/prepare_benchmarks.py`` writes one); needed when
    ``interval > 0``."""

    def validate(self, prefix: str = "eval.") -> None:
        _check_int(f"{prefix}interval", self.interval, 0, "0 disables evaluation")
        super().validate(prefix)
        if self.interval and not self.benchmarks:
            raise ValueError(
                f"eval.interval={self.interval} but eval.benchmarks is empty: point it at a directory "
                "with benchmarks.json (tools/prepare_benchmarks.py) or set eval.interval=0"
            )

    @property
    def settings(self) -> EvalSettings:
        """The ``EvalSettings`` part (what ``tropd eval`` would be given for the same evaluation)."""
        return EvalSettings(**{f.name: getattr(self, f.name) for f in fields(EvalSettings)})


@dataclass
class LoggingConfig:
    """Where step metrics go."""

    log_interval: int = 1
    """Log every this many steps."""

    tensorboard: bool = True
    """Write TensorBoard event files under ``checkpoint.save_dir/tensorboard`` (a warning says so when
    tensorboard cannot be imported)."""

    wandb_project: str = ""
    """Weights & Biases project (empty = off)."""

    wandb_name: str = ""
    """W&B run name (empty = the run's ``name``)."""

    wandb_entity: str = ""
    """W&B team or user that owns the project (empty = the account's default entity)."""

    wandb_tags: tuple[str, ...] = ()
    """W&B tags of the run, e.g. ``logging.wandb_tags='["tropd", "qwen3-1.7b"]'``."""

    def validate(self) -> None:
        _check_int("logging.log_interval", self.log_interval, 1, "steps between log lines")
        for name in ("wandb_project", "wandb_name", "wandb_entity"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"logging.{name} must be a string; got {getattr(self, name)!r}")
        self._check_wandb_tags()
        if not self.wandb_project and (unused := self._wandb_fields_set()):
            raise ValueError(
                f"{', '.join(unused)} set but logging.wandb_project is empty, so W&B is off: "
                "set logging.wandb_project=<project> or clear them"
            )

    def _check_wandb_tags(self) -> None:
        tags = self.wandb_tags
        if not isinstance(tags, (tuple, list)) or not all(isinstance(t, str) and t.strip() for t in tags):
            raise ValueError(
                f"logging.wandb_tags must be a list of non-empty strings, e.g. "
                f'logging.wandb_tags=\'["tropd", "ablation"]\'; got {tags!r}'
            )

    def _wandb_fields_set(self) -> list[str]:
        names = [name for name in ("wandb_name", "wandb_entity", "wandb_tags") if getattr(self, name)]
        return [f"logging.{name}" for name in names]


@dataclass
class TrainConfig:
    """The models' precision, and how the update loop reacts to non-finite steps."""

    max_nonfinite_steps: int = 3
    """Stop the run after this many consecutive updates skipped for a non-finite loss or gradient."""

    precision: str = "auto"
    """The student's parameters and activations: ``bf16`` (fp32 main weights, gradients and optimizer
    state, as Megatron's mixed-precision optimizer keeps them), ``fp32``, or ``auto`` (bf16 on a GPU, fp32
    on the CPU). No fp16: its loss scaler skips overflowing steps, which the non-finite guard would count."""

    teacher_precision: str = "auto"
    """The frozen teacher's parameters and activations: ``bf16``, ``fp16``, ``fp32`` or ``auto`` (as the
    student's ``auto``). Its top-k log-probs are computed in fp32 whatever its precision."""

    def validate(self) -> None:
        _check_int("train.max_nonfinite_steps", self.max_nonfinite_steps, 1, "consecutive skipped updates")
        if self.precision == "fp16":
            raise ValueError(
                "train.precision = 'fp16' is not offered for the student: fp16 training needs a dynamic loss "
                "scaler, whose skipped overflow steps the non-finite guard would count; use bf16 (or fp32)"
            )
        _check_choice("train.precision", self.precision, STUDENT_PRECISIONS)
        _check_choice("train.teacher_precision", self.teacher_precision, TEACHER_PRECISIONS)


@dataclass
class TeacherConfig:
    """One teacher of a multi-teacher job (``RunConfig.teachers``): its shape, weights and layout."""

    model: ModelConfig = field(default_factory=tiny)
    """The teacher's shape; its true vocabulary must be the student's (one tokenizer)."""

    checkpoint: str = ""
    """Its Megatron checkpoint (``tools/convert.py`` output); empty: random weights (tests)."""

    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    """Its own TP x PP layout over every rank of the job (the rest data-parallel)."""

    domains: list[str] = field(default_factory=list)
    """Further prompt domains it scores, beside the one its name spells (e.g. ``science`` for a general
    teacher)."""


DEFAULT_TEACHER = "teacher"


@dataclass
class RunConfig:
    """One distillation run: built by a recipe, overridden from the command line, validated up front."""

    name: str = "tropd"
    """Run name (log and report titles)."""

    student: ModelConfig = field(default_factory=tiny)
    """The student's shape (trainable)."""

    teacher: ModelConfig = field(default_factory=tiny)
    """The teacher's shape (frozen); must share the student's tokenizer and true vocabulary."""

    method: MethodConfig = field(default_factory=MethodConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    teachers: dict[str, TeacherConfig] = field(default_factory=dict)
    """Several teachers in one job, by name: each prompt goes to the teacher named by its ``domain``
    field (``data.default_domain`` where it has none), which scores its rollouts and writes its guidance
    prefixes. Empty (the default): one teacher, ``teacher`` with ``checkpoint.teacher`` on
    ``parallel.teacher_*``; when set, those three are not used."""

    train_steps: int = 200
    """Training steps (one rollout batch each)."""

    seed: int = 1234
    """Seed of model initialisation and process RNGs."""

    def teacher_set(self) -> dict[str, TeacherConfig]:
        """The job's teachers by name: ``teachers``, or the single ``teacher`` as ``"teacher"``."""
        if self.teachers:
            return dict(self.teachers)
        p = self.parallel
        single = TeacherConfig(
            self.teacher, self.checkpoint.teacher, p.teacher_tensor_parallel, p.teacher_pipeline_parallel
        )
        return {DEFAULT_TEACHER: single}

    def route(self, domain: str | None) -> str:
        """The teacher that scores a prompt of ``domain`` (its ``domain`` field; None when it has none)."""
        if not self.teachers:
            return DEFAULT_TEACHER
        name = domain or self.data.default_domain
        name = next((t for t, c in self.teachers.items() if name in c.domains), name)
        if name not in self.teachers:
            which = f"domain {domain!r}" if domain else "no domain field, and data.default_domain is empty"
            raise ValueError(
                f"a prompt has {which}, but the teachers are {', '.join(sorted(self.teachers))}: give every "
                "prompt the 'domain' of one of them, set data.default_domain, or add a teacher of that name"
            )
        return name

    @property
    def guidance_enabled(self) -> bool:
        """The effective ``rollout.guidance``: as set, or the method's default when it is None."""
        if self.rollout.guidance is not None:
            return self.rollout.guidance
        _check_choice("method.name", self.method.name, METHOD_NAMES)  # the error names the field
        return method_spec(self.method.name).guidance

    @property
    def packing_tokens(self) -> int:
        """The packed microbatches' token budget (``optim.max_tokens_per_microbatch`` with 0 resolved to
        the longest possible rollout); 0 when ``optim.sequence_packing`` is off."""
        if not self.optim.sequence_packing:
            return 0
        longest = self.rollout.max_prompt_length + self.rollout.max_new_tokens
        return self.optim.max_tokens_per_microbatch or longest

    def resolved(self) -> RunConfig:
        """A copy with every derived default made explicit (``rollout.guidance`` a bool, the packing
        budget a count), so ``--print-config``, the saved ``config.json`` and everything downstream see
        the effective values."""
        _check_choice("method.name", self.method.name, METHOD_NAMES)  # the defaults below depend on it
        budget = self.packing_tokens or self.optim.max_tokens_per_microbatch
        optim = replace(self.optim, max_tokens_per_microbatch=budget)
        return replace(self, rollout=replace(self.rollout, guidance=self.guidance_enabled), optim=optim)

    def validate(self, world_size: int | None = None) -> None:
        """Check every section and how they fit together (and the job size, when given)."""
        for section in (self.method, self.optim, self.parallel, self.rollout, self.data):
            section.validate()
        for section in (self.checkpoint, self.eval, self.logging, self.train):
            section.validate()
        _check_int("train_steps", self.train_steps, 1, "training steps")
        self.student.validate()
        self.student.validate_parallel(
            self.parallel.student_tensor_parallel, self.parallel.student_pipeline_parallel,
            model="student", key_prefix="parallel.student_",
        )  # fmt: skip
        self._check_teachers()
        if self.method.topk > self.student.vocab_size:
            raise ValueError(
                f"method.topk = {self.method.topk} exceeds the vocabulary ({self.student.vocab_size})"
            )
        if world_size is not None:
            self._check_batch_split(world_size)
        self._check_context()
        self._check_packing_budget()

    def _check_packing_budget(self) -> None:
        """A packed microbatch holds whole rollouts, so its budget must fit the longest one."""
        r = self.rollout
        longest = r.max_prompt_length + r.max_new_tokens
        if self.optim.sequence_packing and 0 < self.optim.max_tokens_per_microbatch < longest:
            raise ValueError(
                f"optim.max_tokens_per_microbatch = {self.optim.max_tokens_per_microbatch} cannot hold a "
                f"rollout of rollout.max_prompt_length + rollout.max_new_tokens = {longest} tokens (a "
                f"rollout is never split): raise it to at least {longest}, or set it to 0 (exactly that)"
            )

    def _check_context(self) -> None:
        """A prompt of ``max_prompt_length`` plus ``max_new_tokens`` generated tokens is generated and
        scored by both models, so it must fit each model's positions; in-loop evaluation needs at least
        one prompt position beside its generation budget (each prompt is checked when loaded)."""
        r = self.rollout
        needed = r.max_prompt_length + r.max_new_tokens
        teachers = [(self._teacher_keys(name)[0], t.model) for name, t in self.teacher_set().items()]
        for who, model in [("student", self.student), *teachers]:
            if needed > model.max_position_embeddings:
                raise ValueError(
                    f"rollout.max_prompt_length + rollout.max_new_tokens = {r.max_prompt_length} + "
                    f"{r.max_new_tokens} = {needed} positions exceed {who}.max_position_embeddings = "
                    f"{model.max_position_embeddings} (the {who}'s context): lower rollout.max_new_tokens or "
                    f"rollout.max_prompt_length so that they sum to at most {model.max_position_embeddings}"
                )
        context = self.student.max_position_embeddings
        if self.eval.interval and self.eval.max_new_tokens >= context:
            raise ValueError(
                f"eval.max_new_tokens = {self.eval.max_new_tokens} leaves no position for a prompt in the "
                f"student's context of {context} (student.max_position_embeddings): lower eval.max_new_tokens"
            )

    def _teacher_keys(self, name: str) -> tuple[str, str]:
        """How the settings of teacher ``name`` are spelled on the command line: (shape, layout prefix)."""
        if not self.teachers:
            return "teacher", "parallel.teacher_"
        return f"teachers.{name}.model", f"teachers.{name}."

    def _check_teachers(self) -> None:
        """Each teacher's shape and layout, and its vocabulary: the true vocabularies must equal the
        student's (padded sizes may differ, 151,936 vs 152,064)."""
        if self.teachers and self.data.default_domain and self.data.default_domain not in self.teachers:
            raise ValueError(
                f"data.default_domain = {self.data.default_domain!r} names no teacher; the teachers are "
                f"{', '.join(sorted(self.teachers))}"
            )
        claimed: dict[str, str] = {}
        for name, teacher in self.teacher_set().items():
            shape_key, layout_key = self._teacher_keys(name)
            if not isinstance(teacher, TeacherConfig):
                raise ValueError(f"teachers.{name} must be a TeacherConfig (model, checkpoint, layout)")
            for domain in [name, *teacher.domains]:
                if domain in claimed:
                    raise ValueError(
                        f"domain {domain!r} is routed to two teachers ({claimed[domain]} and {name}): keep "
                        "it in one teacher's name or domains"
                    )
                claimed[domain] = name
            teacher.model.validate()
            teacher.model.validate_parallel(
                teacher.tensor_parallel, teacher.pipeline_parallel, model=shape_key, key_prefix=layout_key
            )
            if teacher.model.vocab_size != self.student.vocab_size:
                raise ValueError(
                    f"student vocab_size {self.student.vocab_size} != {shape_key} vocab_size "
                    f"{teacher.model.vocab_size}: on-policy distillation needs one tokenizer; set both to "
                    "the tokenizer's true vocabulary (padding to a multiple of 128 x TP is added per model)"
                )

    def _check_batch_split(self, world_size: int) -> None:
        p = self.parallel
        replicas("parallel.student", p.student_tensor_parallel, p.student_pipeline_parallel, world_size)
        layouts = [("student", world_size // (p.student_tensor_parallel * p.student_pipeline_parallel))]
        for name, teacher in self.teacher_set().items():
            who = "parallel.teacher" if not self.teachers else f"teachers.{name}"
            dp = replicas(who, teacher.tensor_parallel, teacher.pipeline_parallel, world_size)
            layouts.append(("teacher" if not self.teachers else who, dp))
        if self.teachers:  # a teacher scores only its prompts' rollouts: any count, split unevenly
            layouts = layouts[:1]
        rollouts = self.rollout.rollouts_per_step
        rows_per_microbatch = 1 if self.optim.sequence_packing else self.optim.micro_batch_size
        for who, dp in layouts:
            if rollouts % (dp * rows_per_microbatch):
                raise ValueError(
                    f"rollout.prompts_per_step x samples_per_prompt = {rollouts} rollouts do not split over "
                    f"the {who}'s {dp} data-parallel ranks x optim.micro_batch_size = "
                    f"{rows_per_microbatch}; make the rollouts a multiple of {dp * rows_per_microbatch}"
                )
