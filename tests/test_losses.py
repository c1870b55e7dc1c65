"""Every distillation loss against an independent, loop-by-loop transcription of ``docs/method.md``.

The transcriptions below index single tokens and top-k entries with Python loops and branches, and take
gradients with autograd through those scalar formulas; they share no code with ``megatron_tropd.losses``
or ``megatron_tropd.ops``. Inputs are small explicit probability tables so that each case is checkable by
hand (which side of tau, of the AOPD gate and of the trust mask each token falls on).

The full-vocabulary methods read their exact divergences as given inputs there; a last section checks
them end to end from explicit fp64 student and teacher logits through ``training.student_signals``
(loss, gradient w.r.t. the logits, ``bias/*`` metrics) against direct formulas.
"""

from __future__ import annotations

import dataclasses
import math
import types

import pytest
import torch
import torch.distributed as dist

from megatron_tropd import ops
from megatron_tropd.config import FKL_FAMILIES, METHOD_NAMES, MethodConfig
from megatron_tropd.losses import (
    LOSS_FUNCTIONS,
    METHOD_REGISTRY,
    MethodContext,
    TokenSignals,
    entropy_quantile_threshold,
    get_method,
    loss_sum_and_metrics,
    megatron_loss_func,
    reduce_metrics,
    token_loss,
)
from megatron_tropd.methods import METHOD_SPECS
from megatron_tropd.spawn import run_on_ranks
from tests.loss_helpers import count_valid_tokens, make_method_context, microbatch_loss

DTYPE = torch.float64
NAN = float("nan")

# ---------------------------------------------------------------------------------------------------------
# Hand-checkable batch: 8 tokens, teacher top-k of size 3. tau = log(0.25): A > tau iff pT / pS_old > 1/4.
# ---------------------------------------------------------------------------------------------------------
#          pS_old  pT     ratio  M      prefix  valid  H_S   H_T    (A vs tau, AOPD gate pT <= pS)
TOKENS = [
    (0.50, 0.60, 1.00, True, False, True, 2.0, 0.90),  # A > 0, gate 0, trusted
    (0.50, 0.25, 1.30, False, False, True, 0.5, 0.30),  # tau < A < 0, gate 1, outlier
    (0.80, 0.05, 0.70, False, False, True, 1.5, 1.20),  # A < tau, gate 1, outlier
    (0.40, 0.02, 1.10, True, False, True, 0.1, 0.85),  # A < tau, gate 1, trusted (lucky draw)
    (0.10, 0.30, 0.75, True, False, True, 3.0, 0.50),  # A > 0, gate 0, trusted
    (0.20, 0.70, 1.25, False, True, True, 1.0, 2.00),  # teacher-prefix token: guidance only
    (0.30, 0.10, 0.95, False, False, True, 0.7, 0.79),  # tau < A < 0, gate 1, outlier
    (NAN, NAN, NAN, True, False, False, NAN, NAN),  # padding: garbage values, no loss, no gradient
]
# teacher / student probabilities at the teacher's top-3 ids (row 2 deliberately not sorted)
TEACHER_TOPK = [
    [0.60, 0.20, 0.10],
    [0.40, 0.25, 0.15],
    [0.10, 0.05, 0.50],  # EOPD's top-2 here is {2, 0}, not the first two ids
    [0.30, 0.30, 0.20],
    [0.45, 0.30, 0.10],
    [0.70, 0.10, 0.05],
    [0.35, 0.20, 0.15],
    [NAN, NAN, NAN],
]
STUDENT_TOPK = [
    [0.50, 0.10, 0.05],
    [0.50, 0.05, 0.20],
    [0.01, 0.02, 0.80],
    [0.40, 0.02, 0.10],
    [0.10, 0.05, 0.60],
    [0.20, 0.30, 0.10],
    [0.30, 0.30, 0.10],
    [NAN, NAN, NAN],
]

# exact full-vocabulary divergences per token (the ops compute them; here they are given inputs)
FULL_FKL = [0.40, 0.90, 2.10, 1.70, 0.30, 0.20, 0.55, NAN]
FULL_RKL = [0.35, 1.10, 1.60, 2.40, 0.25, 0.30, 0.45, NAN]
FULL_JSD = [0.08, 0.20, 0.41, 0.37, 0.06, 0.05, 0.11, NAN]

DEFAULT_CONFIG = dict(topk=3, eopd_topk=2)
# Non-default values catch swapped or dropped weights (e.g. beta vs 1 - beta at jsd_beta = 0.5).
ALTERED_CONFIG = dict(
    topk=3,
    eopd_topk=2,
    jsd_beta=0.3,
    guidance_beta=0.05,
    outlier_lambda=0.3,
    ppo_clip_eps=0.15,
    eopd_lambda_fkl=0.7,
    eopd_entropy_threshold=0.6,
    eopd_family="raw",
    fkl_family="tail",
    aopd_tau=0.12,
)


def make_signals(one_update: bool, trust=None) -> TokenSignals:
    """The table above as TokenSignals with leaf tensors for the two differentiable inputs."""
    column = list(zip(*TOKENS, strict=True))
    lp_old = torch.tensor(column[0], dtype=DTYPE).log()
    ratio = torch.ones(len(TOKENS), dtype=DTYPE) if one_update else torch.tensor(column[2], dtype=DTYPE)
    return TokenSignals(
        lp_student=(lp_old + ratio.log()).requires_grad_(),
        lp_student_old=lp_old,
        lp_teacher=torch.tensor(column[1], dtype=DTYPE).log(),
        lp_student_topk=torch.tensor(STUDENT_TOPK, dtype=DTYPE).log().requires_grad_(),
        lp_teacher_topk=torch.tensor(TEACHER_TOPK, dtype=DTYPE).log(),
        entropy_student_old=torch.tensor(column[6], dtype=DTYPE),
        entropy_teacher=torch.tensor(column[7], dtype=DTYPE),
        trust_mask=torch.tensor(column[3] if trust is None else trust),
        is_teacher_prefix=torch.tensor(column[4]),
        loss_mask=torch.tensor(column[5]),
        full_fkl=torch.tensor(FULL_FKL, dtype=DTYPE).requires_grad_(),
        full_rkl=torch.tensor(FULL_RKL, dtype=DTYPE).requires_grad_(),
        full_jsd=torch.tensor(FULL_JSD, dtype=DTYPE).requires_grad_(),
    )


# ---------------------------------------------------------------------------------------------------------
# Independent transcription of method.md, one token at a time
# ---------------------------------------------------------------------------------------------------------


def ref_pg(advantage: float, lp_s, lp_s_old: float, eps: float):
    """-min(r A, clip(r) A), with clip written as explicit branches."""
    ratio = torch.exp(lp_s - lp_s_old)
    if ratio.item() < 1 - eps:
        clipped = torch.tensor(1 - eps, dtype=DTYPE)
    elif ratio.item() > 1 + eps:
        clipped = torch.tensor(1 + eps, dtype=DTYPE)
    else:
        clipped = ratio
    unclipped_obj, clipped_obj = ratio * advantage, clipped * advantage
    return -(unclipped_obj if unclipped_obj.item() <= clipped_obj.item() else clipped_obj)


def ref_fkl(lp_s_row, lp_t_row, family: str):
    """Top-k forward KL over the given ids: raw, renormalised inside V_k, or V_k plus a tail bucket."""
    p_t = [math.exp(v) for v in lp_t_row]
    p_s = [torch.exp(v) for v in lp_s_row]
    if family == "renorm":
        z_t, z_s = sum(p_t), sum(p_s)
        return sum(
            (p_t[i] / z_t) * (math.log(p_t[i] / z_t) - torch.log(p_s[i] / z_s)) for i in range(len(p_t))
        )
    raw = sum(p_t[i] * (lp_t_row[i] - lp_s_row[i]) for i in range(len(p_t)))
    if family == "raw":
        return raw
    tail_t, tail_s = 1 - sum(p_t), 1 - sum(p_s)
    return raw + tail_t * (math.log(tail_t) - torch.log(tail_s))


def ref_student_token(name: str, t: int, sig: TokenSignals, cfg: MethodConfig, ctx: MethodContext):
    lp_s, lp_s_old, lp_t = sig.lp_student[t], sig.lp_student_old[t].item(), sig.lp_teacher[t].item()
    lp_s_k, lp_t_k = list(sig.lp_student_topk[t]), [v.item() for v in sig.lp_teacher_topk[t]]
    trusted, h_s = bool(sig.trust_mask[t]), sig.entropy_student_old[t].item()
    advantage, eps = lp_t - lp_s_old, cfg.ppo_clip_eps
    tau = math.log(cfg.outlier_lambda / (1 - cfg.outlier_lambda))
    fkl = ref_fkl(lp_s_k, lp_t_k, cfg.fkl_family)
    zero = lp_s * 0.0
    if name == "opd":
        return ref_pg(advantage, lp_s, lp_s_old, eps)
    if name == "fkl":
        return fkl
    if name == "jsd":
        b = cfg.jsd_beta
        teacher = sum(
            math.exp(lp_t_k[i])
            * (lp_t_k[i] - torch.log(b * math.exp(lp_t_k[i]) + (1 - b) * torch.exp(lp_s_k[i])))
            for i in range(len(lp_t_k))
        )
        p_mix_old = b * math.exp(lp_t) + (1 - b) * math.exp(lp_s_old)
        student_adv = -(1 - b) * math.log(math.exp(lp_s_old) / p_mix_old)
        return b * teacher + ref_pg(student_adv, lp_s, lp_s_old, eps)
    if name == "entropy_opd":
        return ref_pg(advantage, lp_s, lp_s_old, eps) if h_s >= ctx.entropy_threshold else zero
    if name in ("clip_outlier", "reopold"):
        return ref_pg(max(advantage, tau), lp_s, lp_s_old, eps)
    if name == "mask_outlier":
        return ref_pg(advantage if advantage > tau else 0.0, lp_s, lp_s_old, eps)
    if name == "reopold_2stage":
        first_stage = ctx.step < math.ceil(cfg.reopold_switch_fraction * ctx.total_steps)
        keep = advantage >= tau if first_stage else h_s >= ctx.entropy_threshold
        return ref_pg(max(advantage, tau), lp_s, lp_s_old, eps) if keep else zero
    if name == "eopd":
        order = sorted(range(len(lp_t_k)), key=lambda i: -lp_t_k[i])[: cfg.eopd_topk]
        sub_fkl = ref_fkl([lp_s_k[i] for i in order], [lp_t_k[i] for i in order], cfg.eopd_family)
        gate = sig.entropy_teacher[t].item() > cfg.eopd_entropy_threshold
        return ref_pg(advantage, lp_s, lp_s_old, eps) + (cfg.eopd_lambda_fkl * sub_fkl if gate else zero)
    if name == "aopd":
        gate = math.exp(lp_t) - math.exp(lp_s_old) <= cfg.aopd_tau
        return fkl if gate else ref_pg(advantage, lp_s, lp_s_old, eps)
    if name in ("tropd", "fkl_outlier"):  # FKL Outlier = TrOPD's loss without guidance
        return ref_pg(advantage, lp_s, lp_s_old, eps) if trusted else fkl
    if name == "tropd_mask":
        return ref_pg(advantage, lp_s, lp_s_old, eps) if trusted else zero
    if name == "tropd_clip":
        return ref_pg(advantage if trusted else max(advantage, tau), lp_s, lp_s_old, eps)
    if name == "tropd_aopd":
        return ref_student_token("tropd", t, sig, cfg, ctx) + ref_student_token("aopd", t, sig, cfg, ctx)
    full = {"fkl_full": sig.full_fkl, "rkl_full": sig.full_rkl, "jsd_full": sig.full_jsd}
    if name in full:
        return full[name][t]
    if name == "tropd_full":
        return ref_pg(advantage, lp_s, lp_s_old, eps) if trusted else sig.full_fkl[t]
    raise AssertionError(name)


# method.md: guidance belongs to the TrOPD family only; every other method is fully on-policy by default.
GUIDED_BY_DEFAULT = {"tropd", "tropd_mask", "tropd_clip", "tropd_aopd", "tropd_full"}


def ref_guided(cfg: MethodConfig, ctx: MethodContext) -> bool:
    return cfg.name in GUIDED_BY_DEFAULT if ctx.guidance is None else ctx.guidance


def ref_token_loss(sig: TokenSignals, cfg: MethodConfig, ctx: MethodContext) -> torch.Tensor:
    losses = []
    for t in range(sig.num_tokens):
        if not sig.loss_mask[t]:
            losses.append(torch.zeros((), dtype=DTYPE))
        elif sig.is_teacher_prefix[t]:
            guided = ref_guided(cfg, ctx)
            losses.append(cfg.guidance_beta * (sig.lp_teacher[t].item() - sig.lp_student[t]) * float(guided))
        else:
            losses.append(torch.as_tensor(ref_student_token(cfg.name, t, sig, cfg, ctx), dtype=DTYPE))
    return torch.stack(losses)


FULL_FIELDS = ("full_fkl", "full_rkl", "full_jsd")


def grads_of(scalar: torch.Tensor, sig: TokenSignals) -> list[torch.Tensor]:
    """Gradients w.r.t. (lp_student, lp_student_topk, full_fkl, full_rkl, full_jsd); an input the loss
    does not use gets zeros."""
    inputs = [sig.lp_student, sig.lp_student_topk, *(getattr(sig, name) for name in FULL_FIELDS)]
    grads = torch.autograd.grad(scalar, inputs, allow_unused=True)
    return [torch.zeros_like(x) if g is None else g for g, x in zip(grads, inputs, strict=True)]


def value_and_grads(loss: torch.Tensor, sig: TokenSignals):
    """Per-token values and the gradient of a fixed uneven weighting (so every token's gradient counts)."""
    weights = torch.linspace(0.5, 1.5, loss.shape[0], dtype=DTYPE)
    return loss.detach(), grads_of((weights * loss).sum(), sig)


def assert_close(actual, expected, what: str) -> None:
    torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-12, msg=lambda m: f"{what}: {m}")


CONTEXT = MethodContext(step=3, total_steps=10, entropy_threshold=1.2)  # guidance: the method's default
GUIDED = MethodContext(step=3, total_steps=10, entropy_threshold=1.2, guidance=True)
UNGUIDED = MethodContext(step=3, total_steps=10, entropy_threshold=1.2, guidance=False)


# ---------------------------------------------------------------------------------------------------------
# Each method equals its transcription, in value and gradient
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("context", [CONTEXT, GUIDED, UNGUIDED], ids=["default", "guided", "unguided"])
@pytest.mark.parametrize("config_values", [DEFAULT_CONFIG, ALTERED_CONFIG], ids=["defaults", "altered"])
@pytest.mark.parametrize("one_update", [True, False], ids=["one_update", "ppo_ratio"])
@pytest.mark.parametrize("name", METHOD_NAMES)
def test_method_matches_transcription(name, one_update, config_values, context):
    config = MethodConfig(name=name, **config_values)
    signals = make_signals(one_update)
    actual, actual_grads = value_and_grads(token_loss(signals, config, context).loss, signals)
    expected, expected_grads = value_and_grads(ref_token_loss(signals, config, context), signals)
    assert torch.isfinite(actual).all(), "padding garbage leaked into the loss"
    assert_close(actual, expected, f"{name} per-token loss")
    assert_close(actual_grads[0], expected_grads[0], f"{name} d loss / d lp_student")
    assert_close(actual_grads[1], expected_grads[1], f"{name} d loss / d lp_student_topk")
    for index, field_name in enumerate(FULL_FIELDS, start=2):
        assert_close(actual_grads[index], expected_grads[index], f"{name} d loss / d {field_name}")
        assert actual_grads[index][7] == 0, "padding token received gradient"
    assert actual_grads[0][7] == 0 and (actual_grads[1][7] == 0).all(), "padding token received gradient"


def test_method_terms_add_up_to_the_loss():
    signals = make_signals(one_update=False)
    for name in METHOD_NAMES:
        for context in (CONTEXT, GUIDED, UNGUIDED):
            result = token_loss(signals, MethodConfig(name=name, **ALTERED_CONFIG), context)
            assert ("guidance" in result.terms) == ref_guided(MethodConfig(name=name), context), name
            assert_close(sum(result.terms.values()).detach(), result.loss.detach(), f"{name} terms")


def test_one_update_gradient_is_reinforce_and_guidance_is_beta_nll():
    """With ratio == 1, d loss_pg / d lpS = -A on student tokens; prefix tokens get d/d lpS = -beta."""
    signals = make_signals(one_update=True)
    config = MethodConfig(name="opd", guidance_beta=0.01, **DEFAULT_CONFIG)
    loss = token_loss(signals, config, GUIDED).loss  # guidance turned on for OPD: an ablation
    (grad,) = torch.autograd.grad(loss.sum(), [signals.lp_student])
    for t, (p_s_old, p_t, _, _, prefix, valid, _, _) in enumerate(TOKENS):
        expected = 0.0 if not valid else (-0.01 if prefix else -math.log(p_t / p_s_old))
        assert grad[t].item() == pytest.approx(expected, abs=1e-12), f"token {t}"
        if valid and not prefix:
            assert loss[t].item() == pytest.approx(-math.log(p_t / p_s_old), abs=1e-12)


def test_raw_fkl_gradient_is_minus_teacher_probability():
    signals = make_signals(one_update=True)
    loss = token_loss(signals, MethodConfig(name="fkl", **DEFAULT_CONFIG), CONTEXT).loss
    (grad,) = torch.autograd.grad(loss.sum(), [signals.lp_student_topk])
    for t, (_, _, _, _, prefix, valid, _, _) in enumerate(TOKENS):
        expected = [0.0] * 3 if prefix or not valid else [-p for p in TEACHER_TOPK[t]]
        assert grad[t].tolist() == pytest.approx(expected, abs=1e-12), f"token {t}"


@pytest.mark.parametrize("one_update", [True, False])
def test_tropd_agrees_with_opd_and_fkl_exactly_where_the_trust_mask_says(one_update):
    def run(name, trust=None):
        signals = make_signals(one_update, trust)
        loss = token_loss(signals, MethodConfig(name=name, **DEFAULT_CONFIG), GUIDED).loss
        return value_and_grads(loss, signals)

    all_trusted, none_trusted = [True] * 8, [False] * 8
    for trust, baseline in ((all_trusted, "opd"), (none_trusted, "fkl")):
        tropd_value, tropd_grads = run("tropd", trust)
        base_value, base_grads = run(baseline, trust)
        assert_close(tropd_value, base_value, f"tropd with M == {trust[0]} vs {baseline}")
        for got, want in zip(tropd_grads, base_grads, strict=True):
            assert_close(got, want, f"tropd grad with M == {trust[0]} vs {baseline}")
    tropd_value, _ = run("tropd")
    opd_value, _ = run("opd")
    fkl_value, _ = run("fkl")
    trust = make_signals(one_update).trust_mask
    for t, (_, _, _, _, prefix, valid, _, _) in enumerate(TOKENS):
        if not valid or prefix:
            assert tropd_value[t] == opd_value[t] == fkl_value[t], (
                "guidance/padding must not depend on method"
            )
        elif trust[t]:
            assert tropd_value[t] == opd_value[t] and not torch.isclose(tropd_value[t], fkl_value[t])
        else:
            assert tropd_value[t] == fkl_value[t] and not torch.isclose(tropd_value[t], opd_value[t])


@pytest.mark.parametrize(
    "switch_fraction, total_steps, switch_step",
    # ceil(fraction * steps): an odd run gives the reward stage the larger half (round() would give
    # 2 of 5 and 4 of 7: banker's rounding)
    [(0.5, 10, 5), (0.3, 10, 3), (0.5, 5, 3), (0.5, 7, 4), (0.7, 10, 7), (0.1, 3, 1)],
)
def test_reopold_2stage_switches_at_the_configured_step(switch_fraction, total_steps, switch_step):
    config = MethodConfig(name="reopold_2stage", reopold_switch_fraction=switch_fraction, **DEFAULT_CONFIG)
    assert config.reopold_switch_step(total_steps) == switch_step
    tau = config.outlier_tau
    student = [t for t, row in enumerate(TOKENS) if row[5] and not row[4]]
    advantage = {t: math.log(TOKENS[t][1] / TOKENS[t][0]) for t in student}
    for step in (switch_step - 1, switch_step):
        signals = make_signals(one_update=True)
        context = MethodContext(step=step, total_steps=total_steps, entropy_threshold=1.2)
        (grad,) = torch.autograd.grad(token_loss(signals, config, context).loss.sum(), [signals.lp_student])
        kept = {t for t in student if grad[t] != 0}
        if step < switch_step:
            assert kept == {t for t in student if advantage[t] >= tau}
        else:
            assert kept == {t for t in student if TOKENS[t][6] >= 1.2}
        # clipped reward throughout: the kept tokens' gradient is -max(A, tau)
        for t in kept:
            assert grad[t].item() == pytest.approx(-max(advantage[t], tau), abs=1e-12)
    # the two masks differ on this table, so a wrong switch step cannot pass
    assert {t for t in student if advantage[t] >= tau} != {t for t in student if TOKENS[t][6] >= 1.2}


# ---------------------------------------------------------------------------------------------------------
# Token selection by entropy, global normalisation and splits
# ---------------------------------------------------------------------------------------------------------


def random_signals(
    num_tokens: int, seed: int, topk: int = 5, vocab: int = 16, one_update=False
) -> TokenSignals:
    """Consistent random signals from full-vocabulary teacher and student logits."""
    gen = torch.Generator().manual_seed(seed)
    lp_teacher_full = torch.randn(num_tokens, vocab, generator=gen, dtype=DTYPE).mul(2).log_softmax(-1)
    lp_student_full = torch.randn(num_tokens, vocab, generator=gen, dtype=DTYPE).mul(2).log_softmax(-1)
    sampled = torch.multinomial(lp_student_full.exp(), 1, generator=gen)  # [T, 1]
    lp_teacher_topk, topk_ids = lp_teacher_full.topk(topk, dim=-1)
    lp_old = lp_student_full.gather(-1, sampled).squeeze(-1)
    lp_teacher = lp_teacher_full.gather(-1, sampled).squeeze(-1)
    ratio = torch.empty(num_tokens, dtype=DTYPE).uniform_(0.7, 1.3, generator=gen)
    ratio = torch.ones_like(ratio) if one_update else ratio  # PPO clipping zeroes some gradients
    p_teacher, p_student = lp_teacher_full.exp(), lp_student_full.exp()
    lp_mix = (0.5 * p_teacher + 0.5 * p_student).log()
    jsd = 0.5 * (p_teacher * (lp_teacher_full - lp_mix)).sum(-1)
    jsd = jsd + 0.5 * (p_student * (lp_student_full - lp_mix)).sum(-1)
    return TokenSignals(
        lp_student=(lp_old + ratio.log()).requires_grad_(),
        lp_student_old=lp_old,
        lp_teacher=lp_teacher,
        lp_student_topk=lp_student_full.gather(-1, topk_ids).requires_grad_(),
        lp_teacher_topk=lp_teacher_topk,
        entropy_student_old=-(lp_student_full.exp() * lp_student_full).sum(-1),
        entropy_teacher=-(lp_teacher_full.exp() * lp_teacher_full).sum(-1),
        trust_mask=torch.rand(num_tokens, generator=gen) < (lp_teacher - lp_old).clamp_max(0).exp(),
        is_teacher_prefix=torch.rand(num_tokens, generator=gen) < 0.2,
        loss_mask=torch.rand(num_tokens, generator=gen) < 0.85,
        full_fkl=(p_teacher * (lp_teacher_full - lp_student_full)).sum(-1).requires_grad_(),
        full_rkl=(p_student * (lp_student_full - lp_teacher_full)).sum(-1).requires_grad_(),
        full_jsd=jsd.requires_grad_(),
    )


def test_entropy_opd_keeps_exactly_the_top_fraction_of_student_tokens():
    signals = random_signals(80, seed=1, one_update=True)
    student = signals.student_token_mask
    num_student = int(student.sum())
    # give the student tokens distinct entropies; prefix and padding tokens get the largest ones, which
    # must not count towards the quantile
    entropy = torch.zeros(80, dtype=DTYPE)
    entropy[student] = torch.randperm(num_student, generator=torch.Generator().manual_seed(2)).to(DTYPE)
    entropy[~student] = 1000.0
    signals.entropy_student_old = entropy
    config = MethodConfig(name="entropy_opd", **DEFAULT_CONFIG)
    context = make_method_context(config, signals, step=0, total_steps=1)
    loss = token_loss(signals, config, context).loss
    (grad,) = torch.autograd.grad(loss.sum(), [signals.lp_student])
    kept = set(torch.nonzero(student & (grad != 0)).flatten().tolist())
    num_keep = math.ceil(0.2 * num_student)
    ranked = sorted(torch.nonzero(student).flatten().tolist(), key=lambda t: -entropy[t].item())
    assert len(kept) == num_keep and kept == set(ranked[:num_keep])


def test_entropy_threshold_ignores_order_and_counts_ties():
    entropy = torch.tensor([0.3, 0.9, 0.1, 0.5, 0.7, 0.2, 0.8, 0.4, 0.6, 0.0], dtype=DTYPE)
    mask = torch.ones(10, dtype=torch.bool)
    assert entropy_quantile_threshold(entropy, mask, 0.2) == 0.8  # keeps {0.9, 0.8}
    assert entropy_quantile_threshold(entropy.flip(0), mask, 0.2) == 0.8
    assert entropy_quantile_threshold(entropy, mask, 1.0) == 0.0
    assert entropy_quantile_threshold(entropy, mask & (entropy < 0.85), 0.5) == 0.4  # 9 tokens -> keep 5
    assert entropy_quantile_threshold(entropy, torch.zeros(10, dtype=torch.bool), 0.2) == math.inf


def split_points(num_tokens: int) -> list[slice]:
    """Two uneven DP shards, each cut into uneven microbatches (one of them empty of valid tokens)."""
    cuts = [0, 7, 11, 30, 41, num_tokens]  # shard 0 = [0, 30), shard 1 = [30, T)
    return [slice(a, b) for a, b in zip(cuts[:-1], cuts[1:], strict=True)]


@pytest.mark.parametrize("name", ["tropd", "entropy_opd", "reopold_2stage", "jsd", "eopd", "tropd_aopd"])
def test_batch_loss_equals_sum_over_microbatch_and_dp_splits(name):
    config = MethodConfig(name=name, topk=5, eopd_topk=3)
    full = random_signals(60, seed=3)
    context = make_method_context(config, full, step=7, total_steps=10)
    full_loss, full_metrics = microbatch_loss(full, config, context, count_valid_tokens(full.loss_mask))
    full_grads = grads_of(full_loss, full)

    split = random_signals(60, seed=3)  # same values, fresh leaves
    shards = [split.select(slice(0, 30)), split.select(slice(30, 60))]
    # what each DP rank would compute: its local count summed over ranks, the threshold over all ranks
    global_count = sum(count_valid_tokens(shard.loss_mask) for shard in shards)
    if context.entropy_threshold is not None:  # the gathered shards, in another order, give the same cut
        fraction = (
            config.reopold_entropy_top_fraction if name == "reopold_2stage" else config.entropy_top_fraction
        )
        shuffled = shards[::-1]
        assert context.entropy_threshold == entropy_quantile_threshold(
            torch.cat([s.entropy_student_old for s in shuffled]),
            torch.cat([s.student_token_mask for s in shuffled]),
            fraction,
        )
    total, metrics = 0.0, []
    for piece in split_points(60):
        loss, piece_metrics = microbatch_loss(split.select(piece), config, context, global_count)
        total, metrics = total + loss, metrics + [piece_metrics]
    split_grads = grads_of(total, split)
    assert_close(total.detach(), full_loss.detach(), f"{name} loss over splits")
    for got, want in zip(split_grads, full_grads, strict=True):
        assert_close(got, want, f"{name} gradient over splits")
    reduced, reference = reduce_metrics(metrics), reduce_metrics([full_metrics])
    assert reduced.keys() == reference.keys()
    for key in reference:
        assert reduced[key] == pytest.approx(reference[key], rel=1e-12, abs=1e-12), key
    assert reduced["loss"] == pytest.approx(full_loss.item(), rel=1e-12)


def test_metrics_report_trust_topk_mass_and_entropy():
    signals = make_signals(one_update=True)
    config = MethodConfig(name="tropd", **DEFAULT_CONFIG)
    _, metrics = microbatch_loss(signals, config, CONTEXT, global_valid_tokens=7)
    reduced = reduce_metrics([metrics])
    student = [t for t, row in enumerate(TOKENS) if row[5] and not row[4]]
    assert reduced["trust_fraction"] == pytest.approx(sum(TOKENS[t][3] for t in student) / len(student))
    p_trust = [min(TOKENS[t][1] / TOKENS[t][0], 1.0) for t in student]
    assert reduced["p_trust"] == pytest.approx(sum(p_trust) / len(student))
    assert reduced["teacher_topk_mass"] == pytest.approx(
        sum(sum(STUDENT_TOPK[t]) for t in student) / len(student)
    )
    assert reduced["entropy_student"] == pytest.approx(sum(TOKENS[t][6] for t in student) / len(student))
    assert reduced["teacher_prefix_fraction"] == pytest.approx(1 / 7)
    assert reduced["nonfinite_loss_tokens"] == 0
    assert {"term/pg", "term/outlier_fkl", "term/guidance"} <= reduced.keys()


def test_non_finite_fkl_value_is_reported_and_its_gradient_stays_finite():
    signals = make_signals(one_update=True, trust=[False] * 8)
    with torch.no_grad():
        signals.lp_student_topk[0, 1] = -math.inf  # the student puts no mass on a teacher top-k id
    config = MethodConfig(name="tropd", **DEFAULT_CONFIG)
    loss, metrics = microbatch_loss(signals, config, CONTEXT, global_valid_tokens=7)
    assert loss.item() == math.inf
    assert reduce_metrics([metrics])["nonfinite_loss_tokens"] == pytest.approx(1 / 7)
    (grad,) = torch.autograd.grad(loss, [signals.lp_student_topk])
    assert torch.isfinite(grad).all() and grad[0, 1].item() == pytest.approx(-TEACHER_TOPK[0][1] / 7)


def _two_rank_worker(rank: int, world_size: int) -> dict:
    """One DP rank: its uneven shard of the batch, the threshold, count and metrics over the group."""
    group = dist.group.WORLD
    full = random_signals(60, seed=5)  # identical on both ranks; each keeps its own shard
    shard = full.select(slice(0, 23) if rank == 0 else slice(23, 60))
    config = MethodConfig(name="entropy_opd", topk=5)
    context = make_method_context(config, shard, step=2, total_steps=10, dp_group=group)
    global_count = count_valid_tokens(shard.loss_mask, group)
    loss, metrics = microbatch_loss(shard, config, context, global_count)
    # rank 1 selects nothing: the all-gather of unequal lengths must still agree
    only_rank0 = shard.student_token_mask & torch.tensor(rank == 0)
    return dict(
        threshold=context.entropy_threshold,
        threshold_rank0_only=entropy_quantile_threshold(shard.entropy_student_old, only_rank0, 0.3, group),
        global_count=global_count,
        loss=loss.item(),
        grads=grads_of(loss, full),
        metrics=reduce_metrics([metrics], group),
    )


@pytest.mark.slow
def test_two_rank_gloo_threshold_count_loss_and_metrics_match_single_process():
    results = run_on_ranks(_two_rank_worker, 2)
    full = random_signals(60, seed=5)
    config = MethodConfig(name="entropy_opd", topk=5)
    context = make_method_context(config, full, step=2, total_steps=10)
    full_loss, full_metrics = microbatch_loss(full, config, context, count_valid_tokens(full.loss_mask))
    full_grads = grads_of(full_loss, full)
    rank0_mask = full.student_token_mask & (torch.arange(60) < 23)
    rank0_threshold = entropy_quantile_threshold(full.entropy_student_old, rank0_mask, 0.3)
    for rank, result in enumerate(results):
        assert result["threshold"] == context.entropy_threshold, f"rank {rank} threshold"
        assert result["threshold_rank0_only"] == rank0_threshold, f"rank {rank} threshold, empty rank 1"
        assert result["global_count"] == int(full.loss_mask.sum())
        for key, value in reduce_metrics([full_metrics]).items():
            assert result["metrics"][key] == pytest.approx(value, rel=1e-12, abs=1e-12), f"rank {rank} {key}"
    assert sum(r["loss"] for r in results) == pytest.approx(full_loss.item(), rel=1e-12)
    for index in range(2):
        assert_close(
            results[0]["grads"][index] + results[1]["grads"][index], full_grads[index], "DP gradient"
        )


@pytest.mark.slow
def test_megatron_schedule_accepts_the_loss_func_and_normalises_globally():
    """Run our loss_func through Megatron-Core's own per-microbatch step with calculate_per_token_loss."""
    from functools import partial

    from megatron.core.pipeline_parallel.schedules import forward_step_calc_loss

    config = MethodConfig(name="tropd", topk=5)
    full = random_signals(60, seed=6)
    context = make_method_context(config, full, step=0, total_steps=10)
    reference_loss, reference_metrics = microbatch_loss(
        full, config, context, count_valid_tokens(full.loss_mask)
    )

    split = random_signals(60, seed=6)
    schedule_config = types.SimpleNamespace(calculate_per_token_loss=True, timers=None)
    pieces, store, outputs = split_points(60), [], []
    total_num_tokens = torch.zeros([], dtype=torch.int)  # as in the schedules
    for piece in pieces:
        logits = torch.zeros(1)  # stands in for the last stage's output; build_signals ignores it here
        loss_func = partial(
            megatron_loss_func,
            build_signals=lambda _, p=piece: split.select(p),
            config=config,
            context=context,
        )
        output, num_tokens = forward_step_calc_loss(
            types.SimpleNamespace(),
            logits,
            loss_func,
            schedule_config,
            None,
            False,
            len(pieces),
            store,
            1,
            True,
        )
        assert num_tokens.dtype == torch.int and num_tokens == int(split.loss_mask[piece].sum())
        total_num_tokens += num_tokens
        outputs.append(output)
    # finalize_model_grads divides the accumulated gradients by the (DP-reduced) token count
    scale = 1.0 / total_num_tokens.item()
    assert_close(sum(outputs).detach() * scale, reference_loss.detach(), "loss through Megatron's schedule")
    for got, want in zip(grads_of(sum(outputs), split), grads_of(reference_loss, full), strict=True):
        assert_close(got * scale, want, "gradient through Megatron's schedule")
    assert all(pair.shape == (2,) for metrics in store for pair in metrics.values())
    assert reduce_metrics(store) == pytest.approx(reduce_metrics([reference_metrics]), rel=1e-12)
    loss_sum, num_tokens, _ = loss_sum_and_metrics(full, config, context)
    assert_close(loss_sum.detach() / num_tokens, reference_loss.detach(), "loss_sum / num_tokens")


# ---------------------------------------------------------------------------------------------------------
# Configuration and bad input
# ---------------------------------------------------------------------------------------------------------


def test_defaults_follow_method_md_and_names_match_the_registry():
    config = MethodConfig()
    config.validate()
    assert (config.topk, config.fkl_family, config.ppo_clip_eps, config.guidance_beta) == (
        64,
        "raw",
        0.2,
        0.001,
    )
    assert (config.jsd_beta, config.outlier_lambda, config.entropy_top_fraction) == (0.5, 0.2, 0.2)
    assert (config.reopold_entropy_top_fraction, config.reopold_switch_fraction) == (0.5, 0.5)
    assert (config.eopd_entropy_threshold, config.eopd_lambda_fkl, config.eopd_topk) == (0.8, 1.0, 16)
    assert (config.eopd_family, config.aopd_tau) == ("renorm", 0.0)
    assert config.outlier_tau == pytest.approx(math.log(0.25))
    assert config.reopold_switch_step(200) == 100
    assert tuple(METHOD_REGISTRY) == METHOD_NAMES and FKL_FAMILIES == ops.FKL_FAMILIES
    assert get_method("reopold") is get_method("clip_outlier")


def test_every_spec_names_a_loss_and_every_loss_serves_a_method():
    assert {spec.loss for spec in METHOD_SPECS.values()} == set(LOSS_FUNCTIONS)
    for name, spec in METHOD_SPECS.items():
        assert METHOD_REGISTRY[name] is LOSS_FUNCTIONS[spec.loss] is get_method(name)
    assert get_method("fkl_outlier") is get_method("tropd")
    assert {name for name, spec in METHOD_SPECS.items() if spec.guidance} == GUIDED_BY_DEFAULT


def _loss_and_grads(signals: TokenSignals, name: str) -> tuple[torch.Tensor, list[torch.Tensor]]:
    config = MethodConfig(name=name, **ALTERED_CONFIG)
    context = make_method_context(config, signals, step=3, total_steps=10)
    return value_and_grads(token_loss(signals, config, context).loss, signals)


def _changed(name: str, **replacement) -> bool:
    """Whether the loss or its gradient moves when the given signals are replaced."""
    base_value, base_grads = _loss_and_grads(random_signals(40, seed=9), name)
    signals = random_signals(40, seed=9)
    for field_name, make in replacement.items():
        setattr(signals, field_name, make(getattr(signals, field_name)))
    value, grads = _loss_and_grads(signals, name)
    return not (torch.equal(value, base_value) and all(map(torch.equal, grads, base_grads)))


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_the_spec_says_which_signals_the_loss_reads(name):
    """Each need of the spec is proven both ways: a signal the spec leaves out does not move the loss,
    one it lists does (so scoring may skip what no loss reads, and must compute what one does)."""
    spec = METHOD_SPECS[name]
    assert _changed(name, lp_teacher_topk=lambda x: (x - 0.3).clamp_max(0.0)) == spec.teacher_topk
    assert _changed(name, trust_mask=lambda m: ~m) == spec.trust_mask
    assert _changed(name, entropy_teacher=torch.zeros_like) == spec.teacher_entropy
    for kind, field_name in zip(ops.FULL_DIVERGENCES, FULL_FIELDS, strict=True):
        moved = _changed(name, **{field_name: lambda x: (x + 0.25).detach().requires_grad_()})
        assert moved == (spec.full_divergence == kind), (name, kind)
    context = make_method_context(MethodConfig(name=name, topk=5), random_signals(40, seed=9), 0, 10)
    assert (context.entropy_threshold is not None) == (spec.entropy_fraction is not None)
    if spec.entropy_fraction is not None:  # the fraction the spec names is the one the loss keeps
        config = MethodConfig(name=name, topk=5, **{spec.entropy_fraction: 0.5})
        signals = random_signals(40, seed=9)
        expected = entropy_quantile_threshold(signals.entropy_student_old, signals.student_token_mask, 0.5)
        assert make_method_context(config, signals, 0, 10).entropy_threshold == expected


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_guidance_term_follows_the_context_for_every_method(name):
    """On: teacher-prefix tokens get beta * (lpT - lpS) (gradient -beta); off: no term, no loss there."""
    prefix = [t for t, row in enumerate(TOKENS) if row[4] and row[5]]
    config = MethodConfig(name=name, **ALTERED_CONFIG)
    for context, guided in ((GUIDED, True), (UNGUIDED, False), (CONTEXT, name in GUIDED_BY_DEFAULT)):
        signals = make_signals(one_update=True)
        result = token_loss(signals, config, context)
        (grad,) = grads_of(result.loss.sum(), signals)[:1]  # fkl without guidance never reads lp_student
        assert ("guidance" in result.terms) == guided
        for t in prefix:
            beta = config.guidance_beta if guided else 0.0
            assert grad[t].item() == pytest.approx(-beta, abs=1e-15)
            assert result.loss[t].item() == pytest.approx(beta * math.log(TOKENS[t][1] / TOKENS[t][0]))


def test_wrong_method_name_lists_allowed_names_and_closest_match():
    with pytest.raises(ValueError, match=r"allowed: opd, fkl, .*tropd_aopd.*did you mean 'tropd_mask'"):
        get_method("tropd_masc")
    with pytest.raises(ValueError, match=r"method.name = 'TrOPD'.*tropd"):
        MethodConfig(name="TrOPD").validate()
    with pytest.raises(ValueError, match="unknown distillation method"):
        get_method("sft")


@pytest.mark.parametrize(
    "overrides, pattern",
    [
        (dict(fkl_family="renormalized"), r"method.fkl_family.*raw, renorm, tail.*did you mean 'renorm'"),
        (dict(eopd_family="exact"), r"method.eopd_family"),
        (dict(topk=0), r"method.topk must be an integer >= 1"),
        (dict(topk=-4), r"method.topk"),
        (dict(topk=2.5), r"method.topk"),
        (dict(topk=True), r"method.topk"),
        (dict(eopd_topk=0), r"method.eopd_topk must be an integer >= 1"),
        (dict(name="eopd", topk=8, eopd_topk=16), r"eopd_topk = 16 exceeds method.topk = 8"),
        (dict(jsd_beta=1.0), r"method.jsd_beta .* \(0.0, 1.0\)"),
        (dict(outlier_lambda=0.0), r"method.outlier_lambda"),
        (dict(ppo_clip_eps=0.0), r"method.ppo_clip_eps"),
        (dict(entropy_top_fraction=0.0), r"method.entropy_top_fraction"),
        (dict(reopold_switch_fraction=1.5), r"method.reopold_switch_fraction"),
        (dict(guidance_beta=float("nan")), r"method.guidance_beta"),
        (dict(aopd_tau=2.0), r"method.aopd_tau"),
        (dict(trust_seed=-1), r"method.trust_seed"),
    ],
)
def test_invalid_config_is_rejected_with_the_field_and_what_is_allowed(overrides, pattern):
    with pytest.raises(ValueError, match=pattern):
        MethodConfig(**overrides).validate()


def test_losses_reject_an_unknown_family_even_without_validate():
    signals = make_signals(one_update=True)
    config = MethodConfig(name="fkl", **DEFAULT_CONFIG)
    config.fkl_family = "bogus"
    with pytest.raises(ValueError, match="fkl_family"):
        token_loss(signals, config, CONTEXT)
    with pytest.raises(ValueError, match="unknown top-k forward-KL family 'bogus'"):
        ops.topk_forward_kl(signals.lp_student_topk, signals.lp_teacher_topk, "bogus")


def test_mismatched_or_malformed_signals_are_rejected():
    good = make_signals(one_update=True)

    def with_field(**changes):
        values = {name: getattr(good, name) for name in TokenSignals.__dataclass_fields__}
        return TokenSignals(**{**values, **changes})

    with pytest.raises(ValueError, match=r"lp_teacher has shape \(9,\) but lp_student has \(8,\)"):
        with_field(lp_teacher=torch.zeros(9, dtype=DTYPE))
    with pytest.raises(
        ValueError, match=r"lp_student_topk has shape \(8, 3\) but lp_teacher_topk has \(8, 4\)"
    ):
        with_field(lp_teacher_topk=torch.zeros(8, 4, dtype=DTYPE))
    with pytest.raises(ValueError, match=r"must be \[T, k\] with T = 8.*\(7, 3\)"):
        with_field(
            lp_student_topk=torch.zeros(7, 3, dtype=DTYPE), lp_teacher_topk=torch.zeros(7, 3, dtype=DTYPE)
        )
    with pytest.raises(ValueError, match=r"k = 0.*method.topk must be >= 1"):
        with_field(
            lp_student_topk=torch.zeros(8, 0, dtype=DTYPE), lp_teacher_topk=torch.zeros(8, 0, dtype=DTYPE)
        )
    with pytest.raises(ValueError, match="trust_mask must be a bool tensor"):
        with_field(trust_mask=torch.ones(8))
    with pytest.raises(ValueError, match=r"lp_student must be flat \[T\]"):
        with_field(lp_student=torch.zeros(2, 4, dtype=DTYPE))
    with pytest.raises(ValueError, match="entropy_teacher is None"):
        token_loss(with_field(entropy_teacher=None), MethodConfig(name="eopd", **DEFAULT_CONFIG), CONTEXT)
    with pytest.raises(ValueError, match="entropy_threshold is None.*build the context with method_context"):
        token_loss(good, MethodConfig(name="entropy_opd", **DEFAULT_CONFIG), MethodContext())
    with pytest.raises(ValueError, match="smaller than this microbatch's own 7 valid tokens"):
        microbatch_loss(good, MethodConfig(**DEFAULT_CONFIG), CONTEXT, global_valid_tokens=3)
    with pytest.raises(ValueError, match=r"top_fraction must lie in \(0, 1\]"):
        entropy_quantile_threshold(good.entropy_student_old, good.loss_mask, 0.0)
    with pytest.raises(ValueError, match=r"step must lie in \[0, total_steps = 10\)"):
        make_method_context(MethodConfig(**DEFAULT_CONFIG), good, step=10, total_steps=10)


# ---------------------------------------------------------------------------------------------------------
# Full-vocabulary methods from the student's logits and the teacher's hidden states (training's path)
# ---------------------------------------------------------------------------------------------------------

FULL_VOCAB, FULL_PADDED, FULL_TOPK = 37, 40, 5


def full_vocab_batch(seed: int = 4, rows: int = 3, seq: int = 9, hidden: int = 6):
    """A scored batch with the hidden payload from explicit fp64 logits: ``(batch, student logits
    [rows, seq, 40] with padded columns 37.., teacher weight [37, hidden], teacher log-probs)``."""
    from megatron_tropd.batch import RolloutBatch

    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, seq, FULL_PADDED, generator=gen, dtype=DTYPE) * 2
    logits[..., FULL_VOCAB:] = 30.0  # padded columns: large values that must never count
    teacher_hidden = torch.randn(rows, seq, hidden, generator=gen, dtype=DTYPE)
    teacher_weight = torch.randn(FULL_VOCAB, hidden, generator=gen, dtype=DTYPE)
    lp_teacher_full = (teacher_hidden @ teacher_weight.T).log_softmax(-1)
    tokens = torch.randint(1, FULL_VOCAB, (rows, seq), generator=gen)
    labels = torch.cat([tokens[:, 1:], torch.zeros_like(tokens[:, :1])], 1)
    lp_student_full = logits[..., :FULL_VOCAB].log_softmax(-1)
    loss_mask = torch.rand(rows, seq, generator=gen) < 0.85
    loss_mask[:, -1] = False
    topk_logprobs, topk_ids = lp_teacher_full.topk(FULL_TOPK, dim=-1)
    lp_teacher = lp_teacher_full.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    lp_old = lp_student_full.gather(-1, labels.unsqueeze(-1)).squeeze(-1)  # one update: ratio 1
    batch = RolloutBatch(
        tokens, loss_mask, torch.rand(rows, seq, generator=gen) < 0.25, torch.arange(rows),
        lp_teacher=lp_teacher, topk_ids=topk_ids, topk_logprobs=topk_logprobs, lp_student_old=lp_old,
        entropy_student_old=-(lp_student_full.exp() * lp_student_full).sum(-1),
        trust_mask=torch.rand(rows, seq, generator=gen) < 0.5, teacher_hidden=teacher_hidden,
    )  # fmt: skip
    return batch, logits, teacher_weight, lp_teacher_full


def reference_full_vocab_loss(name, cfg: MethodConfig, batch, logits, lp_t, guided: bool):
    """Token-mean loss and per-token full and top-k (``cfg.fkl_family``) FKL, in fp64 from full logits."""
    lp_s = logits[..., :FULL_VOCAB].log_softmax(-1)
    p_s, p_t = lp_s.exp(), lp_t.exp()
    b = cfg.jsd_beta
    lp_m = (b * p_t + (1 - b) * p_s).log()
    divergences = {
        "fkl_full": (p_t * (lp_t - lp_s)).sum(-1),
        "rkl_full": (p_s * (lp_s - lp_t)).sum(-1),
        "jsd_full": b * (p_t * (lp_t - lp_m)).sum(-1) + (1 - b) * (p_s * (lp_s - lp_m)).sum(-1),
    }
    lp_label = lp_s.gather(-1, batch.labels.unsqueeze(-1)).squeeze(-1)
    pg = -(batch.lp_teacher - batch.lp_student_old) * torch.exp(lp_label - batch.lp_student_old)
    fkl = divergences["fkl_full"]
    student_loss = {
        **divergences,
        "tropd_full": torch.where(batch.trust_mask, pg, fkl),
        "tropd": torch.where(batch.trust_mask, pg, _reference_topk_fkl(cfg, lp_s, batch)),
    }[name]
    guidance = cfg.guidance_beta * (batch.lp_teacher - lp_label) * float(guided)
    per_token = torch.where(batch.is_teacher_prefix, guidance, student_loss)
    valid = batch.loss_mask
    loss = torch.where(valid, per_token, torch.zeros_like(per_token)).sum() / valid.sum()
    return loss, fkl.detach(), _reference_topk_fkl(cfg, lp_s, batch).detach()


def _reference_topk_fkl(cfg: MethodConfig, lp_s, batch):
    """Raw top-k FKL, or (``tail``) the KL of both distributions coarse-grained to V_k plus one bucket."""
    lp_s_k, lp_t_k = lp_s.gather(-1, batch.topk_ids), batch.topk_logprobs
    raw = (lp_t_k.exp() * (lp_t_k - lp_s_k)).sum(-1)
    if cfg.fkl_family == "raw":
        return raw
    tail_t, tail_s = 1 - lp_t_k.exp().sum(-1), 1 - lp_s_k.exp().sum(-1)
    return raw + tail_t * (tail_t.log() - tail_s.log())


FULL_CASES = {
    "fkl_full": dict(),
    "rkl_full": dict(),
    "jsd_full": dict(jsd_beta=0.3),
    "tropd_full": dict(fkl_family="tail", guidance_beta=0.05),
    "tropd": dict(teacher_payload="hidden", fkl_family="tail"),  # a top-k method: only the metrics change
}


@pytest.mark.parametrize("name", list(FULL_CASES))
def test_full_vocab_methods_match_the_fp64_reference_from_full_logits(name):
    """Loss, gradient w.r.t. the student logits and the ``bias/*`` metrics through
    ``training.student_signals`` (TP 1, padded columns present) against direct fp64 formulas."""
    from megatron_tropd.ops import VocabShard, teacher_output_weight_shard
    from megatron_tropd.training import full_divergences, student_signals

    cfg = MethodConfig(name=name, topk=FULL_TOPK, **FULL_CASES[name])
    batch, logits, weight, lp_t = full_vocab_batch()
    shard = teacher_output_weight_shard(
        weight, VocabShard(0, FULL_PADDED, FULL_VOCAB), FULL_VOCAB, FULL_VOCAB, DTYPE
    )
    leaf = logits.clone().requires_grad_()
    signals = student_signals(
        leaf, batch, None, FULL_VOCAB, with_tail=cfg.fkl_family == "tail",
        full=full_divergences(cfg, batch, shard),
    )  # fmt: skip
    loss_sum, num_tokens, metrics = loss_sum_and_metrics(signals, cfg, CONTEXT)
    (loss_sum / num_tokens).backward()

    ref_leaf = logits.clone().requires_grad_()
    guided = METHOD_SPECS[name].guidance
    ref_loss, ref_fkl, ref_topk = reference_full_vocab_loss(name, cfg, batch, ref_leaf, lp_t, guided)
    ref_loss.backward()
    torch.testing.assert_close(loss_sum / num_tokens, ref_loss, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(leaf.grad, ref_leaf.grad, rtol=1e-9, atol=1e-12)
    assert (leaf.grad[..., FULL_VOCAB:] == 0).all()
    reduced = reduce_metrics([metrics])
    student = batch.loss_mask & ~batch.is_teacher_prefix
    for where, mask in (("trusted", student & batch.trust_mask), ("outlier", student & ~batch.trust_mask)):
        assert mask.any()
        full, topk = ref_fkl[mask].mean().item(), ref_topk[mask].mean().item()
        assert reduced[f"bias/full_fkl_{where}"] == pytest.approx(full, rel=1e-10)
        assert reduced[f"bias/topk_fkl_{where}"] == pytest.approx(topk, rel=1e-10)
        assert reduced[f"bias/full_minus_topk_{where}"] == pytest.approx(full - topk, rel=1e-9)
        if cfg.fkl_family == "tail":  # coarse-graining never increases a KL divergence
            assert full >= topk


def test_full_vocab_methods_explain_what_is_missing():
    from megatron_tropd.training import full_divergences

    batch, _, weight, _ = full_vocab_batch()
    with pytest.raises(ValueError, match="attach_teacher_weight"):
        full_divergences(MethodConfig(name="fkl_full"), batch, None)
    no_hidden = batch.with_signals(teacher_hidden=None)
    with pytest.raises(ValueError, match="teacher_hidden_size"):
        full_divergences(MethodConfig(name="rkl_full"), no_hidden, weight)
    assert full_divergences(MethodConfig(name="tropd"), no_hidden, None) is None
    with pytest.raises(ValueError, match="full_fkl is None.*teacher_payload=hidden"):
        signals = dataclasses.replace(random_signals(6, seed=1), full_fkl=None)
        token_loss(signals, MethodConfig(name="fkl_full", topk=5), CONTEXT)
    with pytest.raises(ValueError, match=r"method.teacher_payload = 'logits'.*topk, hidden"):
        MethodConfig(teacher_payload="logits").validate()
    assert MethodConfig(name="tropd_full").hidden_payload and not MethodConfig(name="tropd").hidden_payload
    assert MethodConfig(name="tropd", teacher_payload="hidden").hidden_payload
