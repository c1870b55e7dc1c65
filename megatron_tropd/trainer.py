"""The distillation loop, top to bottom: sample prompts -> generate (student, with teacher-prefix guidance)
-> score (teacher signals, old student log-probs, trust draw) -> train -> log -> checkpoint -> evaluate
(every ``eval.interval`` steps, before the first and after the last: avg@k on held-out benchmarks).
With the hidden teacher payload (``MethodConfig.hidden_payload``: ``method.teacher_payload=hidden`` or a
full-vocabulary method) each student rank first receives the teacher's output-layer rows of its
vocabulary partition, once per job (``ensure_teacher_weight``), from every teacher when there are several.

``run(config)`` is the job's entry point on every rank (torchrun, srun or a nemo-run launcher). Every
method of ``method.md`` runs through the same loop; only ``config.method`` changes. On SIGUSR1 or SIGTERM
(Slurm's pre-emption / time-limit warning, scancel, requeue) the loop finishes the current step, saves a
checkpoint and returns; ``python -m megatron_tropd.train`` then exits with ``signals.REQUEUE_EXIT_CODE``
and a requeued job resumes from that checkpoint.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from megatron_tropd import run_lock
from megatron_tropd.batch import RolloutBatch
from megatron_tropd.config import CheckpointConfig, RunConfig
from megatron_tropd.config_file import write_yaml
from megatron_tropd.console import configure_console
from megatron_tropd.data import Prompt, PromptSampler, Tokenizer, load_run_prompts, run_tokenizer
from megatron_tropd.guidance import draw_prefix_lengths, guided_samples_per_prompt, max_prefix_length
from megatron_tropd.metrics_log import MetricsLog
from megatron_tropd.records import PhaseSeconds, StepRecord
from megatron_tropd.rollout.engine import (
    GenerationRequest,
    SamplingParams,
    to_rollout_batch,
)
from megatron_tropd.rollout.text import generate_data_parallel
from megatron_tropd.runtime import default_device
from megatron_tropd.signals import StopSignals

if TYPE_CHECKING:  # the evaluation modules load only when eval.interval > 0; Megatron only at setup
    from megatron_tropd.eval.scoring import Generate
    from megatron_tropd.placed import PlacedModel
    from megatron_tropd.rollout.engine import GenerationEngine
    from megatron_tropd.topology import Topology
    from megatron_tropd.training import Student

logger = logging.getLogger(__name__)


@dataclass
class Job:
    """Everything the loop holds on this rank."""

    config: RunConfig
    topology: Topology
    student: Student
    teachers: dict[str, PlacedModel]  # by name (``RunConfig.teacher_set``), each on its own layout
    student_engine: GenerationEngine  # on the student's layout
    teacher_engines: dict[str, GenerationEngine]  # each on its teacher's layout
    sampler: PromptSampler
    eos_token_id: int | None
    run_dir: Path
    evaluation: InTrainingEval | None = None
    nonfinite_streak: int = 0  # consecutive updates skipped for a non-finite loss or gradient
    nonfinite_total: int = 0  # skipped updates since this process started
    # the student holds its rows of the teacher's output layer (on every rank, whatever its stage: the
    # distribution is collective, so all ranks must agree whether it is still to do)
    teacher_weight_attached: bool = False

    @property
    def teacher(self) -> PlacedModel:
        """The teacher of a one-teacher job (the first by name otherwise)."""
        return self.teachers[min(self.teachers)]

    def scoring_teachers(self, routes: list[str]):
        """What scores a batch whose rows go to ``routes``: the teacher itself, or each row's own
        (``scoring.RoutedTeachers``)."""
        from megatron_tropd.scoring import RoutedTeachers

        if len(self.teachers) == 1:
            return self.teacher
        return RoutedTeachers(self.teachers, routes)


class NonFiniteTrainingError(RuntimeError):
    """``train.max_nonfinite_steps`` consecutive updates had a non-finite loss or gradient."""


def _count_nonfinite(job: Job, step: int, skipped: bool, batch) -> None:
    """Count a skipped update; at ``train.max_nonfinite_steps`` in a row, write the batch (every rank's
    token ids and sample ids, gathered on rank 0) to ``run_dir/nonfinite-step-<step>.pt`` and stop."""
    job.nonfinite_streak = job.nonfinite_streak + 1 if skipped else 0
    job.nonfinite_total += int(skipped)
    limit = job.config.train.max_nonfinite_steps
    if job.nonfinite_streak < limit:
        return
    rows = {"tokens": batch.tokens.cpu(), "sample_ids": batch.sample_ids.cpu()}
    gathered = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(rows, gathered, dst=0)
    path = job.run_dir / f"nonfinite-step-{step}.pt"
    if dist.get_rank() == 0:
        torch.save({"step": step, "ranks": gathered}, path)
    raise NonFiniteTrainingError(
        f"step {step}: {limit} consecutive updates had a non-finite loss or gradient and were skipped "
        f"(train.max_nonfinite_steps = {limit}); the last batch is in {path}. Lower optim.lr, set "
        "optim.clip_grad > 0 or raise optim.adam_eps, then resume from the last checkpoint"
    )


@dataclass
class InTrainingEval:
    """The held-out benchmarks and the student's text generator (``eval.interval > 0``)."""

    benchmarks: list
    generate: Generate


def _build_models(config: RunConfig):
    from megatron_tropd.checkpoint import load_model_weights
    from megatron_tropd.models import params_dtype_for
    from megatron_tropd.placed import place_model
    from megatron_tropd.runtime import start
    from megatron_tropd.topology import ParallelLayout
    from megatron_tropd.training import build_student

    p, teachers = config.parallel, config.teacher_set()
    layouts = {name: ParallelLayout(t.tensor_parallel, t.pipeline_parallel) for name, t in teachers.items()}
    topology = start(
        ParallelLayout(p.student_tensor_parallel, p.student_pipeline_parallel), layouts[min(layouts)],
        seed=config.seed,
    )  # fmt: skip
    optim = replace(config.optim, max_tokens_per_microbatch=config.packing_tokens)  # 0 resolved
    student = build_student(
        config.student, optim, topology.student, config.train_steps, config.seed,
        params_dtype=params_dtype_for(config.train.precision),
    )  # fmt: skip
    if config.checkpoint.student_init:
        load_model_weights(config.checkpoint.student_init, student.module, config.student)
    placed = {}
    for index, name in enumerate(sorted(teachers)):  # the same order on every rank: groups are collective
        teacher = teachers[name]
        placed[name] = place_model(
            teacher.model, topology.groups_for(layouts[name]), weights=teacher.checkpoint,
            seed=config.seed + 1 + index, params_dtype=params_dtype_for(config.train.teacher_precision),
        )  # fmt: skip
    return topology, student, placed


def _rows_per_replica(config: RunConfig, topology) -> int:
    """Rows a student replica generates per step: the engines' batch size."""
    return max(1, config.rollout.rollouts_per_step // topology.student.data_parallel)


def _engines(config: RunConfig, topology, student: Student, teachers: dict[str, PlacedModel]):
    max_length = config.rollout.max_prompt_length + config.rollout.max_new_tokens
    r, batch = config.rollout, _rows_per_replica(config, topology)
    teacher_engines = {n: t.engine(max_length, batch, r.decoder, r.batching) for n, t in teachers.items()}
    return student.placed.engine(max_length, batch, r.decoder, r.batching), teacher_engines


def _in_training_eval(config: RunConfig, topology, student, tokenizer: Tokenizer | None):
    """The held-out benchmarks, checked against the student's context, and the same ``generate`` as
    ``tropd eval`` over the student's own layout."""
    from megatron_tropd.eval.harness import build_generate, load_checked_benchmarks

    e = config.eval
    if tokenizer is None:
        raise ValueError("eval.interval > 0 needs data.tokenizer: benchmarks are text")
    benchmarks = load_checked_benchmarks(
        e.benchmarks, e.settings, tokenizer, chat_template=config.data.chat_template,
        chat_template_kwargs=config.data.chat_template_kwargs,
        context_length=config.student.max_position_embeddings,
    )  # fmt: skip
    generate = build_generate(
        student.placed, tokenizer, max_new_tokens=e.max_new_tokens, chat_template=config.data.chat_template,
        chat_template_kwargs=config.data.chat_template_kwargs, seed=config.seed,
        max_batch_size=_rows_per_replica(config, topology), decoder=config.rollout.decoder,
    )  # fmt: skip
    return InTrainingEval(benchmarks, generate)


def evaluate_student(job: Job, step: int) -> dict[str, float]:
    """avg@k of the student on each held-out benchmark, their mean and, with benchmarks of several
    domains, ``domain/<d>`` per domain (``EvalReport.scores``; collective, every rank returns)."""
    from megatron_tropd.eval.scoring import evaluate

    e = job.config.eval
    started = time.perf_counter()
    report = evaluate(
        job.evaluation.benchmarks, job.evaluation.generate, e.samples_per_prompt, e.temperature,
        run=f"step{step}", raw_prompts=e.raw_prompts,
    )  # fmt: skip
    return {**report.scores(), "seconds": time.perf_counter() - started}


def _evaluation_due(job: Job, done: int) -> bool:
    """After every ``eval.interval``-th update and after the last one."""
    if job.evaluation is None:
        return False
    return done % job.config.eval.interval == 0 or done == job.config.train_steps


@dataclass(frozen=True)
class LoopState:
    """Where the loop stands: the next step and the prompt sampler's position (saved with each checkpoint
    as its ``loop_state``, a JSON object)."""

    step: int = 0
    data_position: int = 0

    def to_dict(self) -> dict[str, int]:
        return {"step": self.step, "data_position": self.data_position}

    @classmethod
    def from_dict(cls, saved: dict) -> LoopState:
        return cls(step=int(saved["step"]), data_position=int(saved["data_position"]))


def _resume(checkpoint: CheckpointConfig, root: Path, student) -> LoopState:
    """The loop state to start from: the checkpoint's (``checkpoint.resume`` auto, required) or fresh."""
    from megatron_tropd.checkpoint import CheckpointError, load_checkpoint

    saved = None
    if checkpoint.resume != "never":
        saved = load_checkpoint(root, student, on_damaged=checkpoint.on_damaged)
    if saved is None and checkpoint.resume == "required":  # pre-flight checks this; a race may not
        raise CheckpointError(f"checkpoint.resume=required but {root} holds no checkpoint to resume from")
    return LoopState.from_dict(saved) if saved is not None else LoopState()


def ensure_teacher_weight(job: Job) -> None:
    """Give the student its ranks' rows of the teacher's output layer when the method needs them and it
    has none yet (collective on every rank; ``training.attach_teacher_weight``)."""
    from megatron_tropd.training import attach_teacher_weight

    method = job.config.method
    if method.hidden_payload and not job.teacher_weight_attached:
        if method.teacher_payload != "hidden":
            logger.info(
                "method %r reads an exact full-vocabulary divergence: the teacher payload is 'hidden' "
                "(method.teacher_payload=%r does not apply to it)", method.name, method.teacher_payload,
            )  # fmt: skip
        attach_teacher_weight(job.student, [job.teachers[name] for name in sorted(job.teachers)])
        job.teacher_weight_attached = True


def setup(config: RunConfig) -> tuple[Job, LoopState]:
    """Start the process group, build both models and the data, and resume when a checkpoint exists."""
    from megatron_tropd.runtime import init_distributed, set_seed

    info = init_distributed()
    config.validate(info.world_size)
    set_seed(config.seed)
    topology, student, teachers = _build_models(config)
    tokenizer = run_tokenizer(config)
    prompts = load_run_prompts(config, tokenizer)  # the same prompts feed rollouts and teacher scoring
    run_dir = Path(config.checkpoint.save_dir)
    loop_state = _resume(config.checkpoint, run_dir / "checkpoints", student)
    sampler = PromptSampler(prompts, config.data.shuffle_seed, loop_state.data_position)
    student_engine, teacher_engines = _engines(config, topology, student, teachers)
    eos = tokenizer.eos_token_id if tokenizer is not None else None
    job = Job(config, topology, student, teachers, student_engine, teacher_engines, sampler, eos, run_dir)
    ensure_teacher_weight(job)
    if config.eval.interval:
        job.evaluation = _in_training_eval(config, topology, student, tokenizer)
    return job, loop_state


def _sampling(job: Job, temperature: float, max_new_tokens: int, seed: int) -> SamplingParams:
    r = job.config.rollout
    stops = (job.eos_token_id,) if job.eos_token_id is not None else ()
    return SamplingParams(temperature, r.top_p, r.top_k, max_new_tokens, stops, seed)


def _requests(job: Job, step: int, prompts: list[Prompt]) -> list[GenerationRequest]:
    """All rollouts of the step; the first ``guided`` samples of each prompt continue a teacher prefix.

    With guidance off (``RunConfig.guidance_enabled``: the method's default unless set) the teacher
    generates nothing: every rollout is the student's own."""
    r = job.config.rollout
    guided = guided_samples_per_prompt(r.samples_per_prompt, r.guided_fraction, job.config.guidance_enabled)
    base = step * r.rollouts_per_step
    plain = [
        GenerationRequest(p.token_ids, base + i * r.samples_per_prompt + j)
        for i, p in enumerate(prompts)
        for j in range(r.samples_per_prompt)
    ]
    limit = max_prefix_length(step, job.config.train_steps, r.max_new_tokens, r.guidance_schedule)
    if guided == 0 or limit == 0:
        return plain
    guided_rows = [i * r.samples_per_prompt + j for i in range(len(prompts)) for j in range(guided)]
    guided_requests = [plain[row] for row in guided_rows]
    responses = _teacher_responses(job, guided_requests, _routes(job, prompts, guided_rows))
    lengths = draw_prefix_lengths(r.seed, step, [plain[row].sample_id for row in guided_rows],
                                  [len(x) for x in responses], limit)  # fmt: skip
    for row, response, length in zip(guided_rows, responses, lengths, strict=True):
        # The prefix counts against the response budget: the student writes max_new_tokens - l tokens.
        plain[row] = GenerationRequest(
            plain[row].prompt_token_ids,
            plain[row].sample_id,
            tuple(response[:length]),
            r.max_new_tokens - length,
        )
    return plain


def _routes(job: Job, prompts: list[Prompt], rows: list[int] | None = None) -> list[str]:
    """The teacher of each rollout row (of ``rows`` only, when given): its prompt's (``RunConfig.route``)."""
    per_prompt = job.config.rollout.samples_per_prompt
    routes = [job.config.route(getattr(p, "domain", None)) for p in prompts for _ in range(per_prompt)]
    return routes if rows is None else [routes[row] for row in rows]


def _teacher_responses(job: Job, requests: list[GenerationRequest], routes: list[str]) -> list[list[int]]:
    """Each guided request's full teacher response, written by the teacher it is routed to (one
    collective generation per teacher, in name order)."""
    r = job.config.rollout
    sampling = _sampling(job, r.teacher_temperature, r.max_new_tokens, r.seed + 1)
    responses: list[list[int]] = [[] for _ in requests]
    for name in sorted(job.teacher_engines):
        rows = [row for row, route in enumerate(routes) if route == name]
        if not rows:
            continue
        out = generate_data_parallel(job.teacher_engines[name], [requests[row] for row in rows], sampling)
        for row, result in zip(rows, out, strict=True):
            responses[row] = result.generated_token_ids
    return responses


def rollout(job: Job, step: int) -> tuple[RolloutBatch, dict, list[str]]:
    """Generate the step's global rollout batch (identical on every rank), its length statistics and
    each row's teacher."""
    r = job.config.rollout
    prompts = job.sampler.next_batch(r.prompts_per_step)
    requests = _requests(job, step, prompts)
    sampling = _sampling(job, r.temperature, r.max_new_tokens, r.seed)
    results = generate_data_parallel(job.student_engine, requests, sampling)
    batch = to_rollout_batch(results, pad_token_id=0).to(default_device())
    lengths = [len(x.generated_token_ids) + x.prefix_length for x in results]
    prefix_tokens = sum(x.prefix_length for x in results)
    stats = {
        "response_length": sum(lengths) / len(lengths),
        "prefix_share": prefix_tokens / max(sum(lengths), 1),
    }
    return batch, stats, _routes(job, prompts)


class StopRequest:
    """SIGUSR1 / SIGTERM (Slurm's warning before pre-emption or the time limit, scancel, requeue).

    The handlers are ``signals.StopSignals``, installed once per process: by ``python -m
    megatron_tropd.train`` before torch loads, else here, before the models are built, so an early
    signal is deferred to the end of the first step.
    """

    def __init__(self):
        self.signals = StopSignals.install()

    @property
    def requested(self) -> bool:
        return self.signals.requested

    def agreed(self, last: bool = False) -> bool:
        """True on every rank when any rank was signalled (all ranks must stop at the same step).

        ``last``: this is the run's final step; stopping there is a normal end (exit 0, no requeue).
        """
        flag = torch.tensor([int(self.requested)], device=default_device())
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        stopping = bool(flag.item())
        if stopping and not last:
            self.signals.honoured = True  # the run stops early: exit with REQUEUE_EXIT_CODE
        return stopping


def train_one_step(job: Job, step: int) -> StepRecord:
    """Rollout -> score -> trust draw -> (updates_per_batch) optimizer updates; returns the step's record."""
    from megatron_tropd.scoring import ScoringSpec, score_batch
    from megatron_tropd.training import batch_context

    config = job.config
    ensure_teacher_weight(job)  # a no-op after the first step, or when the method needs no hidden payload
    started = time.perf_counter()
    batch, stats, routes = rollout(job, step)
    generated = time.perf_counter()
    spec = ScoringSpec.for_method(
        config.student.vocab_size, config.method, config.optim.micro_batch_size, config.packing_tokens,
        teacher_hidden_size=max(teacher.config.hidden_size for teacher in job.teachers.values()),
    )  # fmt: skip
    scored = score_batch(batch, job.student.placed, job.scoring_teachers(routes), spec, step)
    extra = _per_teacher(job, scored, routes, spec.row_lengths(batch))
    context = batch_context(
        config.method, scored, step, config.train_steps, job.topology.student, config.guidance_enabled
    )
    scored_at = time.perf_counter()
    for _ in range(config.optim.updates_per_batch):
        result = job.student.train_step(scored, config.method, context)
        _count_nonfinite(job, step, result.nonfinite_skipped, batch)
    trained = time.perf_counter()
    return StepRecord(
        step=step, metrics=result.metrics, grad_norm=result.grad_norm, learning_rate=result.learning_rate,
        rollout=stats, trained_tokens=int(batch.loss_mask.sum()),
        seconds=PhaseSeconds(generated - started, scored_at - generated, trained - scored_at),
        nonfinite_skipped=result.nonfinite_skipped, nonfinite_skipped_total=job.nonfinite_total,
        extra=extra,
    )  # fmt: skip


def _per_teacher(job: Job, scored: RolloutBatch, routes: list[str], lengths) -> dict[str, float]:
    """Per-teacher trust, outlier share and reward of a multi-teacher job (nothing for one teacher)."""
    from megatron_tropd.scoring import per_teacher_metrics

    if len(job.teachers) == 1:
        return {}
    rows = job.student.placed.rows(len(routes), lengths)
    return per_teacher_metrics(scored, routes[rows], sorted(job.teachers), job.topology.student)


def _save(job: Job, step: int, in_background: bool = False) -> None:
    """Save ``step`` (a pending background save is published first); ``in_background``: return once the
    state is staged, the files being written while training goes on (``checkpoint.async_save``)."""
    from megatron_tropd.checkpoint import save_checkpoint

    loop_state = LoopState(step, job.sampler.position).to_dict()
    checkpoint = job.config.checkpoint
    save_checkpoint(
        job.run_dir / "checkpoints", step, job.student, loop_state, checkpoint.keep_last,
        optimizer_format=checkpoint.optimizer_format, async_save=in_background,
    )  # fmt: skip


def _save_or_publish(job: Job, done: int, final: bool) -> None:
    """After ``done`` steps: save when due (synchronously when ``final``: a stop or the last step), else
    publish a background save whose writers have all finished (collective, without waiting)."""
    from megatron_tropd.checkpoint import finalize_pending_save

    checkpoint = job.config.checkpoint
    if final or done % checkpoint.save_interval == 0:
        _save(job, done, in_background=checkpoint.async_save and not final)
    else:
        finalize_pending_save(blocking=False)


def run(config: RunConfig) -> list[dict]:
    """Train ``config`` from its latest checkpoint (or from scratch) to ``config.train_steps``.

    Returns the rows of the steps this process logged (``StepRecord.row()``, on the reporting rank; empty
    elsewhere).
    """
    from megatron_tropd.runtime import shutdown_distributed

    configure_console()  # rank 0's INFO lines; python -m megatron_tropd.train has called it already
    stop = StopRequest()  # before the models exist: a signal during set-up waits for the first step
    lock = run_lock.take(config.checkpoint.save_dir)  # rank 0: refuse a second live job on this root
    job, loop_state = setup(config)
    reporting = job.topology.student.is_reporting_rank
    log = MetricsLog.for_run(config, job.run_dir, active=reporting, start_step=loop_state.step)
    records = []
    if log.active:
        (job.run_dir / "config.json").write_text(json.dumps(asdict(config), indent=2, default=str))
        write_yaml(config, job.run_dir / "config.yaml")  # `--config <run dir>/config.yaml` reruns it
    try:
        if job.evaluation is not None and loop_state.step == 0 and job.config.eval.at_start:
            log.write_eval(0, evaluate_student(job, 0))  # the starting point of the accuracy curve
        for step in range(loop_state.step, config.train_steps):
            record = train_one_step(job, step)
            log.write_step(record)
            if log.active:
                records.append(record.row())
            done, stopping = step + 1, stop.agreed(last=step + 1 == config.train_steps)  # collective
            if _evaluation_due(job, done):
                log.write_eval(done, evaluate_student(job, done))
            _save_or_publish(job, done, final=stopping or done == config.train_steps)
            if stopping:
                break
    finally:
        from megatron_tropd.checkpoint import abandon_pending_save

        abandon_pending_save()  # a failed run leaves its unfinished background save unpublished
        log.close()
        shutdown_distributed()
        run_lock.release(lock)
    return records
