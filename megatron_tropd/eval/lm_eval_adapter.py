"""A Megatron checkpoint as an lm-evaluation-harness model, registered as ``megatron_tropd`` (lm-eval 0.4.x).

    python -m megatron_tropd.eval.lm_eval_adapter --model megatron_tropd \\
        --model_args checkpoint=CKPT,tokenizer=TOK,tensor_parallel=2 --tasks hellaswag,gsm8k

(the module has to be imported for the registration; running it this way forwards to lm-eval's command
line). Under torchrun every rank runs the same lm-eval program: the adapter tells lm-eval it is one
process (rank 0 of 1), so all ranks build the same requests, and spreads the work itself -- each
data-parallel replica scores or generates its share on its TP x PP layout and the results are gathered,
so every rank returns the same answers (and computes the same metrics). Only rank 0 writes and prints
them.

- ``loglikelihood``: one forward-only pass of context + continuation through Megatron's pipeline
  schedule; the log-prob of each continuation token and whether it is the argmax come from the
  vocab-parallel ops on the TP-sharded logits (the vocabulary never leaves its shards). A context longer
  than the model's length is left-truncated.
- ``loglikelihood_rolling``: lm-eval's rolling windows, each scored as above.
- ``generate_until``: the KV-cache engine; greedy unless the request's ``temperature`` (or ``do_sample``)
  says otherwise; the text is cut at the first ``until`` string; ``max_gen_toks`` bounds the length.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from megatron_tropd.data import Tokenizer
from megatron_tropd.model_config import ModelConfig
from megatron_tropd.ops import vocab_parallel_token_stats, vocab_parallel_topk
from megatron_tropd.platform import default_device
from megatron_tropd.rollout.engine import GenerationRequest, SamplingParams
from megatron_tropd.teacher import data_parallel_rows, forward_signals
from megatron_tropd.topology import ModelGroups

DEFAULT_MAX_GEN_TOKS = 256
DEFAULT_BATCH_SIZE = 8


def _loglikelihood_signal_fn(tp_group, vocab_size: int):
    """Per position: log-prob of the label and the (global) argmax token, from TP-sharded logits."""

    def signals(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        log_probs, _ = vocab_parallel_token_stats(logits, labels.unsqueeze(-1), tp_group, vocab_size, False)
        greedy_ids, _ = vocab_parallel_topk(logits, 1, tp_group, vocab_size)
        return {"log_probs": log_probs.squeeze(-1).float(), "greedy_ids": greedy_ids.squeeze(-1)}

    return signals


def _rows_per_replica(num_rows: int, data_parallel: int, micro_batch_size: int) -> int:
    """Rows each replica runs: its share, rounded up to whole microbatches (every microbatch one shape)."""
    share = math.ceil(num_rows / data_parallel)
    return math.ceil(share / micro_batch_size) * micro_batch_size


def score_token_rows(
    model: torch.nn.Module,
    groups: ModelGroups,
    rows: Sequence[Sequence[int]],
    vocab_size: int,
    micro_batch_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log_probs, greedy_ids)``, each ``[len(rows), max_len]`` on CPU and on every rank.

    Position ``t`` holds the log-prob of token ``t + 1`` of the row and the argmax prediction for it
    (meaningless past the row's end). Collective over every rank of the job.
    """
    per_replica = _rows_per_replica(len(rows), groups.data_parallel, micro_batch_size)
    total, length = per_replica * groups.data_parallel, max(len(r) for r in rows)
    tokens = torch.zeros(total, length, dtype=torch.int64)  # right-padded: causal, padding is never read
    for index, row in enumerate(rows):
        tokens[index, : len(row)] = torch.tensor(row, dtype=torch.int64)
    mine = data_parallel_rows(total, groups.data_parallel, groups.position.dp_rank)
    signal_fn = _loglikelihood_signal_fn(groups.tp_group, vocab_size)
    out = forward_signals(model, groups, tokens[mine].to(default_device()), micro_batch_size, signal_fn)
    holder = groups.is_last_stage and groups.position.tp_rank == 0
    local = (mine.start, out["log_probs"].cpu(), out["greedy_ids"].cpu()) if holder else None
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, local)
    log_probs, greedy_ids = torch.zeros(total, length), torch.zeros(total, length, dtype=torch.int64)
    for start, part_log_probs, part_greedy in filter(None, gathered):
        log_probs[start : start + part_log_probs.shape[0]] = part_log_probs
        greedy_ids[start : start + part_greedy.shape[0]] = part_greedy
    return log_probs[: len(rows)], greedy_ids[: len(rows)]


def truncate_until(text: str, until: Sequence[str]) -> str:
    """``text`` up to (not including) the earliest occurrence of any stop string."""
    cut = min((text.find(stop) for stop in until if stop and stop in text), default=len(text))
    return text[:cut]


def _as_list(until: str | Sequence[str] | None) -> list[str]:
    if until is None:
        return []
    return [until] if isinstance(until, str) else list(until)


@register_model("megatron_tropd")
class MegatronLM(LM):
    """lm-eval model over a Megatron GPTModel stage on its own TP x PP layout.

    Build it from a checkpoint (``MegatronLM(checkpoint=..., tokenizer=..., tensor_parallel=...)``, which
    starts torch.distributed from the launcher's environment when needed) or around a model already on
    its layout (``MegatronLM.from_model``).
    """

    def __init__(
        self,
        checkpoint: str = "",
        tokenizer: str = "",
        tensor_parallel: int = 1,
        pipeline_parallel: int = 1,
        batch_size: int | str = DEFAULT_BATCH_SIZE,
        max_length: int = 0,
        max_gen_toks: int = DEFAULT_MAX_GEN_TOKS,
        seed: int = 0,
        **ignored: Any,
    ):
        super().__init__()
        if not checkpoint or not tokenizer:
            raise ValueError(
                "megatron_tropd needs model_args checkpoint=<Megatron weights> and tokenizer=<sentencepiece "
                ".model or HF tokenizer directory>"
            )
        del ignored  # lm-eval passes device / max_batch_size, which the layout decides here
        from megatron_tropd.checkpoint import read_weights_config
        from megatron_tropd.eval.harness import load_model
        from megatron_tropd.platform import init_distributed

        init_distributed()
        directory, model_config = read_weights_config(checkpoint)
        model, groups = load_model(
            directory, model_config, tensor_parallel=int(tensor_parallel),
            pipeline_parallel=int(pipeline_parallel), seed=int(seed),
        )  # fmt: skip
        self._setup(
            model, groups, Tokenizer(tokenizer), model_config, batch_size, max_length, max_gen_toks, seed
        )

    @classmethod
    def from_model(
        cls,
        model: torch.nn.Module,
        groups: ModelGroups,
        tokenizer: Tokenizer,
        model_config: ModelConfig,
        *,
        batch_size: int = DEFAULT_BATCH_SIZE,
        max_length: int = 0,
        max_gen_toks: int = DEFAULT_MAX_GEN_TOKS,
        seed: int = 0,
    ) -> MegatronLM:
        """Wrap a model already built on ``groups``' layout (no checkpoint read)."""
        adapter = cls.__new__(cls)
        LM.__init__(adapter)
        adapter._setup(model, groups, tokenizer, model_config, batch_size, max_length, max_gen_toks, seed)
        return adapter

    def _setup(self, model, groups, tokenizer, model_config, batch_size, max_length, max_gen_toks, seed):
        from megatron_tropd.rollout.megatron_engine import MegatronGenerationEngine

        self.model, self.groups, self.tokenizer = model.eval(), groups, tokenizer
        self.vocab_size = model_config.vocab_size
        self.max_length = int(max_length) or model_config.max_position_embeddings
        if self.max_length < 2 or self.max_length > model_config.max_position_embeddings:
            raise ValueError(
                f"max_length={self.max_length} must be in [2, {model_config.max_position_embeddings}] "
                "(the model's max_position_embeddings)"
            )
        # lm-eval may pass "auto" or "auto:N"; without a memory model here, fall back to the default.
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else DEFAULT_BATCH_SIZE
        self.max_gen_toks, self.seed = int(max_gen_toks), int(seed)
        self.engine = MegatronGenerationEngine(
            model, groups, self.vocab_size, self.max_length, self.batch_size
        )
        eos = tokenizer.eos_token_id
        self.eos_token_id = eos if eos is not None and eos >= 0 else None

    @property
    def tokenizer_name(self) -> str:
        return str(self.tokenizer.path)

    # ------------------------------------------------------------------------------------ log-likelihood

    def _prefix_token(self) -> int:
        if self.eos_token_id is None:
            raise ValueError(
                f"tokenizer {self.tokenizer.path} has no end-of-sequence token to condition an empty "
                "context on"
            )
        return self.eos_token_id

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Tokens of context and continuation, split as lm-eval's HF model does (trailing context spaces
        move to the continuation; the continuation is the whole text's tokens after the context's)."""
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        if not context:
            return [self._prefix_token()], self.tokenizer.encode(continuation)
        whole = self.tokenizer.encode(context + continuation)
        context_ids = self.tokenizer.encode(context)
        return context_ids, whole[len(context_ids) :]

    def _scored_row(self, context_ids: list[int], continuation_ids: list[int]) -> list[int]:
        if len(continuation_ids) >= self.max_length:
            raise ValueError(
                f"a continuation of {len(continuation_ids)} tokens does not fit in "
                f"max_length={self.max_length} with at least one context token"
            )
        return (context_ids + continuation_ids)[-self.max_length :]  # left-truncate the context

    def loglikelihood_tokens(self, pairs: Sequence[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """``(sum of continuation log-probs, continuation is greedy)`` per (context, continuation) ids."""
        results: list[tuple[float, bool]] = [(0.0, True)] * len(pairs)
        pending = [index for index, (_, continuation) in enumerate(pairs) if continuation]
        micro_batch_size = max(1, self.batch_size // self.groups.data_parallel)
        for start in range(0, len(pending), self.batch_size):
            batch = pending[start : start + self.batch_size]
            rows = [self._scored_row(*pairs[index]) for index in batch]
            log_probs, greedy_ids = score_token_rows(
                self.model, self.groups, rows, self.vocab_size, micro_batch_size
            )
            for slot, (index, row) in enumerate(zip(batch, rows, strict=True)):
                count = len(pairs[index][1])
                positions = slice(len(row) - 1 - count, len(row) - 1)  # logits that predict the continuation
                expected = torch.tensor(row[-count:], dtype=torch.int64)
                total = float(log_probs[slot, positions].double().sum())
                results[index] = (total, bool((greedy_ids[slot, positions] == expected).all()))
        return results

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [self._encode_pair(*request.args) for request in requests]
        return self.loglikelihood_tokens(pairs)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of each whole text, in windows of at most ``max_length`` tokens."""
        pairs, owners = [], []
        for owner, request in enumerate(requests):
            (text,) = request.args[:1]
            windows = get_rolling_token_windows(
                self.tokenizer.encode(text), prefix_token=self._prefix_token(),
                max_seq_len=self.max_length - 1, context_len=1,
            )  # fmt: skip
            for window in windows:
                pairs.append(make_disjoint_window(window))
                owners.append(owner)
        totals = [0.0] * len(requests)
        for owner, (log_prob, _) in zip(owners, self.loglikelihood_tokens(pairs), strict=True):
            totals[owner] += log_prob
        return totals

    # ----------------------------------------------------------------------------------------- generation

    def _sampling(self, gen_kwargs: dict) -> tuple[SamplingParams, list[str]]:
        known = {"until", "max_gen_toks", "temperature", "do_sample", "top_p", "top_k"}
        if unknown := sorted(set(gen_kwargs) - known):
            raise ValueError(
                f"megatron_tropd does not support generation kwargs {unknown}; it knows {sorted(known)}"
            )
        temperature = float(gen_kwargs.get("temperature", 0.0))
        if gen_kwargs.get("do_sample") is False:
            temperature = 0.0
        stops = (self.eos_token_id,) if self.eos_token_id is not None else ()
        sampling = SamplingParams(
            temperature=temperature, top_p=float(gen_kwargs.get("top_p", 1.0)),
            top_k=int(gen_kwargs.get("top_k", 0)),
            max_new_tokens=int(gen_kwargs.get("max_gen_toks", self.max_gen_toks)), stop_token_ids=stops,
            seed=self.seed,
        )  # fmt: skip
        if sampling.max_new_tokens >= self.max_length:
            raise ValueError(
                f"max_gen_toks={sampling.max_new_tokens} leaves no room for a prompt in {self.max_length}"
            )
        return sampling, _as_list(gen_kwargs.get("until"))

    def _generate_group(
        self, contexts: list[str], sampling: SamplingParams, sample_ids: list[int]
    ) -> list[str]:
        from megatron_tropd.rollout.text import generate_data_parallel

        room = self.max_length - sampling.max_new_tokens
        prompts = [self.tokenizer.encode(context)[-room:] or [self._prefix_token()] for context in contexts]
        extra = (-len(prompts)) % self.groups.data_parallel  # every replica gets as many requests
        prompts += [prompts[-1]] * extra
        sample_ids = [*sample_ids, *range(max(sample_ids) + 1, max(sample_ids) + 1 + extra)]
        requests = [GenerationRequest(tuple(ids), i) for ids, i in zip(prompts, sample_ids, strict=True)]
        results = generate_data_parallel(self.engine, self.groups, requests, sampling)
        texts = []
        for result in results[: len(contexts)]:
            ids = result.generated_token_ids[:-1] if result.finished_by_stop else result.generated_token_ids
            texts.append(self.tokenizer.decode(ids))
        return texts

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Requests with the same generation settings are generated together, in chunks of ``batch_size``."""
        groups: dict[str, list[int]] = {}
        for index, request in enumerate(requests):
            groups.setdefault(repr(sorted(request.args[1].items())), []).append(index)
        outputs: list[str] = [""] * len(requests)
        for indices in groups.values():
            sampling, until = self._sampling(dict(requests[indices[0]].args[1]))
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start : start + self.batch_size]
                texts = self._generate_group([requests[i].args[0] for i in chunk], sampling, chunk)
                for index, text in zip(chunk, texts, strict=True):
                    outputs[index] = truncate_until(text, until)
        return outputs


# lm-eval options that write files or post results: option -> whether it takes a value.
_OUTPUT_OPTIONS = {
    "--output_path": True,
    "-o": True,
    "--log_samples": False,
    "-s": False,
    "--wandb_args": True,
    "--wandb_config_args": True,
    "--hf_hub_log_args": True,
    "--trackio_args": True,
}


def rank_zero_arguments(argv: Sequence[str], rank: int) -> list[str]:
    """``argv`` for this rank: every rank computes the same results, so only rank 0 keeps the options
    that write files or post them (W&B, the Hub); two ranks writing one results file would race."""
    if rank == 0:
        return list(argv)
    kept, skip_value = [], False
    for argument in argv:
        if skip_value:
            skip_value = False
            continue
        name = argument.split("=", 1)[0]
        if name in _OUTPUT_OPTIONS:
            skip_value = _OUTPUT_OPTIONS[name] and "=" not in argument
            continue
        kept.append(argument)
    return kept


def main(argv: list[str] | None = None) -> None:
    """lm-eval's command line with ``megatron_tropd`` registered; under a launcher only rank 0 writes
    results and prints them."""
    import contextlib
    import sys

    from lm_eval.__main__ import cli_evaluate

    rank = int(os.environ.get("RANK", "0"))
    sys.argv = [sys.argv[0], *rank_zero_arguments(sys.argv[1:] if argv is None else argv, rank)]
    quiet = open(os.devnull, "w") if rank else contextlib.nullcontext(sys.stdout)  # noqa: SIM115
    with quiet as out, contextlib.redirect_stdout(out):
        cli_evaluate()


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
