"""Every distillation method in one table: what its loss is and what the loop must give it.

``METHOD_SPECS`` is the one place a method is declared. Each ``MethodSpec`` names the loss function it
runs (bound to code in ``losses.LOSS_FUNCTIONS``; a test checks the two agree), whether off-policy
guidance is on by default, and which per-rollout-batch signals its loss reads, so scoring, the loop and
the per-batch context ask the spec instead of testing method names. Adding a method that reuses an
existing loss (as ``fkl_outlier`` reuses TrOPD's) is one entry here; a new loss is one function in
``losses.py`` plus its entry here. A method whose loss reads an exact full-vocabulary divergence
(``full_divergence``) makes the job score the teacher's final hidden states and give each student rank
the teacher's output-layer rows of its vocabulary partition (``method.teacher_payload`` "hidden").

Torch-free on purpose: ``config.py`` validates ``method.name`` against this table before torch loads.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass


@dataclass(frozen=True)
class MethodSpec:
    """One selectable method (``method.name``) and what its loss needs."""

    loss: str
    """Key of its loss function in ``losses.LOSS_FUNCTIONS`` (several methods may share one)."""

    summary: str
    """One line: the per-token loss on student tokens (``docs/method.md``)."""

    guidance: bool = False
    """Default of ``rollout.guidance``: on for the TrOPD family only (paper Tables 1 and 5)."""

    teacher_topk: bool = False
    """The loss reads the teacher's top-k ids and log-probs (scoring computes them for every method:
    the top-k mass metric reads them too)."""

    teacher_entropy: bool = False
    """The loss reads the teacher's full-vocabulary entropy (scoring computes it only then)."""

    trust_mask: bool = False
    """The loss reads the Bernoulli trust mask (scoring draws it for every method: the trust metrics)."""

    entropy_fraction: str | None = None
    """``MethodConfig`` field holding the top fraction of student tokens by student entropy that the loss
    keeps; the loop then computes that cut-off over the whole global batch. None: no entropy selection."""

    full_divergence: str | None = None
    """The exact full-vocabulary divergence the loss reads (``ops.FULL_DIVERGENCES``: "forward_kl",
    "reverse_kl" or "jsd"), computed in training from the teacher's hidden states; None: none. Such a
    method always runs with the hidden teacher payload (``MethodConfig.hidden_payload``)."""

    paper_row: str = ""
    """The method's row name in the paper's tables (empty: not a row of the paper)."""


_TROPD = "K1 policy gradient where the trust mask M = 1, top-k forward KL on outliers (M = 0)"

METHOD_SPECS: dict[str, MethodSpec] = {
    "opd": MethodSpec("opd", "K1 reverse-KL policy gradient, A = lpT - lpS_old", paper_row="OPD"),
    "fkl": MethodSpec(
        "fkl", "top-k forward KL on every token", teacher_topk=True, paper_row="Full FKL (stand-alone)"
    ),
    "jsd": MethodSpec(
        "jsd", "generalised JSD(beta) on the teacher's top-k", teacher_topk=True, paper_row="JSD"
    ),
    "entropy_opd": MethodSpec(
        "entropy_opd",
        "OPD on the top 20% tokens by student entropy",
        entropy_fraction="entropy_top_fraction",
        paper_row="Entropy OPD",
    ),  # fmt: skip
    "clip_outlier": MethodSpec("clip_outlier", "OPD with A' = max(A, tau)", paper_row="Clip Outlier"),
    "reopold": MethodSpec(
        "clip_outlier", "alias of clip_outlier (REOPOLD's reward clipping)", paper_row="REOPOLD"
    ),
    "mask_outlier": MethodSpec("mask_outlier", "OPD with A' = 1[A > tau] * A", paper_row="Mask Outlier"),
    "reopold_2stage": MethodSpec(
        "reopold_2stage",
        "clipped OPD; mask 1[A >= tau], then the top 50% by student entropy",
        entropy_fraction="reopold_entropy_top_fraction",
    ),  # fmt: skip
    "eopd": MethodSpec(
        "eopd",
        "OPD + lambda * 1[H_T > 0.8] * renormalised top-16 forward KL",
        teacher_topk=True,
        teacher_entropy=True,
        paper_row="EOPD",
    ),  # fmt: skip
    "aopd": MethodSpec(
        "aopd", "forward KL where pi_T <= pi_S_old, OPD elsewhere", teacher_topk=True, paper_row="AOPD"
    ),
    "fkl_outlier": MethodSpec(
        "tropd",
        f"TrOPD without guidance: {_TROPD}",
        teacher_topk=True,
        trust_mask=True,
        paper_row="FKL Outlier",
    ),  # fmt: skip
    "tropd": MethodSpec(
        "tropd",
        f"{_TROPD}; guidance",
        guidance=True,
        teacher_topk=True,
        trust_mask=True,
        paper_row="TrOPD FKL (= TrOPD)",
    ),  # fmt: skip
    "tropd_mask": MethodSpec(
        "tropd_mask",
        "K1 policy gradient where M = 1, nothing on outliers; guidance",
        guidance=True,
        trust_mask=True,
        paper_row="TrOPD Mask",
    ),  # fmt: skip
    "tropd_clip": MethodSpec(
        "tropd_clip",
        "K1 policy gradient where M = 1, clipped reward on outliers; guidance",
        guidance=True,
        trust_mask=True,
        paper_row="TrOPD Clip",
    ),  # fmt: skip
    "tropd_aopd": MethodSpec(
        "tropd_aopd",
        "TrOPD + AOPD summed on the same tokens; guidance",
        guidance=True,
        teacher_topk=True,
        trust_mask=True,
        paper_row="TrOPD + AOPD",
    ),  # fmt: skip
    "fkl_full": MethodSpec(
        "fkl_full", "exact full-vocabulary forward KL on every token", full_divergence="forward_kl"
    ),
    "rkl_full": MethodSpec(
        "rkl_full", "exact full-vocabulary reverse KL on every token", full_divergence="reverse_kl"
    ),
    "jsd_full": MethodSpec(
        "jsd_full", "exact full-vocabulary generalised JSD(beta) on every token", full_divergence="jsd"
    ),
    "tropd_full": MethodSpec(
        "tropd_full",
        "K1 policy gradient where M = 1, exact full-vocabulary forward KL on outliers; guidance",
        guidance=True,
        trust_mask=True,
        full_divergence="forward_kl",
    ),  # fmt: skip
}

METHOD_NAMES: tuple[str, ...] = tuple(METHOD_SPECS)
"""Every selectable ``method.name``, in table order."""

TABLE5_METHODS: tuple[str, ...] = (
    "opd", "mask_outlier", "clip_outlier", "fkl", "fkl_outlier", "tropd_mask", "tropd_clip", "tropd",
)  # fmt: skip
"""The rows of the paper's Table 5 (math ablation), top to bottom."""


def method_spec(name: str) -> MethodSpec:
    """The spec of method ``name``; ``ValueError`` listing the allowed names otherwise."""
    if name not in METHOD_SPECS:
        close = difflib.get_close_matches(str(name), METHOD_NAMES, n=1, cutoff=0.5)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown distillation method {name!r}; allowed: {', '.join(METHOD_NAMES)}{hint}")
    return METHOD_SPECS[name]
