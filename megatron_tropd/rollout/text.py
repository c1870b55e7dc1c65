"""Text in, text out over a ``GenerationEngine``: the ``generate`` callable of ``eval.scoring.evaluate``.

``TextGenerator(engine, tokenizer, ...)(prompts, k, temperature)`` renders each prompt with the
chat template, tokenizes it, asks for ``k`` samples, and decodes the responses (the stop token dropped).
It is collective over every rank of the job: each data-parallel replica generates its share of the
requests and the results are gathered, so every rank returns the same lists.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch.distributed as dist

from megatron_tropd.data import Tokenizer, encode_prompt
from megatron_tropd.rollout.engine import GenerationRequest, GenerationResult, SamplingParams


def _replica_requests(count: int, data_parallel: int, dp_rank: int) -> slice:
    """Contiguous near-equal shares (equal when ``data_parallel`` divides ``count``; a replica may get
    none when there are fewer requests than replicas: it then generates nothing)."""
    start = dp_rank * count // data_parallel
    return slice(start, (dp_rank + 1) * count // data_parallel)


def generate_data_parallel(
    engine, requests: Sequence[GenerationRequest], sampling: SamplingParams
) -> list[GenerationResult]:
    """Each data-parallel replica of the engine's model generates its slice of ``requests``; every rank
    gets all results."""
    groups = engine.groups
    rows = _replica_requests(len(requests), groups.data_parallel, groups.position.dp_rank)
    mine = engine.generate(list(requests[rows]), sampling)
    if groups.data_parallel == 1:
        return mine
    gathered = [None] * groups.data_parallel
    dist.all_gather_object(gathered, mine, group=groups.dp_group)
    return [result for part in gathered for result in part]


class TextGenerator:
    """``generate(prompts, k, temperature) -> k responses per prompt`` on one model's layout."""

    def __init__(
        self,
        engine,
        tokenizer: Tokenizer,
        *,
        max_new_tokens: int,
        chat_template: str = "auto",
        chat_template_kwargs: Mapping[str, Any] | None = None,
        top_p: float = 1.0,
        seed: int = 0,
    ):
        self.engine, self.tokenizer = engine, tokenizer
        self.max_new_tokens, self.chat_template = max_new_tokens, chat_template
        self.chat_template_kwargs = chat_template_kwargs
        self.top_p, self.seed = top_p, seed

    def _requests(self, prompts: Sequence[str], k: int) -> list[GenerationRequest]:
        requests = []
        for index, prompt in enumerate(prompts):
            ids = tuple(encode_prompt(prompt, self.chat_template, self.tokenizer, self.chat_template_kwargs))
            requests += [GenerationRequest(ids, index * k + sample) for sample in range(k)]
        return requests

    def _decode(self, result: GenerationResult) -> str:
        ids = result.generated_token_ids
        if result.finished_by_stop:
            ids = ids[:-1]
        return self.tokenizer.decode(ids)

    def __call__(self, prompts: Sequence[str], k: int, temperature: float) -> list[list[str]]:
        eos = self.tokenizer.eos_token_id
        stops = (eos,) if eos is not None and eos >= 0 else ()
        sampling = SamplingParams(temperature, self.top_p, 0, self.max_new_tokens, stops, self.seed)
        results = generate_data_parallel(self.engine, self._requests(prompts, k), sampling)
        texts = [self._decode(result) for result in results]
        return [texts[index * k : (index + 1) * k] for index in range(len(prompts))]
