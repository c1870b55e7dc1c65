"""The student: Megatron model + DDP + optimizer + LR schedule, and one distillation training step.

The step runs Megatron's pipeline schedule over the rollout microbatches. On the last stage each
microbatch's loss comes from the vocab-parallel ops (student log-probs at the sampled token and at the
teacher's top-k ids, gradient written back into the logits' own storage) and the configured method;
``loss_func`` returns ``(loss_sum, num_tokens, metrics)`` with ``calculate_per_token_loss=True``, so
``finalize_model_grads`` divides the summed gradients by the global number of loss-bearing tokens.
With the hidden teacher payload the exact full-vocabulary divergences are computed there too, from the
batch's ``teacher_hidden`` and the teacher's output-layer rows of this rank's vocabulary partition
(``Student.teacher_weight``, set once per job by ``attach_teacher_weight``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import torch

from megatron_tropd.batch import RolloutBatch
from megatron_tropd.config import MethodConfig, OptimConfig
from megatron_tropd.losses import (
    FULL_DIVERGENCE_FIELDS,
    MethodContext,
    TokenSignals,
    loss_sum_and_metrics,
    method_context,
    reduce_metrics,
)
from megatron_tropd.methods import method_spec
from megatron_tropd.models import ModelConfig, build_gpt_model
from megatron_tropd.ops import vocab_parallel_full_divergence_with_stats, vocab_parallel_token_stats
from megatron_tropd.ops.vocab_parallel import vocab_parallel_token_stats_with_tail
from megatron_tropd.packing import packed_rollout_microbatches
from megatron_tropd.pipeline import run_microbatches
from megatron_tropd.placed import PlacedModel
from megatron_tropd.topology import ModelGroups


@dataclass
class Student:
    """Everything that trains, on the student's layout."""

    model: torch.nn.Module  # megatron DistributedDataParallel around the GPTModel stage
    optimizer: object  # MegatronOptimizer
    scheduler: object  # OptimizerParamScheduler
    groups: ModelGroups
    model_config: ModelConfig
    optim_config: OptimConfig
    teacher_weight: torch.Tensor | tuple[torch.Tensor, ...] | None = None
    """The teacher's output-layer rows of this rank's vocabulary partition ``[V_local, H_t]`` (fp32, last
    stage only), for the full-vocabulary divergences; with several teachers one per teacher, in name
    order (``RolloutBatch.teacher_index``); None until ``attach_teacher_weight``."""

    @property
    def module(self) -> torch.nn.Module:
        """The unwrapped GPTModel stage."""
        return self.model.module

    @property
    def placed(self) -> PlacedModel:
        """The student on its layout; its forward passes go through the DDP wrapper."""
        return PlacedModel(self.module, self.groups, self.model_config, runner=self.model)

    def train_step(self, batch: RolloutBatch, method: MethodConfig, context: MethodContext) -> StepResult:
        """One optimizer update on this rank's rows of a scored rollout batch (``train_step``)."""
        return train_step(self, batch, method, context)


@dataclass
class StepResult:
    metrics: dict[str, float]  # token-averaged, reduced over microbatches and DP (last stage only)
    grad_norm: float
    learning_rate: float
    update_successful: bool
    nonfinite_skipped: bool = False  # a non-finite loss or gradient on some rank: no rank updated


def _optimizer(model, optim: OptimConfig, params_dtype: torch.dtype):
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    config = OptimizerConfig(
        optimizer="adam", lr=optim.lr, min_lr=optim.min_lr, weight_decay=optim.weight_decay,
        adam_beta1=optim.adam_beta1, adam_beta2=optim.adam_beta2, adam_eps=optim.adam_eps,
        clip_grad=optim.clip_grad, bf16=params_dtype == torch.bfloat16, params_dtype=params_dtype,
        use_distributed_optimizer=optim.use_distributed_optimizer,
    )  # fmt: skip
    return get_megatron_optimizer(config, [model])


def _scheduler(optimizer, optim: OptimConfig, total_steps: int):
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    decay_style = {"constant": "constant", "cosine": "cosine", "linear": "linear"}[optim.lr_schedule]
    return OptimizerParamScheduler(
        optimizer, init_lr=0.0 if optim.warmup_steps else optim.lr, max_lr=optim.lr, min_lr=optim.min_lr,
        lr_warmup_steps=optim.warmup_steps, lr_decay_steps=max(total_steps, optim.warmup_steps + 1),
        lr_decay_style=decay_style, start_wd=optim.weight_decay, end_wd=optim.weight_decay,
        wd_incr_steps=max(total_steps, 1), wd_incr_style="constant",
    )  # fmt: skip


def build_student(
    model_config: ModelConfig,
    optim: OptimConfig,
    groups: ModelGroups,
    total_steps: int,
    seed: int,
    params_dtype: torch.dtype | None = None,
) -> Student:
    """Build the student stage of this rank, wrap it in DDP and give it an optimizer and schedule.
    ``params_dtype``: bf16 or fp32 (None: bf16 on GPU, fp32 on CPU); main weights stay fp32 either way."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads

    optim.validate()
    if params_dtype == torch.float16:
        raise ValueError("the student trains in bf16 or fp32, not fp16 (see train.precision)")
    module = build_gpt_model(
        model_config, groups.pg_collection, pre_process=groups.is_first_stage,
        post_process=groups.is_last_stage, tensor_parallel_size=groups.layout.tensor_parallel,
        pipeline_parallel_size=groups.layout.pipeline_parallel, params_dtype=params_dtype, seed=seed,
    )  # fmt: skip
    module.config.calculate_per_token_loss = True  # global token normalisation (see module docstring)
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, use_distributed_optimizer=optim.use_distributed_optimizer
    )
    model = DistributedDataParallel(module.config, ddp_config, module)
    module.config.finalize_model_grads_func = finalize_model_grads
    module.config.no_sync_func = model.no_sync
    params_dtype = next(module.parameters()).dtype
    optimizer = _optimizer(model, optim, params_dtype)
    return Student(model, optimizer, _scheduler(optimizer, optim, total_steps), groups, model_config, optim)


@dataclass(frozen=True)
class FullDivergences:
    """Which exact full-vocabulary divergences a microbatch's signals carry, and their inputs."""

    # [V_local, H_t]: the teacher's rows of this rank's partition (a tuple of them for several teachers)
    teacher_weight: torch.Tensor | tuple[torch.Tensor, ...]
    with_grad: tuple[str, ...] = ()  # kinds (``ops.FULL_DIVERGENCES``) the loss reads
    metrics_only: tuple[str, ...] = ()  # kinds only the metrics read: computed without a graph
    jsd_beta: float = 0.5


def full_divergences(
    method: MethodConfig, batch: RolloutBatch, teacher_weight: torch.Tensor | tuple | None
) -> FullDivergences | None:
    """What ``method`` reads from the full vocabulary: its ``MethodSpec.full_divergence`` with gradient,
    and the full forward KL of the ``bias/*`` metrics whenever the batch carries the teacher's hidden
    states; None without them. Errors name what is missing."""
    kind = method_spec(method.name).full_divergence
    if batch.teacher_hidden is None:
        if kind is not None:
            raise ValueError(
                f"method {method.name!r} needs the teacher's hidden states but the batch has no "
                "teacher_hidden: score it with ScoringSpec.for_method(..., teacher_hidden_size=H_t)"
            )
        return None
    if teacher_weight is None:
        raise ValueError(
            "the batch carries teacher_hidden but the student has no teacher_weight: call "
            "training.attach_teacher_weight(student, teacher) once per job (collective) before training"
        )
    with_grad = () if kind is None else (kind,)
    metrics_only = () if "forward_kl" in with_grad else ("forward_kl",)
    return FullDivergences(teacher_weight, with_grad, metrics_only, method.jsd_beta)


def _full_divergence_signals(logits, batch, tp_group, vocab_size, full: FullDivergences) -> dict:
    """``TokenSignals`` fields ``full_*`` ``[T]`` on the student tokens (0 elsewhere, never computed), in
    one pass over the teacher's vocabulary: the loss's kind with its gradient, the metrics' kinds beside
    it without one."""
    student_tokens = batch.loss_mask & ~batch.is_teacher_prefix
    kinds = (*full.with_grad, *full.metrics_only)
    with torch.set_grad_enabled(torch.is_grad_enabled() and bool(full.with_grad)):
        result = vocab_parallel_full_divergence_with_stats(
            logits, batch.teacher_hidden, full.teacher_weight, tp_group, vocab_size, kinds[0],
            full.jsd_beta, token_mask=student_tokens, also=kinds[1:], teacher_index=batch.teacher_index,
        )  # fmt: skip
    values = {kinds[0]: result.value, **result.also}
    return {FULL_DIVERGENCE_FIELDS[kind]: values[kind].reshape(-1) for kind in kinds}


def student_signals(
    logits: torch.Tensor,
    batch: RolloutBatch,
    tp_group,
    vocab_size: int,
    with_tail: bool = False,
    labels: torch.Tensor | None = None,
    full: FullDivergences | None = None,
) -> TokenSignals:
    """``TokenSignals`` of one microbatch from the student's TP-sharded logits ``[b, S, V/TP]``.

    ``with_tail`` adds the student's exact log-mass outside the teacher's top-k (the ``tail`` FKL family).
    ``labels``: the microbatch's labels when they are not ``batch.labels`` (a packed microbatch's).
    ``full``: the exact full-vocabulary divergences to add (``full_divergences``).
    """
    topk = batch.topk_ids.shape[-1]
    labels = batch.labels if labels is None else labels
    ids = torch.cat([labels.unsqueeze(-1), batch.topk_ids], dim=-1)  # [b, S, 1 + k]
    # An in-place backward overwrites the logits with their gradient, which the full divergences'
    # backward still has to read: with those, each op writes a gradient buffer of its own.
    inplace = full is None or not full.with_grad
    lp_tail = None
    if with_tail:
        log_probs, _, lp_tail = vocab_parallel_token_stats_with_tail(
            logits, ids, tp_group, vocab_size, 1, with_entropy=False, inplace_backward=inplace
        )
        lp_tail = lp_tail.reshape(-1)
    else:
        log_probs, _ = vocab_parallel_token_stats(
            logits, ids, tp_group, vocab_size, with_entropy=False, inplace_backward=inplace
        )
    entropy_teacher = batch.entropy_teacher.reshape(-1) if batch.entropy_teacher is not None else None
    divergences = {} if full is None else _full_divergence_signals(logits, batch, tp_group, vocab_size, full)
    return TokenSignals(
        lp_student=log_probs[..., 0].reshape(-1),
        lp_student_old=batch.lp_student_old.reshape(-1),
        lp_teacher=batch.lp_teacher.reshape(-1),
        lp_student_topk=log_probs[..., 1:].reshape(-1, topk),
        lp_teacher_topk=batch.topk_logprobs.reshape(-1, topk),
        entropy_student_old=batch.entropy_student_old.reshape(-1),
        trust_mask=batch.trust_mask.reshape(-1),
        is_teacher_prefix=batch.is_teacher_prefix.reshape(-1),
        loss_mask=batch.loss_mask.reshape(-1),
        entropy_teacher=entropy_teacher,
        lp_student_tail=lp_tail,
        **divergences,
    )


def attach_teacher_weight(student: Student, teacher: PlacedModel | list[PlacedModel]) -> None:
    """Give ``student`` the teacher's output-layer rows of each rank's vocabulary partition
    (``scoring.teacher_weight_for_student``); several teachers (a list, in name order): a tuple of their
    rows. Collective on every rank, once per job."""
    from megatron_tropd.scoring import teacher_weight_for_student

    if isinstance(teacher, PlacedModel):
        student.teacher_weight = teacher_weight_for_student(teacher, student.placed)
        return
    weights = tuple(teacher_weight_for_student(one, student.placed) for one in teacher)
    student.teacher_weight = None if weights[0] is None else (weights[0] if len(weights) == 1 else weights)


@dataclass
class Microbatch:
    """One microbatch of the training schedule: padded rows ``[b, S]``, or packed rollouts ``[1, T]``."""

    batch: RolloutBatch
    labels: torch.Tensor
    position_ids: torch.Tensor
    packed_seq_params: object | None = None  # Megatron's PackedSeqParams (THD) when packed

    def forward(self, model: torch.nn.Module) -> torch.Tensor:
        packed = {} if self.packed_seq_params is None else {"packed_seq_params": self.packed_seq_params}
        return model(self.batch.tokens, self.position_ids, None, **packed)


def training_microbatches(
    batch: RolloutBatch, optim: OptimConfig, pipeline_parallel: int
) -> list[Microbatch]:
    """``batch``'s rows as the schedule's microbatches: packed, at most ``optim.max_tokens_per_microbatch``
    tokens each, when ``optim.sequence_packing`` (shapes equal across microbatches under pipeline
    parallelism); else ``optim.micro_batch_size`` padded rows each."""
    if optim.sequence_packing and optim.max_tokens_per_microbatch:
        packs = packed_rollout_microbatches(batch, optim.max_tokens_per_microbatch, pipeline_parallel > 1)
        return [Microbatch(mb, labels, p.position_ids, p.packed_seq_params()) for mb, labels, p in packs]
    return [Microbatch(mb, mb.labels, mb.position_ids) for mb in batch.split(optim.micro_batch_size)]


def _loss_func(logits, microbatch: Microbatch, tp_group, vocab_size, method, context, teacher_weight):
    full = full_divergences(method, microbatch.batch, teacher_weight)
    signals = student_signals(
        logits, microbatch.batch, tp_group, vocab_size, with_tail=method.fkl_family == "tail",
        labels=microbatch.labels, full=full,
    )  # fmt: skip
    return loss_sum_and_metrics(signals, method, context)


def _forward_step(data_iterator, model, *, tp_group, vocab_size, method, context, teacher_weight=None):
    microbatch = next(data_iterator)
    loss_func = partial(
        _loss_func, microbatch=microbatch, tp_group=tp_group, vocab_size=vocab_size, method=method,
        context=context, teacher_weight=teacher_weight,
    )  # fmt: skip
    return microbatch.forward(model), loss_func


def _local_loss_nonfinite(per_microbatch, loss_key: str) -> bool:
    """Whether this rank's summed ``loss_key`` is NaN or infinite. Only the sum is checked: the reduced
    mean is NaN, harmlessly, when no token carried the loss."""
    sums = [metrics[loss_key][0] for metrics in per_microbatch if loss_key in metrics]
    return bool(sums) and not bool(torch.isfinite(torch.stack(sums).sum()))


def nonfinite_agreed(locally_nonfinite: bool, world_group=None) -> bool:
    """One MAX all-reduce of the local flag over ``world_group`` (None = the default world): a
    non-finite loss or gradient on any rank makes every rank skip the same update."""
    flag = torch.tensor([1.0 if locally_nonfinite else 0.0])
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX, group=world_group)
    return bool(flag.item() > 0)


def _update(student: Student, batch: RolloutBatch, forward_step, loss_key: str) -> StepResult:
    """Zero the gradients, run the pipeline schedule over ``batch``'s microbatches, then step the
    optimizer, or skip the update on every rank when any rank saw a non-finite loss or gradient."""
    microbatches = training_microbatches(batch, student.optim_config, student.groups.layout.pipeline_parallel)
    student.model.zero_grad_buffer()
    student.optimizer.zero_grad()
    per_microbatch = run_microbatches(
        student.placed, forward_step, microbatches, seq_length=microbatches[0].batch.seq_length,
        micro_batch_size=microbatches[0].batch.num_sequences, forward_only=False,
    )  # fmt: skip
    # prepare_grads copies the reduced grads where the optimizer reads them; step() repeats that copy,
    # which is idempotent without a grad scaler (build_student uses none), so the norm seen here is
    # the norm step() would clip. get_grad_norm reduces over the optimizer's grad-stats group.
    found_inf = bool(student.optimizer.prepare_grads())
    grad_norm = float(student.optimizer.get_grad_norm() or 0.0)
    local_loss_bad = per_microbatch is not None and _local_loss_nonfinite(per_microbatch, loss_key)
    skipped = nonfinite_agreed(found_inf or not math.isfinite(grad_norm) or local_loss_bad)
    if skipped:  # no optimizer step, no scheduler step, nothing left to leak into the next update
        student.model.zero_grad_buffer()
        student.optimizer.zero_grad()
        update_successful = False
    else:
        update_successful = bool(student.optimizer.step()[0])
        if update_successful:
            student.scheduler.step(increment=1)
    metrics = reduce_metrics(per_microbatch, student.groups.dp_group) if student.groups.is_last_stage else {}
    learning_rate = student.optimizer.param_groups[0]["lr"]
    return StepResult(metrics, grad_norm, learning_rate, update_successful, skipped)


def train_step(
    student: Student, batch: RolloutBatch, method: MethodConfig, context: MethodContext
) -> StepResult:
    """One optimizer update on this rank's rows of a scored rollout batch."""
    forward_step = partial(
        _forward_step, tp_group=student.groups.tp_group, vocab_size=student.model_config.vocab_size,
        method=method, context=context, teacher_weight=student.teacher_weight,
    )  # fmt: skip
    return _update(student, batch, forward_step, "loss")


def _supervised_loss_func(logits, microbatch: Microbatch, tp_group, vocab_size: int):
    """Summed negative log-likelihood of the loss-bearing labels (``calculate_per_token_loss`` contract)."""
    log_probs, _ = vocab_parallel_token_stats(
        logits, microbatch.labels.unsqueeze(-1), tp_group, vocab_size, with_entropy=False,
        inplace_backward=True,
    )  # fmt: skip
    mask = microbatch.batch.loss_mask
    nll_sum = -(log_probs[..., 0] * mask).sum()
    num_tokens = mask.sum().to(torch.int)
    return nll_sum, num_tokens, {"nll": torch.stack([nll_sum.detach(), num_tokens.to(nll_sum.dtype)])}


def _supervised_forward_step(data_iterator, model, *, tp_group, vocab_size):
    microbatch = next(data_iterator)
    loss_func = partial(
        _supervised_loss_func, microbatch=microbatch, tp_group=tp_group, vocab_size=vocab_size
    )
    return microbatch.forward(model), loss_func


def supervised_step(student: Student, batch: RolloutBatch) -> StepResult:
    """One supervised fine-tuning update (token-averaged NLL of the ``loss_mask`` labels); the metrics
    hold ``nll``. Used to prepare models (the demo's teacher and student), not by the distillation loop."""
    forward_step = partial(
        _supervised_forward_step, tp_group=student.groups.tp_group,
        vocab_size=student.model_config.vocab_size,
    )  # fmt: skip
    return _update(student, batch, forward_step, "nll")


def batch_context(
    method: MethodConfig,
    batch: RolloutBatch,
    step: int,
    total_steps: int,
    groups: ModelGroups,
    guidance: bool | None = None,
) -> MethodContext:
    """The rollout batch's ``MethodContext``: entropy cut-offs over the global batch and whether the
    guidance term is on (the run's ``RunConfig.guidance_enabled``; None = the method's default). Only the
    last stage computes anything, the other stages never evaluate the loss."""
    if not groups.is_last_stage:
        return MethodContext(step=step, total_steps=total_steps, guidance=guidance)
    student_tokens = batch.loss_mask & ~batch.is_teacher_prefix
    return method_context(
        method, batch.entropy_student_old, student_tokens, step, total_steps, groups.dp_group,
        guidance=guidance,
    )  # fmt: skip
