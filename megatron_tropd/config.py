"""Typed run configuration: one dataclass per concern, defaults in one place, validation without I/O.

Every default below comes from ``docs/method.md`` (the paper's settings, or the decision recorded there
where the paper is silent). ``validate()`` raises ``ValueError`` naming the field, the bad value and what
is allowed, so a wrong recipe or command-line override fails before any process group starts.

Sections still to come from other issues: model, parallel, rollout, optim, data, eval, run (and a
top-level ``RunConfig`` holding them all). This module imports nothing from the package: everything else
depends on it, never the reverse.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass

# Loss methods selectable by ``MethodConfig.name``; ``losses.METHOD_REGISTRY`` implements exactly these.
# "reopold" is an alias of "clip_outlier": the paper's REOPOLD rows reproduce Clip Outlier exactly.
METHOD_NAMES = (
    "opd",
    "fkl",
    "jsd",
    "entropy_opd",
    "clip_outlier",
    "reopold",
    "mask_outlier",
    "reopold_2stage",
    "eopd",
    "aopd",
    "tropd",
    "tropd_mask",
    "tropd_clip",
    "tropd_aopd",
)

# Top-k forward-KL families; must equal ``megatron_tropd.ops.FKL_FAMILIES`` (a test checks it). Repeated
# here so that config stays import-free and can be validated before torch is even touched.
FKL_FAMILIES = ("raw", "renorm", "tail")


def closest_name_hint(name: str, allowed: tuple[str, ...]) -> str:
    """``"; did you mean 'x'?"`` for the closest allowed name, or ``""`` when nothing is close."""
    matches = difflib.get_close_matches(str(name), allowed, n=1, cutoff=0.5)
    return f"; did you mean {matches[0]!r}?" if matches else ""


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


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
    """Loss method, one of ``METHOD_NAMES``; "reopold" is an alias of "clip_outlier"."""

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
    """REOPOLD-2stage switches from reward masking to entropy masking at round(fraction * total_steps)."""

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

    @property
    def outlier_tau(self) -> float:
        """tau = log(lambda / (1 - lambda)); log(0.25) ~ -1.386 for lambda = 0.2."""
        return math.log(self.outlier_lambda / (1.0 - self.outlier_lambda))

    def reopold_switch_step(self, total_steps: int) -> int:
        """First training step of REOPOLD-2stage's entropy (refinement) stage."""
        return round(self.reopold_switch_fraction * total_steps)

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first invalid field and what it accepts."""
        _check_choice("method.name", self.name, METHOD_NAMES)
        _check_int("method.topk", self.topk, 1, "the number of teacher top-k ids per token, 64 in the paper")
        _check_choice("method.fkl_family", self.fkl_family, FKL_FAMILIES)
        _check_range("method.ppo_clip_eps", self.ppo_clip_eps, 0.0, 1.0, "()", "PPO ratio clip, 0.2 default")
        _check_range("method.guidance_beta", self.guidance_beta, 0.0, math.inf, "[)", "prefix NLL weight")
        _check_range("method.jsd_beta", self.jsd_beta, 0.0, 1.0, "()", "JSD mixture weight, 0.5 default")
        _check_range("method.outlier_lambda", self.outlier_lambda, 0.0, 1.0, "()", "tau = log(l / (1 - l))")
        for field in ("entropy_top_fraction", "reopold_entropy_top_fraction"):
            _check_range(f"method.{field}", getattr(self, field), 0.0, 1.0, "(]", "fraction of tokens kept")
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
    """Sequences per microbatch (per data-parallel rank)."""

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
        _check_int("optim.updates_per_batch", self.updates_per_batch, 1, "updates per rollout batch")
