"""Batched KV-cache sampling on a Megatron-Core ``GPTModel`` under its own TP x PP layout.

Why our own loop: Megatron's dynamic engine is GPU-only and its static engine neither continues from a
forced prefix nor hands activations between pipeline stages. Each step runs one of two decoders over the
batch's KV cache (``decoder=``): "cached" (``decoder.py``: the model's own parameters, keys rotated once
into the cache; 2.4x faster than "megatron" in ``bench/generation.py``) or "megatron" (``GPTModel.forward``
with Megatron's ``StaticInferenceContext``, for models the first cannot run exactly); "auto" picks. On
its first batch the engine compares the two decoders' prefill logits and keeps "megatron" if they differ.

* **Continuous batching** (``batching="continuous"``, the default; cached decoder only): ``max_batch_size``
  slots, each with its own positions. Every step packs one segment per occupied slot into one forward:
  the next ``prefill_chunk`` forced tokens (prompt + prefix) of a slot that has just taken a request, or
  the one token a decoding slot sampled last. So refills are prefilled in the same steps that decode the
  other slots, and a slot whose row ends takes the next waiting request on the next step (policy:
  ``slots.py``; per-slot attention: ``CachedDecoder.forward_slots``).
* **Static batching** (``batching="static"``): chunks of ``max_batch_size`` requests, left-aligned. One
  prefill runs the shortest prompt+prefix length common to all rows; after that every step feeds one
  token per row: the row's next forced token while it has one, else the token just sampled, until the
  longest row ends. One position offset serves the whole batch (the only scheme the "megatron" decoder
  can run). Forced tokens are never sampled on either path.
* **Batching invariance**: a row's logits do not depend on the other rows (up to fp32 summation order)
  and its randomness is keyed by its own (seed, sample id, position), so both paths, any
  ``max_batch_size``, any slot and any arrival order give a request the same tokens.
* **TP**: the last stage's logits are gathered over TP. ``batch x vocab`` per step is small, and every TP
  rank then holds the same bytes.
* **PP > 1**: each step, stage ``i`` receives the hidden states ``[s, b, h]`` from stage ``i - 1`` (a
  continuous step's packed tokens travel as ``[T, 1, h]``), runs its layers and sends them on; the last
  stage samples and broadcasts (token, log-prob) to its pipeline over ``groups.pp_group``. Every rank
  runs the same slot scheduler on those broadcast tokens, so all stages agree on which slots end and
  refill, and on the next step's shape; TP ranks sample from the same gathered logits and agree too.
* **Randomness** is stateless: the uniform for a token is the sampling stream's (``ops/streams.py``) at
  (seed, sample id, position), turned into a token by inverse-CDF sampling. So every rank draws the same
  token, a request's tokens do not depend on the other requests in its batch, and re-runs reproduce.
* Padded vocabulary columns (``>= vocab_size``) are cut off before sampling, so they are never drawn.

Megatron-Core versions, "megatron" decoder: written against 0.16.1 (``GPTModel.forward(...,
inference_context=, runtime_gather_output=)``, ``StaticInferenceContext(max_batch_size,
max_sequence_length)`` with ``sequence_len_offset`` advanced by the caller). In static batching Megatron
slices RoPE by ``sequence_len_offset``, not by ``position_ids`` (which we still pass, for versions that
read them). Not run against 0.19 here: feasibility.md §4 found its ``StaticInferenceContext`` and these
forward arguments present (only ``GPTInferenceWrapper``'s signature changed, which we do not use). Some
versions materialise only the last position's logits and some every position; we slice the last one
either way. The "cached" decoder reads parameters and attributes of 0.16.1's modules; it has not been run
against 0.19 (on another layer layout, "auto" falls back when ``unsupported_reason`` says so).
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from megatron_tropd.config import BATCHINGS, DECODERS
from megatron_tropd.ops.streams import Stream, stream_uniform
from megatron_tropd.rollout.decoder import CachedDecoder, SlotStep, unsupported_reason
from megatron_tropd.rollout.engine import GenerationRequest, GenerationResult, SamplingParams
from megatron_tropd.rollout.slots import GenerationStats, SlotScheduler
from megatron_tropd.runtime import cpu_mode_suspended, default_device

if TYPE_CHECKING:  # placed.PlacedModel.engine builds this engine: a run-time import would be a cycle
    from megatron_tropd.placed import PlacedModel

logger = logging.getLogger(__name__)

# Largest relative logit difference accepted between the two decoders (``_check_cached_decoder``): fp32
# disagrees only in summation order; half precision rounds each layer's output (bf16: 8 mantissa bits).
_DECODER_TOLERANCE = {torch.float32: 1e-4}


# ---------------------------------------------------------------------------------------------------------
# Sampling (pure functions of the gathered logits)
# ---------------------------------------------------------------------------------------------------------


def filter_logprobs(logprobs: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Apply top-k then top-p to ``logprobs [b, V]`` and renormalise; removed tokens get ``-inf``.

    Top-p keeps the smallest prefix of the descending-probability order whose mass reaches ``top_p``
    (the most likely token always survives), as Hugging Face does.
    """
    if 0 < top_k < logprobs.shape[-1]:
        kept = torch.full_like(logprobs, float("-inf"))
        top_values, top_ids = logprobs.topk(top_k, dim=-1)
        logprobs = kept.scatter(-1, top_ids, top_values)
    if top_p < 1.0:
        sorted_lp, order = logprobs.sort(dim=-1, descending=True)
        sorted_probs = sorted_lp.exp()
        mass_before = sorted_probs.cumsum(-1) - sorted_probs  # [b, V]
        sorted_lp = sorted_lp.masked_fill(mass_before >= top_p, float("-inf"))
        logprobs = torch.full_like(logprobs, float("-inf")).scatter(-1, order, sorted_lp)
    return logprobs - logprobs.logsumexp(-1, keepdim=True)


def sampling_uniforms(seed: int, sample_ids: torch.Tensor, position: int | torch.Tensor) -> torch.Tensor:
    """``[b]`` float64 in (0, 1): a pure function of (seed, sample id, position of the drawn token).

    ``position`` is one int for the whole batch (static batching) or a ``[b]`` int64 tensor, one per row
    (continuous batching); either way the key of a row is its own (seed, sample id, position)."""
    positions = position if isinstance(position, torch.Tensor) else torch.full_like(sample_ids, position)
    return stream_uniform(Stream.SAMPLING, seed, sample_ids, positions)


def sample_tokens(
    logits: torch.Tensor, vocab_size: int, sampling: SamplingParams, uniforms: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one token per row from ``logits [b, V_padded]``: ``(tokens [b] int64, logprobs [b] fp32)``.

    The log-prob is that of the distribution actually sampled from (after temperature, top-k, top-p);
    greedy (temperature 0) is a point mass, log-prob 0, and needs no ``uniforms`` (may be None).
    Columns ``>= vocab_size`` are padding: cut off.
    """
    logits = logits[:, :vocab_size].float()  # [b, V]
    if sampling.temperature == 0.0:
        return logits.argmax(-1), torch.zeros(logits.shape[0], device=logits.device)
    logprobs = torch.log_softmax(logits / sampling.temperature, dim=-1)
    logprobs = filter_logprobs(logprobs, sampling.top_k, sampling.top_p)
    cdf = logprobs.double().exp().cumsum(-1)  # [b, V]
    targets = (uniforms.to(cdf.device) * cdf[:, -1]).unsqueeze(-1)  # [b, 1], inside (0, total mass)
    tokens = torch.searchsorted(cdf, targets).squeeze(-1).clamp_max(vocab_size - 1)
    return tokens, logprobs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


# ---------------------------------------------------------------------------------------------------------
# The engine
# ---------------------------------------------------------------------------------------------------------


def _relative_error(values: torch.Tensor, reference: torch.Tensor) -> float:
    """``max |values - reference| / max(1, max |reference|)``, in fp32."""
    reference = reference.float()
    scale = reference.abs().max().clamp_min(1.0)
    return ((values.float() - reference).abs().max() / scale).item()


def _choose_decoder(decoder: str, model: torch.nn.Module) -> str:
    """``"cached"`` (``decoder.py``) wherever it runs the model exactly, else Megatron's own forward."""
    if decoder not in DECODERS:
        raise ValueError(f"decoder={decoder!r} is not one of {', '.join(DECODERS)}")
    if decoder == "megatron":
        return decoder
    reason = unsupported_reason(model)
    if reason is None:
        return "cached"
    if decoder == "cached":
        raise ValueError(
            f"decoder='cached' cannot run this model ({reason}); use decoder='auto' or 'megatron'"
        )
    return "megatron"


def _check_batching(batching: str, prefill_chunk: int) -> None:
    if batching not in BATCHINGS:
        raise ValueError(f"batching={batching!r} is not one of {', '.join(BATCHINGS)}")
    if prefill_chunk < 1:
        raise ValueError(f"prefill_chunk={prefill_chunk}: a slot must feed at least 1 token per step")


def _common_prefix(chunk: Sequence[GenerationRequest]) -> torch.Tensor:
    """``[b, p]`` int64: the first ``p`` forced tokens of each request, ``p`` the shortest forced length."""
    length = min(r.forced_length for r in chunk)
    return torch.tensor([(*r.prompt_token_ids, *r.prefix_token_ids)[:length] for r in chunk])


@dataclass
class _ChunkState:
    """Decoding state of one batch of rows (all tensors on the engine's device)."""

    tokens: torch.Tensor  # [b, max_total] int64: forced tokens, then generated, then pad (0)
    logprobs: torch.Tensor  # [b, max_total] fp32: sampler log-prob of the token at each position
    forced_length: torch.Tensor  # [b] int64: prompt + prefix length
    budget: torch.Tensor  # [b] int64: tokens each row may generate
    num_generated: torch.Tensor  # [b] int64
    stopped: torch.Tensor  # [b] bool: a stop token was sampled
    sample_ids: torch.Tensor  # [b] int64

    def finished(self, position: int) -> torch.Tensor:
        """``[b]`` bool: rows that need no token at ``position`` (no forced token left and done)."""
        done = self.stopped | (self.num_generated >= self.budget)
        return (self.forced_length <= position) & done


class MegatronGenerationEngine:
    """``GenerationEngine`` over one model replica (its TP x PP ranks); collective over those ranks.

    Every rank of the replica calls ``generate`` with the same requests and gets the same results. Each
    row's prompt + prefix + ``max_new_tokens`` must fit in ``max_sequence_length`` (the KV cache's length).

    ``batching="continuous"`` (default): ``max_batch_size`` slots; a slot whose row ends takes the next
    waiting request, which is prefilled ``prefill_chunk`` tokens per step in the same steps that decode
    the other slots (``rollout/slots.py``, ``CachedDecoder.forward_slots``). ``batching="static"``:
    chunks of ``max_batch_size`` requests, each decoded until its longest row ends. The "megatron" decoder
    has no per-slot positions, so with it generation batches statically (a warning says so).
    ``stats`` describes the last ``generate`` call's use of the slots.
    """

    def __init__(
        self,
        placed: PlacedModel,
        max_sequence_length: int,
        max_batch_size: int,
        decoder: str = "auto",
        batching: str = "continuous",
        prefill_chunk: int = 512,
    ):
        if max_batch_size < 1 or max_sequence_length < 2:
            raise ValueError(
                f"max_batch_size={max_batch_size} and max_sequence_length={max_sequence_length}: need at "
                "least 1 row and 2 positions (a prompt token and one generated token)"
            )
        _check_batching(batching, prefill_chunk)
        self.placed = placed
        self.model = model = placed.stage
        self.groups = placed.groups
        self.vocab_size = placed.vocab_size
        self.max_sequence_length = max_sequence_length
        self.max_batch_size = max_batch_size
        self.device = default_device()
        self.decoder = _choose_decoder(decoder, model)
        self.batching, self.prefill_chunk = batching, prefill_chunk
        self._cached_checked = False
        self._warned_static = False
        self.stats = GenerationStats()

    def _effective_batching(self) -> str:
        """Continuous batching needs per-slot positions, which only the cached decoder has."""
        if self.batching == "continuous" and self.decoder == "megatron":
            if not self._warned_static:
                self._warned_static = True
                logger.warning(
                    "batching='continuous' needs per-slot positions, which decoder='megatron' "
                    "(GPTModel.forward with a StaticInferenceContext) does not have; batching statically"
                )
            return "static"
        return self.batching

    def generate(
        self, requests: Sequence[GenerationRequest], sampling: SamplingParams
    ) -> list[GenerationResult]:
        """One result per request, in order. The model is put in eval mode and restored afterwards."""
        sampling.validate()
        self._validate(requests, sampling)
        self.stats = GenerationStats()
        if not requests:
            return []
        was_training = self.model.training
        self.model.eval()
        try:
            if self.decoder == "cached" and not self._cached_checked:
                with torch.no_grad():
                    self._check_cached_decoder(
                        _common_prefix(requests[: self.max_batch_size]).to(self.device)
                    )
            if self._effective_batching() == "continuous":
                return self._generate_continuous(requests, sampling)
            results = []
            for start in range(0, len(requests), self.max_batch_size):
                chunk = list(requests[start : start + self.max_batch_size])
                results.extend(self._generate_chunk(chunk, sampling))
            return results
        finally:
            self.model.train(was_training)

    def _validate(self, requests: Sequence[GenerationRequest], sampling: SamplingParams) -> None:
        for stop in sampling.stop_token_ids:
            if not 0 <= stop < self.vocab_size:
                raise ValueError(f"stop token {stop} is outside the vocabulary [0, {self.vocab_size})")
        for request in requests:
            if not request.prompt_token_ids:
                raise ValueError(f"request {request.sample_id} has an empty prompt; give at least one token")
            forced = (*request.prompt_token_ids, *request.prefix_token_ids)
            if min(forced) < 0 or max(forced) >= self.vocab_size:
                raise ValueError(f"request {request.sample_id} has token ids outside [0, {self.vocab_size})")
            if request.max_new_tokens is not None and request.max_new_tokens < 0:
                raise ValueError(f"request {request.sample_id} has max_new_tokens < 0")
            total = request.forced_length + request.budget(sampling)
            if total > self.max_sequence_length:
                raise ValueError(
                    f"request {request.sample_id} needs {total} positions (prompt + prefix + "
                    f"max_new_tokens) but the engine's max_sequence_length is {self.max_sequence_length}; "
                    "raise max_sequence_length or lower max_new_tokens"
                )

    def _new_state(self, chunk: list[GenerationRequest], max_total: int, sampling) -> _ChunkState:
        tokens = torch.zeros(len(chunk), max_total, dtype=torch.int64, device=self.device)
        for row, request in enumerate(chunk):
            forced = (*request.prompt_token_ids, *request.prefix_token_ids)
            tokens[row, : len(forced)] = torch.tensor(forced, dtype=torch.int64)
        forced_length = torch.tensor([r.forced_length for r in chunk], dtype=torch.int64, device=self.device)
        return _ChunkState(
            tokens=tokens,
            logprobs=torch.zeros(len(chunk), max_total, device=self.device),
            forced_length=forced_length,
            budget=torch.tensor([r.budget(sampling) for r in chunk], dtype=torch.int64, device=self.device),
            num_generated=torch.zeros_like(forced_length),
            stopped=torch.zeros_like(forced_length, dtype=torch.bool),
            sample_ids=torch.tensor([r.sample_id for r in chunk], dtype=torch.int64, device=self.device),
        )

    @torch.no_grad()
    def _generate_chunk(self, chunk: list[GenerationRequest], sampling: SamplingParams):
        """Static batching: one batch of rows, decoded until its longest row ends."""
        max_total = max(r.forced_length + r.budget(sampling) for r in chunk)
        state = self._new_state(chunk, max_total, sampling)
        position = min(r.forced_length for r in chunk)  # the prefill covers what every row has forced
        step_input = state.tokens[:, :position]  # [b, s]
        stage = self._new_stage(len(chunk), max_total)
        # No stop tokens (the common case): skip the per-step membership test.
        stop_ids = None
        if sampling.stop_token_ids:
            stop_ids = torch.tensor(sampling.stop_token_ids, dtype=torch.int64, device=self.device)
        useful = torch.zeros((), dtype=torch.int64, device=self.device)  # read once, after the loop
        steps = 0
        # The cached decoder's loop runs plain torch ops only: it needs none of CPU mode's interception.
        with cpu_mode_suspended() if self.decoder == "cached" else contextlib.nullcontext():
            while not (finished := state.finished(position)).all():
                useful += (~finished).sum()
                logits = self._forward(stage, step_input)  # [b, V_padded] on the last stage
                sampled, logprobs = self._sample(logits, sampling, state.sample_ids, position)
                self._record(state, position, sampled, logprobs, stop_ids)
                step_input = state.tokens[:, position : position + 1]  # [b, 1]
                position += 1
                steps += 1
        self.stats.steps += steps
        self.stats.slot_steps += steps * len(chunk)
        self.stats.useful_slot_steps += int(useful)
        self.stats.generated_tokens += int(state.num_generated.sum())
        return [self._result(state, row, request) for row, request in enumerate(chunk)]

    @torch.no_grad()
    def _generate_continuous(self, requests: Sequence[GenerationRequest], sampling: SamplingParams):
        """Continuous batching over ``max_batch_size`` slots with the cached decoder (see ``slots.py``).

        Each step packs every occupied slot's segment (a prefill chunk or one decode token) into one
        forward; the tokens it draws go to every rank of the pipeline before the scheduler reads them.
        """
        num_slots = min(self.max_batch_size, len(requests))
        scheduler = SlotScheduler(requests, sampling, num_slots, self.prefill_chunk)
        max_length = max(r.forced_length + r.budget(sampling) for r in requests)
        decoder = CachedDecoder(self.model, num_slots, max_length, self.device)
        with cpu_mode_suspended():
            while scheduler.refill():
                step = SlotStep.build(scheduler.take_step(), num_slots, self.device)
                logits = self._forward_slots(decoder, step)  # [n, V_padded] on the last stage
                if step.sample_slots:  # a step of prefill chunks only draws nothing
                    tokens, logprobs = self._sample(logits, sampling, step.sample_ids, step.sample_positions)
                    scheduler.record(step.sample_slots, tokens.tolist(), logprobs.tolist())
        self.stats = scheduler.stats
        return scheduler.results

    def _check_cached_decoder(self, prefill: torch.Tensor) -> None:
        """Once per engine: the cached decoder's prefill logits against Megatron's forward on the same
        tokens. Where they disagree (a layer layout or a device the decoder misreads), warn and generate
        with Megatron's forward from then on. Costs one extra prefill."""
        self._cached_checked = True
        batch, max_length = prefill.shape
        cached = self._forward(CachedDecoder(self.model, batch, max_length, self.device), prefill)
        stage = _MegatronStage(self.model, batch, max_length, self.device, self.groups.is_last_stage)
        reference = self._forward(stage, prefill)
        agree = torch.ones(1, device=self.device)
        if self.groups.is_last_stage:
            error = _relative_error(cached[:, : self.vocab_size], reference[:, : self.vocab_size])
            agree.fill_(float(error <= _DECODER_TOLERANCE.get(reference.dtype, 5e-2)))
            if not agree.item():
                logger.warning(
                    "the cached decoder's logits differ from Megatron's forward by %.3g (relative to the "
                    "largest logit); generating with decoder='megatron'",
                    error,
                )
        if self.groups.layout.pipeline_parallel > 1:
            dist.broadcast(agree, src=self.groups.pipeline_ranks[-1], group=self.groups.pp_group)
        if not agree.item():
            self.decoder = "megatron"

    def _new_stage(self, batch_size: int, max_length: int):
        if self.decoder == "cached":
            return CachedDecoder(self.model, batch_size, max_length, self.device)
        return _MegatronStage(self.model, batch_size, max_length, self.device, self.groups.is_last_stage)

    def _record(self, state: _ChunkState, position, sampled, logprobs, stop_ids) -> None:
        """Write the token at ``position``: forced where the row has one, sampled while it is generating.

        Only generating rows are written: a forced row already holds its token there, and a finished row
        holds the pad (0) with log-prob 0 that ``_new_state`` put there (each position is written once).
        """
        generating = ~(
            (position < state.forced_length) | state.stopped | (state.num_generated >= state.budget)
        )  # [b]
        state.tokens[:, position] = torch.where(generating, sampled, state.tokens[:, position])
        state.logprobs[:, position] = torch.where(generating, logprobs, state.logprobs[:, position])
        if stop_ids is not None:
            state.stopped |= generating & torch.isin(sampled, stop_ids)
        state.num_generated += generating

    def _result(self, state: _ChunkState, row: int, request: GenerationRequest) -> GenerationResult:
        forced, generated = int(state.forced_length[row]), int(state.num_generated[row])
        tokens = state.tokens[row, : forced + generated].tolist()
        return GenerationResult(
            token_ids=tokens,
            prompt_length=len(request.prompt_token_ids),
            prefix_length=len(request.prefix_token_ids),
            generated_token_ids=tokens[forced:],
            generated_logprobs=state.logprobs[row, forced : forced + generated].tolist(),
            finished_by_stop=bool(state.stopped[row]),
            sample_id=request.sample_id,
        )

    def _forward(self, stage, step_input: torch.Tensor) -> torch.Tensor | None:
        """Run this stage on ``step_input [b, s]``, handing hidden states ``[s, b, h]`` down the pipeline.

        Returns the gathered last-position logits ``[b, V_padded]`` on the last stage, None elsewhere.
        """
        batch, length = step_input.shape
        return self._pipeline_forward(batch, length, lambda hidden: stage.forward(step_input, hidden))

    def _forward_slots(self, decoder: CachedDecoder, step: SlotStep) -> torch.Tensor | None:
        """One continuous-batching step through this stage: the packed tokens travel as a batch of one
        sequence of ``step.num_tokens``; the last stage returns the drawn rows' logits ``[n, V_padded]``."""
        return self._pipeline_forward(1, step.num_tokens, functools.partial(decoder.forward_slots, step))

    def _pipeline_forward(self, batch: int, length: int, run_stage) -> torch.Tensor | None:
        """``run_stage(hidden)`` on this stage (``hidden [length, batch, h]`` received from the stage before,
        None on the first), its output sent to the next stage; the last stage's output is returned."""
        hidden = None
        if not self.groups.is_first_stage:
            config = self.model.config
            hidden = torch.empty(
                length, batch, config.hidden_size, dtype=config.pipeline_dtype, device=self.device
            )
            dist.recv(hidden, src=self._stage_rank(-1), group=self.groups.pp_group)
        output = run_stage(hidden)
        if not self.groups.is_last_stage:
            dist.send(output.contiguous(), dst=self._stage_rank(+1), group=self.groups.pp_group)
            return None
        return output

    def _stage_rank(self, step: int) -> int:
        """Global rank of the neighbouring stage (same TP rank) ``step`` stages down the pipeline."""
        return self.groups.pipeline_ranks[self.groups.position.pp_rank + step]

    def _sample(self, logits, sampling: SamplingParams, sample_ids: torch.Tensor, position):
        """Sample on the last stage, then broadcast ``(tokens [b], logprobs [b])`` to the whole pipeline.

        ``position``: where the drawn tokens go, one int for the batch or a ``[b]`` tensor per row."""
        if self.groups.is_last_stage:
            # Greedy reads no uniforms; the hash costs a few dozen small ops per step, so skip it.
            uniforms = None
            if sampling.temperature != 0.0:
                uniforms = sampling_uniforms(sampling.seed, sample_ids, position)
            tokens, logprobs = sample_tokens(logits, self.vocab_size, sampling, uniforms)
            if self.groups.layout.pipeline_parallel == 1:
                return tokens, logprobs  # nothing to broadcast
        batch = sample_ids.shape[0]
        packed = torch.zeros(2, batch, dtype=torch.float64, device=self.device)  # token ids < 2**53: exact
        if self.groups.is_last_stage:
            packed[0], packed[1] = tokens.double(), logprobs.double()
        if self.groups.layout.pipeline_parallel > 1:
            dist.broadcast(packed, src=self.groups.pipeline_ranks[-1], group=self.groups.pp_group)
        return packed[0].long(), packed[1].float()


class _MegatronStage:
    """One batch through ``GPTModel.forward``, with Megatron's ``StaticInferenceContext`` as the KV cache:
    the ``decoder="megatron"`` path, for any model Megatron-Core itself can run."""

    def __init__(self, model, batch_size: int, max_length: int, device: torch.device, is_last_stage: bool):
        from megatron.core.inference.contexts import StaticInferenceContext

        self.model = model
        self.is_last_stage = is_last_stage
        self.context = StaticInferenceContext(batch_size, max_length)
        # Built once: each step's position ids are a slice, not a fresh arange.
        self.position_ids = torch.arange(max_length, device=device).expand(batch_size, max_length)

    def forward(self, tokens: torch.Tensor, hidden: torch.Tensor | None = None) -> torch.Tensor:
        """Same contract as ``CachedDecoder.forward``: last-position logits on the last stage, else the
        hidden states ``[s, b, h]``."""
        length = tokens.shape[1]
        offset = self.context.sequence_len_offset
        if hidden is not None:
            self.model.set_input_tensor(hidden)
        output = self.model(
            tokens,
            self.position_ids[:, offset : offset + length],
            None,
            inference_context=self.context,
            runtime_gather_output=True,
        )
        self.context.sequence_len_offset += length
        if length > 1:
            self.context.enable_decode_mode()  # every later step feeds one token per row
        return output[:, -1, :] if self.is_last_stage else output
