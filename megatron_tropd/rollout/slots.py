"""Continuous batching's bookkeeping: which request holds each slot, what it feeds next, when it ends.

Pure host-side Python, no tensors: every rank of a model replica runs its own ``SlotScheduler`` over the
same requests and is handed the same sampled tokens (the engine broadcasts them over the pipeline; TP
ranks sample from the same gathered logits), so every rank takes the same decisions in the same order
and the step shapes of the collectives agree.

Policy:

* **Refill, first come first served.** Before each step every free slot takes the next waiting request,
  in request order. A request with no generation budget never takes a slot (its result is its forced
  tokens).
* **Chunked prefill, mixed with decoding.** In one step, a slot with forced tokens (prompt + prefix) not
  yet in its cache feeds the next ``prefill_chunk`` of them, while every other slot feeds the one token
  it sampled last. The step that feeds a slot's last known token draws its next one.
* **A slot frees itself** on the step that draws a stop token or the last token of its budget; the next
  step refills it. The token that ended a sequence is never fed.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from megatron_tropd.rollout.decoder import Segment
from megatron_tropd.rollout.engine import GenerationRequest, GenerationResult, SamplingParams


@dataclass
class GenerationStats:
    """How the slots were used by one ``generate`` call (each slot of each step is a slot-step)."""

    steps: int = 0
    """Decoder forward passes."""
    slot_steps: int = 0
    """``steps x`` the batch's slots (rows)."""
    useful_slot_steps: int = 0
    """Slot-steps that fed a live request's tokens (not a finished row's, not an empty slot's)."""
    generated_tokens: int = 0

    @property
    def occupancy(self) -> float:
        """Share of slot-steps doing useful work (1.0 when nothing ran)."""
        return self.useful_slot_steps / self.slot_steps if self.slot_steps else 1.0


@dataclass
class _Slot:
    """A request in a slot."""

    index: int  # the request's position in the call
    request: GenerationRequest
    forced: tuple[int, ...]  # prompt + prefix
    budget: int
    cached: int = 0  # positions already in the slot's KV cache
    generated: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    stopped: bool = False

    def known_tokens(self, start: int, end: int) -> tuple[int, ...]:
        """Tokens at positions ``start .. end - 1``: forced ones, then sampled ones."""
        return (*self.forced, *self.generated)[start:end]

    @property
    def num_known(self) -> int:
        return len(self.forced) + len(self.generated)

    def result(self) -> GenerationResult:
        return GenerationResult(
            token_ids=[*self.forced, *self.generated],
            prompt_length=len(self.request.prompt_token_ids),
            prefix_length=len(self.request.prefix_token_ids),
            generated_token_ids=list(self.generated),
            generated_logprobs=list(self.logprobs),
            finished_by_stop=self.stopped,
            sample_id=self.request.sample_id,
        )


class SlotScheduler:
    """Assigns ``requests`` to ``num_slots`` slots and turns each step into ``Segment``s (see module doc).

    Loop: ``while scheduler.refill(): segments = scheduler.take_step(); ...; scheduler.record(...)``;
    then ``results`` holds one ``GenerationResult`` per request, in request order.
    """

    def __init__(
        self,
        requests: Sequence[GenerationRequest],
        sampling: SamplingParams,
        num_slots: int,
        prefill_chunk: int,
    ):
        assert num_slots >= 1 and prefill_chunk >= 1
        self.requests = list(requests)
        self.sampling = sampling
        self.prefill_chunk = prefill_chunk
        self.stop_ids = frozenset(sampling.stop_token_ids)
        self.waiting = deque(range(len(self.requests)))
        self.slots: list[_Slot | None] = [None] * num_slots
        self.results: list[GenerationResult | None] = [None] * len(self.requests)
        self.stats = GenerationStats()

    def refill(self) -> bool:
        """Give every free slot the next waiting request; True while any slot holds one."""
        for slot_index in range(len(self.slots)):
            while self.slots[slot_index] is None and self.waiting:
                index = self.waiting.popleft()
                request = self.requests[index]
                forced = (*request.prompt_token_ids, *request.prefix_token_ids)
                slot = _Slot(index, request, forced, request.budget(self.sampling))
                if slot.budget == 0:  # nothing to generate: no prefill either
                    self.results[index] = slot.result()
                else:
                    self.slots[slot_index] = slot
        return any(slot is not None for slot in self.slots)

    def take_step(self) -> list[Segment]:
        """The next step's segment of every occupied slot, in slot order; their tokens count as cached."""
        segments = []
        for slot_index, slot in enumerate(self.slots):
            if slot is None:
                continue
            end = min(slot.num_known, slot.cached + self.prefill_chunk)
            tokens = slot.known_tokens(slot.cached, end)
            segments.append(
                Segment(slot_index, slot.cached, tokens, slot.request.sample_id, end == slot.num_known)
            )
            slot.cached = end
        self.stats.steps += 1
        self.stats.slot_steps += len(self.slots)
        self.stats.useful_slot_steps += len(segments)
        return segments

    def record(self, slots: Sequence[int], tokens: Sequence[int], logprobs: Sequence[float]) -> None:
        """Append each drawn token to its slot's sequence; free the slots whose sequence ended."""
        for slot_index, token, logprob in zip(slots, tokens, logprobs, strict=True):
            slot = self.slots[slot_index]
            slot.generated.append(token)
            slot.logprobs.append(logprob)
            slot.stopped = token in self.stop_ids
            if slot.stopped or len(slot.generated) == slot.budget:
                self.results[slot.index] = slot.result()
                self.slots[slot_index] = None
        self.stats.generated_tokens += len(tokens)
