"""The generation interface the trainer is written against, and its conversion to a ``RolloutBatch``.

An engine takes requests (a prompt, optionally a forced prefix to continue from, a sample id) and returns
one ``GenerationResult`` per request. The forced prefix is how off-policy guidance enters: the teacher
writes the first response tokens, the student continues, and ``to_rollout_batch`` marks which labels came
from the teacher (``is_teacher_prefix``) so the losses can treat them apart.

Sampling is a pure function of (seed, sample id, position), see ``megatron_engine.py``: a request gives
the same tokens whatever batch it is in, on every rank, and on every re-run.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from megatron_tropd.batch import RolloutBatch
from megatron_tropd.topology import ModelGroups


@dataclass(frozen=True)
class SamplingParams:
    """How tokens are drawn; shared by every request of one ``generate`` call."""

    temperature: float = 1.0
    """Softmax temperature; 0 means greedy (argmax), whose sampler log-prob is 0 (a point mass)."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p (1 = off)."""
    top_k: int = 0
    """Keep only the top_k most likely tokens (0 = off)."""
    max_new_tokens: int = 16
    """Tokens generated after the prompt and forced prefix (the prefix does not count)."""
    stop_token_ids: tuple[int, ...] = ()
    """A sampled token in this set (e.g. EOS) ends the sequence; it is kept as the last generated token."""
    seed: int = 0
    """Keys the sampling uniforms together with each request's sample id and the token position."""

    def validate(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy); got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1]; got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off); got {self.top_k}")
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0; got {self.max_new_tokens}")


@dataclass(frozen=True)
class GenerationRequest:
    """One sequence to generate. For n samples of a prompt, send n requests with distinct sample ids."""

    prompt_token_ids: tuple[int, ...]
    """The prompt (at least one token)."""
    sample_id: int
    """Unique in the rollout batch: keys the sampling randomness and becomes ``RolloutBatch.sample_ids``."""
    prefix_token_ids: tuple[int, ...] = ()
    """Response tokens forced before sampling starts (a teacher prefix); never sampled."""
    max_new_tokens: int | None = None
    """This request's own generation budget (None = the call's ``SamplingParams.max_new_tokens``); a
    guided rollout gets the response budget less its prefix."""

    @property
    def forced_length(self) -> int:
        return len(self.prompt_token_ids) + len(self.prefix_token_ids)

    def budget(self, sampling: SamplingParams) -> int:
        return sampling.max_new_tokens if self.max_new_tokens is None else self.max_new_tokens


@dataclass
class GenerationResult:
    """What one request produced; ``token_ids = prompt + prefix + generated``."""

    token_ids: list[int]
    prompt_length: int
    prefix_length: int
    generated_token_ids: list[int]
    generated_logprobs: list[float]
    """Log-prob of each generated token under the distribution it was sampled from (after temperature,
    top-k and top-p; 0.0 for greedy)."""
    finished_by_stop: bool
    """True when the last generated token is a stop token (otherwise max_new_tokens was reached)."""
    sample_id: int = 0


class GenerationEngine(Protocol):
    """Anything that turns requests into completions: the Megatron KV-cache engine, a vLLM adapter, ...

    ``groups`` is the layout of the model it runs (``generate_data_parallel`` splits requests over its
    data-parallel replicas)."""

    groups: ModelGroups

    def generate(
        self, requests: Sequence[GenerationRequest], sampling: SamplingParams
    ) -> list[GenerationResult]:
        """One result per request, in order; collective over the model's ranks (all pass the same list)."""
        ...


def to_rollout_batch(results: Sequence[GenerationResult], pad_token_id: int = 0) -> RolloutBatch:
    """Right-pad the results into a ``RolloutBatch`` (label-aligned masks, see ``batch.py``).

    ``loss_mask[t]`` is True where label ``t + 1`` is a prefix or generated token; ``is_teacher_prefix[t]``
    where it is a forced-prefix token. Padding after a stopped sequence is never loss-bearing.
    """
    if not results:
        raise ValueError("to_rollout_batch needs at least one GenerationResult")
    seq_length = max(len(r.token_ids) for r in results)
    num_rows = len(results)
    tokens = torch.full((num_rows, seq_length), pad_token_id, dtype=torch.int64)  # [N, S]
    loss_mask = torch.zeros(num_rows, seq_length, dtype=torch.bool)  # [N, S], label-aligned
    is_teacher_prefix = torch.zeros_like(loss_mask)
    for row, result in enumerate(results):
        if result.prompt_length < 1:
            raise ValueError(f"result {result.sample_id} has no prompt: every sequence needs a first token")
        length = len(result.token_ids)
        response_start = result.prompt_length  # first response token (prefix or generated)
        prefix_end = response_start + result.prefix_length
        tokens[row, :length] = torch.tensor(result.token_ids, dtype=torch.int64)
        loss_mask[row, response_start - 1 : length - 1] = True  # labels t+1 in [response_start, length)
        is_teacher_prefix[row, response_start - 1 : prefix_end - 1] = True
    sample_ids = torch.tensor([r.sample_id for r in results], dtype=torch.int64)
    return RolloutBatch(tokens, loss_mask, is_teacher_prefix, sample_ids)
