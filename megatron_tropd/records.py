"""What one training step reports: a ``StepRecord``, written by ``metrics_log`` to every sink.

The loop returns one per step; ``row()`` flattens it into the names that ``metrics.jsonl``,
TensorBoard and W&B carry (the method's token-averaged metrics under their own names, e.g. ``loss``,
``term/pg``, ``trust_fraction``).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class PhaseSeconds:
    """Wall-clock seconds of the step's three phases."""

    generate: float
    score: float
    train: float


@dataclass(frozen=True)
class StepRecord:
    """One training step, as the reporting rank saw it."""

    step: int
    metrics: dict[str, float]
    """The method's metrics of the last update, token-averaged over microbatches and data-parallel ranks."""
    grad_norm: float
    learning_rate: float
    rollout: dict[str, float]
    """Length statistics of the step's rollouts (``response_length``, ``prefix_share``)."""
    trained_tokens: int
    """Loss-bearing tokens of the global rollout batch."""
    seconds: PhaseSeconds
    nonfinite_skipped: bool = False
    """The last update had a non-finite loss or gradient and was skipped on every rank."""
    nonfinite_skipped_total: int = 0
    """Skipped updates since this process started."""
    extra: dict[str, float] = field(default_factory=dict)
    """Further numbers a phase reports (batching occupancy, padding share, ...)."""

    def row(self) -> dict:
        """The flat record of the step's numbers that every sink writes."""
        per_second = {
            "tokens_per_s/generate": self.trained_tokens / self.seconds.generate,
            "tokens_per_s/score": self.trained_tokens / self.seconds.score,
            "tokens_per_s/train": self.trained_tokens / self.seconds.train,
        }
        return {
            "step": self.step, **self.metrics, "grad_norm": self.grad_norm, "lr": self.learning_rate,
            **self.rollout, "nonfinite_skipped": int(self.nonfinite_skipped),
            "nonfinite_skipped_total": self.nonfinite_skipped_total, **per_second, **self.extra,
        }  # fmt: skip
