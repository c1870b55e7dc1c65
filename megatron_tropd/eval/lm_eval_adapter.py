"""A Megatron checkpoint as an lm-evaluation-harness model, registered as ``megatron_tropd`` (lm-eval 0.4.x).

    python -m megatron_tropd.eval.lm_eval_adapter --model megatron_tropd \\
        --model_args checkpoint=CKPT,tokenizer=TOK --tasks hellaswag,gsm8k
    torchrun --nproc_per_node=2 -m megatron_tropd.eval.lm_eval_adapter --model megatron_tropd \\
        --model_args checkpoint=CKPT,tokenizer=TOK,tensor_parallel=2,dtype=bfloat16 --tasks hellaswag

(the module has to be imported for the registration; running it this way forwards to lm-eval's command
line). ``model_args``: ``checkpoint``, ``tokenizer`` (a sentencepiece ``.model``, an HF tokenizer directory
or its ``tokenizer.json``), ``tensor_parallel``, ``pipeline_parallel``, ``batch_size``, ``max_length``
(default: the model's max_position_embeddings), ``max_gen_toks``, ``seed`` and ``dtype`` (``auto``,
``float32``, ``bfloat16``, ``float16``); any other name is refused. Under torchrun every rank runs the same
lm-eval program: the adapter tells lm-eval it is one process (rank 0 of 1), so all ranks build the same
requests, and spreads the work itself -- each data-parallel replica scores or generates its share on its
TP x PP layout and the results are gathered, so every rank returns the same answers (and computes the same
metrics). Only rank 0 writes and prints them, logs at INFO and draws progress bars.

Requests are tokenized and scored as lm-eval's own ``hf`` backend does on the same weights:

- text is encoded with the HF tokenizer's own special tokens (its BOS where it adds one), none when the
  text already starts with the BOS text (a chat template wrote it); an empty context is conditioned on BOS,
  or EOS when the tokenizer has no BOS. A sentencepiece model adds no special tokens and conditions on EOS.
- ``loglikelihood``: one forward-only pass of ``(context + continuation)[-(max_length + 1):]`` (the
  model reads at most ``max_length`` tokens) through Megatron's pipeline schedule; the log-prob of each
  continuation token and whether it is the argmax come from the vocab-parallel ops on the TP-sharded
  logits (the vocabulary never leaves its shards).
- ``loglikelihood_rolling``: lm-eval's rolling windows of ``max_length`` predicted tokens, each scored as
  above.
- ``generate_until``: the KV-cache engine on the context's last ``max_length - max_gen_toks`` tokens;
  greedy unless the request's ``temperature`` (or ``do_sample``) says otherwise; the text (decoded as the
  HF tokenizer decodes) is cut at the first ``until`` string.
- ``--apply_chat_template``: the tokenizer's chat template (``chat_template.jinja`` first, then
  ``tokenizer_config.json``), rendered by transformers.
"""

from __future__ import annotations

import difflib
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from megatron_tropd.data import Tokenizer
from megatron_tropd.ops import vocab_parallel_token_stats, vocab_parallel_topk
from megatron_tropd.placed import PlacedModel
from megatron_tropd.rollout.engine import GenerationRequest, SamplingParams
from megatron_tropd.runtime import default_device, init_distributed
from megatron_tropd.scoring import forward_signals

logger = logging.getLogger(__name__)

DEFAULT_MAX_GEN_TOKS = 256
DEFAULT_BATCH_SIZE = 8
DTYPES = {
    "auto": None, "float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
}  # fmt: skip
MODEL_ARGS = (
    "checkpoint", "tokenizer", "tensor_parallel", "pipeline_parallel", "batch_size", "max_length",
    "max_gen_toks", "seed", "dtype",
)  # fmt: skip
# lm-eval's command line adds these to every model's arguments; the layout decides them here, and no
# remote code runs.
IGNORED_MODEL_ARGS = ("device", "max_batch_size", "trust_remote_code")


def check_model_args(extra: dict[str, Any]) -> None:
    """Refuse ``model_args`` the adapter does not know, suggesting the nearest known name."""
    unknown = sorted(set(extra) - set(IGNORED_MODEL_ARGS))
    if not unknown:
        return
    hints = []
    for name in unknown:
        close = difflib.get_close_matches(name, MODEL_ARGS, n=1)
        hints.append(f"{name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    raise ValueError(
        f"megatron_tropd does not know model_args {', '.join(hints)}; it takes {', '.join(MODEL_ARGS)}"
    )


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """The parameter dtype of a ``dtype`` model_arg (None for auto: bf16 on a GPU, fp32 on the CPU)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if str(dtype) not in DTYPES:
        raise ValueError(f"megatron_tropd: dtype={dtype!r} is not one of {', '.join(DTYPES)}")
    return DTYPES[str(dtype)]


def tokenizer_location(path: str) -> str:
    """A sentencepiece model or an HF tokenizer directory; a ``tokenizer.json`` names its directory."""
    location = Path(path)
    if location.suffix != ".json":
        return path
    if location.name != "tokenizer.json":
        raise ValueError(
            f"tokenizer {path!r}: pass the HF tokenizer directory or its tokenizer.json (with "
            "tokenizer_config.json beside it)"
        )
    return str(location.parent)


def check_launch(tensor_parallel: int, pipeline_parallel: int) -> None:
    """A TP x PP layout needs a multiple of TP x PP processes: say how to launch them before starting."""
    world_size = dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))
    size = tensor_parallel * pipeline_parallel
    if world_size % size:
        raise ValueError(
            f"megatron_tropd: tensor_parallel={tensor_parallel} x pipeline_parallel={pipeline_parallel} "
            f"needs a multiple of {size} processes and this job has {world_size}; launch one per rank: "
            f"torchrun --nproc_per_node={size} -m megatron_tropd.eval.lm_eval_adapter --model "
            "megatron_tropd --model_args ..."
        )


def load_model(
    checkpoint: str, tensor_parallel: int, pipeline_parallel: int, seed: int, dtype
) -> PlacedModel:
    """This rank's read-only stage of ``checkpoint`` on its layout, in ``dtype`` (collective)."""
    from megatron_tropd.checkpoint import read_weights_config
    from megatron_tropd.eval import harness

    directory, model_config = read_weights_config(checkpoint)
    return harness.load_model(
        directory, model_config, tensor_parallel=tensor_parallel, pipeline_parallel=pipeline_parallel,
        seed=seed, params_dtype=parse_dtype(dtype),
    )  # fmt: skip


def _is_rank_zero() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def progress(total: int, desc: str, disable: bool = False) -> tqdm:
    """A progress bar on rank 0 (every rank does the same work)."""
    return tqdm(total=total, desc=desc, disable=disable or not _is_rank_zero())


class HFEncoding:
    """Text <-> ids as lm-eval's ``hf`` backend tokenizes, over the project's tokenizer.

    An HF tokenizer directory is read by ``AutoTokenizer`` (the tokenizer lm-eval's backend uses):
    ``encode`` adds the tokenizer's special tokens unless the text starts with the prefix token's text,
    the generation prompt unless it starts with the BOS text; the empty-context prefix is BOS, else EOS;
    ``decode`` skips special tokens. A sentencepiece model encodes as ``Tokenizer.encode`` does (no
    special tokens) and its prefix is EOS.
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.auto = None
        if tokenizer.path.is_dir():
            from transformers import AutoTokenizer

            self.auto = AutoTokenizer.from_pretrained(str(tokenizer.path))
        eos = tokenizer.eos_token_id
        self.eos_token_id = eos if eos is not None and eos >= 0 else None
        bos = self.auto.bos_token_id if self.auto is not None else None
        self.prefix_token_id = bos if bos is not None else self.eos_token_id
        self.bos_text = self.auto.bos_token if self.auto is not None else None
        self.prefix_text = self._raw_text(self.prefix_token_id)

    def _raw_text(self, token_id: int | None) -> str | None:
        if self.auto is None or token_id is None:
            return None
        return self.auto.decode(token_id)

    def encode(
        self, text: str, special_tokens: bool | None = None, starts_with: str | None = None
    ) -> list[int]:
        """Ids of ``text``; ``special_tokens`` None: added unless ``text`` starts with ``starts_with``
        (by default the prefix token's text)."""
        if self.auto is None:
            return self.tokenizer.encode(text)
        if special_tokens is None:
            marker = self.prefix_text if starts_with is None else starts_with
            special_tokens = not (marker and text.startswith(marker))
        return list(self.auto.encode(text, add_special_tokens=special_tokens))

    def encode_prompt(self, text: str) -> list[int]:
        """A generation prompt's ids (lm-eval's batch encoding looks for the BOS text, not the prefix's)."""
        return self.encode(text, starts_with=self.bos_text or "")

    def decode(self, token_ids: Sequence[int]) -> str:
        if self.auto is None:
            return self.tokenizer.decode(token_ids)
        return self.auto.decode(list(token_ids), skip_special_tokens=True)


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
    placed: PlacedModel, rows: Sequence[Sequence[int]], micro_batch_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log_probs, greedy_ids)``, each ``[len(rows), max_len]`` on CPU and on every rank.

    Position ``t`` holds the log-prob of token ``t + 1`` of the row and the argmax prediction for it
    (meaningless past the row's end). Collective over every rank of the job.
    """
    groups = placed.groups
    per_replica = _rows_per_replica(len(rows), groups.data_parallel, micro_batch_size)
    total, length = per_replica * groups.data_parallel, max(len(r) for r in rows)
    tokens = torch.zeros(total, length, dtype=torch.int64)  # right-padded: causal, padding is never read
    for index, row in enumerate(rows):
        tokens[index, : len(row)] = torch.tensor(row, dtype=torch.int64)
    mine = placed.rows(total)
    signal_fn = _loglikelihood_signal_fn(groups.tp_group, placed.vocab_size)
    out = forward_signals(placed, tokens[mine].to(default_device()), micro_batch_size, signal_fn)
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
        dtype: str = "auto",
        **extra: Any,
    ):
        super().__init__()
        check_model_args(extra)
        if not checkpoint or not tokenizer:
            raise ValueError(
                "megatron_tropd needs model_args checkpoint=<Megatron weights> and tokenizer=<sentencepiece "
                ".model, HF tokenizer directory or its tokenizer.json>"
            )
        parse_dtype(dtype)
        check_launch(int(tensor_parallel), int(pipeline_parallel))
        text = Tokenizer(tokenizer_location(str(tokenizer)))
        init_distributed()
        placed = load_model(str(checkpoint), int(tensor_parallel), int(pipeline_parallel), int(seed), dtype)
        self._setup(placed, text, batch_size, max_length, max_gen_toks, seed)
        groups = placed.groups
        if _is_rank_zero():
            logger.info(
                "megatron_tropd: %s on TP%d x PP%d x DP%d, max_length %d, %s parameters", checkpoint,
                groups.layout.tensor_parallel, groups.layout.pipeline_parallel, groups.data_parallel,
                self.max_length, next(placed.stage.parameters()).dtype,
            )  # fmt: skip

    @classmethod
    def from_model(
        cls,
        placed: PlacedModel,
        tokenizer: Tokenizer,
        *,
        batch_size: int = DEFAULT_BATCH_SIZE,
        max_length: int = 0,
        max_gen_toks: int = DEFAULT_MAX_GEN_TOKS,
        seed: int = 0,
    ) -> MegatronLM:
        """Wrap a model already placed on its layout (no checkpoint read)."""
        adapter = cls.__new__(cls)
        LM.__init__(adapter)
        adapter._setup(placed, tokenizer, batch_size, max_length, max_gen_toks, seed)
        return adapter

    def _setup(self, placed: PlacedModel, tokenizer, batch_size, max_length, max_gen_toks, seed):
        placed.stage.eval()
        self.placed, self.groups, self.tokenizer = placed, placed.groups, tokenizer
        model_config = placed.config
        self.encoding = HFEncoding(tokenizer)
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
        self.engine = placed.engine(self.max_length, self.batch_size)
        self.eos_token_id = self.encoding.eos_token_id

    @property
    def tokenizer_name(self) -> str:
        return str(self.tokenizer.path).replace("/", "__")

    # ------------------------------------------------------------------------------------- chat template

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        """The tokenizer's chat template (``chat_template.jinja`` first), or None when not asked for."""
        if not chat_template:
            return None
        template = self.tokenizer.chat_template
        if not template or self.encoding.auto is None:
            raise ValueError(
                f"--apply_chat_template: tokenizer {self.tokenizer.path} has no chat template (neither "
                "chat_template.jinja nor a 'chat_template' in tokenizer_config.json of an HF tokenizer)"
            )
        if isinstance(chat_template, str):
            logger.warning(
                "megatron_tropd: the tokenizer has one chat template; %r is ignored", chat_template
            )
        return template

    def apply_chat_template(
        self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True
    ) -> str:
        """``chat_history`` rendered by transformers with the tokenizer's template; a template that refuses
        a system turn is tried again without it (as lm-eval's ``hf`` backend does)."""
        import jinja2

        try:
            return self._render(chat_history, add_generation_prompt)
        except jinja2.exceptions.TemplateError:
            logger.warning("megatron_tropd: the chat template failed; retrying without the system turn")
            turns = [turn for turn in chat_history if turn["role"] != "system"]
            return self._render(turns, add_generation_prompt)

    def _render(self, chat_history: list[dict[str, str]], add_generation_prompt: bool) -> str:
        template = self.chat_template(True)  # refuses a tokenizer without one
        return self.encoding.auto.apply_chat_template(
            chat_history, tokenize=False, add_generation_prompt=add_generation_prompt,
            continue_final_message=not add_generation_prompt, chat_template=template,
        )  # fmt: skip

    # ------------------------------------------------------------------------------------ log-likelihood

    def _prefix_token(self) -> int:
        if self.encoding.prefix_token_id is None:
            raise ValueError(
                f"tokenizer {self.tokenizer.path} has neither a beginning- nor an end-of-sequence token to "
                "condition an empty context on"
            )
        return self.encoding.prefix_token_id

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Tokens of context and continuation, split as lm-eval's HF model does (trailing context spaces
        move to the continuation; the continuation is the whole text's tokens after the context's; an
        empty context is the prefix token unless the continuation starts with it)."""
        if not context:
            continuation_ids = self.encoding.encode(continuation, special_tokens=False)
            if continuation_ids and continuation_ids[0] == self._prefix_token():
                return continuation_ids[:1], continuation_ids[1:]
            return [self._prefix_token()], continuation_ids
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole = self.encoding.encode(context + continuation)
        context_ids = self.encoding.encode(context)
        return context_ids, whole[len(context_ids) :]

    def _scored_row(self, context_ids: list[int], continuation_ids: list[int]) -> list[int]:
        """The model reads at most ``max_length`` tokens: the row's last token is only a label."""
        if len(continuation_ids) > self.max_length:
            raise ValueError(
                f"a continuation of {len(continuation_ids)} tokens does not fit in "
                f"max_length={self.max_length}"
            )
        return (context_ids + continuation_ids)[-(self.max_length + 1) :]  # left-truncate the context

    def loglikelihood_tokens(
        self, pairs: Sequence[tuple[list[int], list[int]]], disable_tqdm: bool = True
    ) -> list[tuple[float, bool]]:
        """``(sum of continuation log-probs, continuation is greedy)`` per (context, continuation) ids."""
        results: list[tuple[float, bool]] = [(0.0, True)] * len(pairs)
        pending = [index for index, (_, continuation) in enumerate(pairs) if continuation]
        with progress(len(pairs), "Running loglikelihood requests", disable_tqdm) as bar:
            bar.update(len(pairs) - len(pending))
            for start in range(0, len(pending), self.batch_size):
                batch = pending[start : start + self.batch_size]
                for index, result in zip(batch, self._score_batch([pairs[i] for i in batch]), strict=True):
                    results[index] = result
                bar.update(len(batch))
        return results

    def _score_batch(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        rows = [self._scored_row(*pair) for pair in pairs]
        micro_batch_size = max(1, self.batch_size // self.groups.data_parallel)
        log_probs, greedy_ids = score_token_rows(self.placed, rows, micro_batch_size)
        results = []
        for slot, ((_, continuation), row) in enumerate(zip(pairs, rows, strict=True)):
            count = len(continuation)
            positions = slice(len(row) - 1 - count, len(row) - 1)  # logits that predict the continuation
            expected = torch.tensor(row[-count:], dtype=torch.int64)
            total = float(log_probs[slot, positions].double().sum())
            results.append((total, bool((greedy_ids[slot, positions] == expected).all())))
        return results

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [self._encode_pair(*request.args) for request in requests]
        return self.loglikelihood_tokens(pairs, disable_tqdm)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of each whole text, in lm-eval's windows of ``max_length`` predicted tokens."""
        pairs, owners = [], []
        for owner, request in enumerate(requests):
            (text,) = request.args[:1]
            windows = get_rolling_token_windows(
                self.encoding.encode(text), prefix_token=self._prefix_token(),
                max_seq_len=self.max_length, context_len=1,
            )  # fmt: skip
            for window in windows:
                pairs.append(make_disjoint_window(window))
                owners.append(owner)
        totals = [0.0] * len(requests)
        for owner, (log_prob, _) in zip(owners, self.loglikelihood_tokens(pairs, disable_tqdm), strict=True):
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
        prompts = [
            self.encoding.encode_prompt(context)[-room:] or [self._prefix_token()] for context in contexts
        ]
        extra = (-len(prompts)) % self.groups.data_parallel  # every replica gets as many requests
        prompts += [prompts[-1]] * extra
        sample_ids = [*sample_ids, *range(max(sample_ids) + 1, max(sample_ids) + 1 + extra)]
        requests = [GenerationRequest(tuple(ids), i) for ids, i in zip(prompts, sample_ids, strict=True)]
        results = generate_data_parallel(self.engine, requests, sampling)
        texts = []
        for result in results[: len(contexts)]:
            ids = result.generated_token_ids[:-1] if result.finished_by_stop else result.generated_token_ids
            texts.append(self.encoding.decode(ids))
        return texts

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Requests with the same generation settings are generated together, in chunks of ``batch_size``."""
        groups: dict[str, list[int]] = {}
        for index, request in enumerate(requests):
            groups.setdefault(repr(sorted(request.args[1].items())), []).append(index)
        outputs: list[str] = [""] * len(requests)
        with progress(len(requests), "Running generate_until requests", disable_tqdm) as bar:
            for indices in groups.values():
                sampling, until = self._sampling(dict(requests[indices[0]].args[1]))
                for start in range(0, len(indices), self.batch_size):
                    chunk = indices[start : start + self.batch_size]
                    texts = self._generate_group([requests[i].args[0] for i in chunk], sampling, chunk)
                    for index, text in zip(chunk, texts, strict=True):
                        outputs[index] = truncate_until(text, until)
                    bar.update(len(chunk))
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


def _warning_or_worse(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING


def configure_logging(rank: int) -> None:
    """Every rank runs the same program, so only rank 0 logs at INFO (this project's lines and
    lm-eval's); the other ranks keep their warnings and errors."""
    from lm_eval.utils import setup_logging

    from megatron_tropd.console import configure_console

    configure_console({**os.environ, "RANK": str(rank)})
    setup_logging()  # lm-eval's handler, which its command line would install
    if rank:
        for handler in logging.getLogger("lm_eval").handlers:
            if _warning_or_worse not in handler.filters:
                handler.addFilter(_warning_or_worse)


def main(argv: list[str] | None = None) -> None:
    """lm-eval's command line with ``megatron_tropd`` registered; under a launcher only rank 0 writes
    results, prints them and logs at INFO."""
    import contextlib
    import sys

    from lm_eval.__main__ import cli_evaluate

    rank = int(os.environ.get("RANK", "0"))
    configure_logging(rank)
    sys.argv = [sys.argv[0], *rank_zero_arguments(sys.argv[1:] if argv is None else argv, rank)]
    quiet = open(os.devnull, "w") if rank else contextlib.nullcontext(sys.stdout)  # noqa: SIM115
    with quiet as out, contextlib.redirect_stdout(out):
        cli_evaluate()


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
