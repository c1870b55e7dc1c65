"""The rollout batch as it moves through the phases: generated -> scored -> trained on.

Sequences are right-padded ``[N, S]`` (prompt, response, padding). Every per-token field is aligned with
the *labels*: index ``t`` describes the prediction of ``tokens[:, t + 1]`` from the logits at position
``t``; the last position has no label and is never loss-bearing.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch


@dataclass
class RolloutBatch:
    """A slice of the global rollout batch (rows = sequences), with whatever signals exist so far."""

    tokens: torch.Tensor  # [N, S] int64
    loss_mask: torch.Tensor  # [N, S] bool: label t is a response token to train on
    is_teacher_prefix: torch.Tensor  # [N, S] bool: label t was written by the teacher (guidance)
    sample_ids: torch.Tensor  # [N] int64, unique in the global batch (keys the trust draw)
    # --- set by scoring ---
    lp_teacher: torch.Tensor | None = None  # [N, S] teacher log-prob of label t
    topk_ids: torch.Tensor | None = None  # [N, S, k] teacher's global top-k ids
    topk_logprobs: torch.Tensor | None = None  # [N, S, k] teacher's top-k log-probs
    entropy_teacher: torch.Tensor | None = None  # [N, S] teacher full-vocab entropy (EOPD)
    # [N, S, H_t] fp32 teacher final hidden state (the input of its output layer) at position t, scored
    # with the hidden payload (``method.teacher_payload``) for the full-vocabulary divergences
    teacher_hidden: torch.Tensor | None = None
    # [N, S] int64: with several teachers and the hidden payload, the index (teachers in name order) of
    # the teacher whose hidden states fill ``teacher_hidden`` (the first H_i of its columns) on this row
    teacher_index: torch.Tensor | None = None
    lp_student_old: torch.Tensor | None = None  # [N, S] generating student's log-prob of label t
    entropy_student_old: torch.Tensor | None = None  # [N, S]
    trust_mask: torch.Tensor | None = None  # [N, S] bool, M ~ Bernoulli(P_trust)

    def __post_init__(self) -> None:
        if self.tokens.dim() != 2:
            raise ValueError(f"tokens must be [sequences, length]; got shape {tuple(self.tokens.shape)}")
        for name in ("loss_mask", "is_teacher_prefix"):
            if getattr(self, name).shape != self.tokens.shape:
                raise ValueError(
                    f"{name} {tuple(getattr(self, name).shape)} must match tokens {tuple(self.tokens.shape)}"
                )
        if self.sample_ids.shape != self.tokens.shape[:1]:
            raise ValueError(
                f"sample_ids must be [{self.tokens.shape[0]}]; got {tuple(self.sample_ids.shape)}"
            )

    @property
    def num_sequences(self) -> int:
        return self.tokens.shape[0]

    @property
    def seq_length(self) -> int:
        return self.tokens.shape[1]

    @property
    def labels(self) -> torch.Tensor:
        """``[N, S]``: the next token at each position (0 at the last, which is never loss-bearing)."""
        return torch.cat([self.tokens[:, 1:], torch.zeros_like(self.tokens[:, :1])], dim=1)

    @property
    def position_ids(self) -> torch.Tensor:
        return torch.arange(self.seq_length, device=self.tokens.device).expand(self.num_sequences, -1)

    def rows(self, index: slice) -> RolloutBatch:
        """The sub-batch of sequences ``index`` (views, no copy)."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return replace(self, **{k: (v[index] if v is not None else None) for k, v in values.items()})

    def split(self, micro_batch_size: int) -> list[RolloutBatch]:
        if self.num_sequences % micro_batch_size:
            raise ValueError(
                f"{self.num_sequences} sequences do not split into microbatches of {micro_batch_size}; "
                "choose a micro_batch_size that divides the per-rank batch"
            )
        return [
            self.rows(slice(i, i + micro_batch_size)) for i in range(0, self.num_sequences, micro_batch_size)
        ]

    def with_signals(self, **signals: torch.Tensor | None) -> RolloutBatch:
        return replace(self, **signals)

    def to(self, device: torch.device) -> RolloutBatch:
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return replace(self, **{k: (v.to(device) if v is not None else None) for k, v in values.items()})
