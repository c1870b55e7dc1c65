"""Prompt data: files, tokenizers, chat templates, and a deterministic, resumable sampler.

Prompt files are JSONL (one object per line) or parquet (one row per prompt) with the fields:

- ``prompt`` (str): the user message, or ``prompt_token_ids`` (list of int): an already tokenized prompt;
- ``answer`` (str, optional): a reference answer, for evaluation;
- ``id`` (str or int, optional): defaults to the line number.

Text prompts are wrapped in the tokenizer's chat template (``data.chat_template``) and tokenized.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Prompt:
    id: str
    token_ids: tuple[int, ...]
    answer: str | None = None


class Tokenizer:
    """Encode/decode over a sentencepiece model or a Hugging Face ``tokenizer.json`` directory."""

    def __init__(self, path: str):
        self.path = Path(path)
        if not self.path.exists():
            raise ValueError(
                f"tokenizer {path!r} does not exist: pass a sentencepiece .model or an HF directory"
            )
        self.chat_template = None
        if self.path.is_file():
            import sentencepiece

            self._sp = sentencepiece.SentencePieceProcessor(model_file=str(self.path))
            self.eos_token_id = self._sp.eos_id()
            return
        from tokenizers import Tokenizer as HFTokenizer

        self._hf = HFTokenizer.from_file(str(self.path / "tokenizer.json"))
        config_path = self.path / "tokenizer_config.json"
        config = json.loads(config_path.read_text()) if config_path.exists() else {}
        self.chat_template = config.get("chat_template")
        eos = config.get("eos_token")
        eos = eos.get("content") if isinstance(eos, dict) else eos
        self.eos_token_id = self._hf.token_to_id(eos) if eos else None

    def encode(self, text: str) -> list[int]:
        if hasattr(self, "_sp"):
            return self._sp.encode(text)
        return self._hf.encode(text, add_special_tokens=False).ids

    def decode(self, token_ids) -> str:
        if hasattr(self, "_sp"):
            return self._sp.decode(list(token_ids))
        return self._hf.decode(list(token_ids), skip_special_tokens=True)


def render_prompt(text: str, chat_template: str, tokenizer: Tokenizer) -> str:
    """Apply ``chat_template``: "none" (raw text), "auto" (the tokenizer's own) or a Jinja string."""
    if chat_template == "none":
        return text
    template = tokenizer.chat_template if chat_template == "auto" else chat_template
    if not template:
        raise ValueError(
            f"data.chat_template='auto' but tokenizer {tokenizer.path} has no chat template: set "
            "data.chat_template=none for raw prompts or pass a Jinja template string"
        )
    import jinja2

    messages = [{"role": "user", "content": text}]
    return jinja2.Template(template).render(messages=messages, add_generation_prompt=True)


def _read_rows(path: Path) -> list[tuple[int, object]]:
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return list(enumerate(pq.read_table(path).to_pylist(), start=1))
    rows = []
    with path.open(encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                rows.append((line_number, json.loads(line)))
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{line_number}: not valid JSON ({error.msg})") from None
    return rows


def _prompt_from_row(path, line_number, row, tokenizer, chat_template) -> Prompt:
    where = f"{path}:{line_number}"
    if not isinstance(row, dict):
        raise ValueError(f"{where}: each line must be a JSON object with 'prompt' or 'prompt_token_ids'")
    if "prompt_token_ids" in row:
        ids = row["prompt_token_ids"]
        if not isinstance(ids, list) or not ids or not all(isinstance(i, int) and i >= 0 for i in ids):
            raise ValueError(f"{where}: 'prompt_token_ids' must be a non-empty list of non-negative ints")
        token_ids = tuple(ids)
    elif isinstance(row.get("prompt"), str) and row["prompt"]:
        if tokenizer is None:
            raise ValueError(f"{where}: text prompts need a tokenizer: set data.tokenizer")
        token_ids = tuple(tokenizer.encode(render_prompt(row["prompt"], chat_template, tokenizer)))
    else:
        raise ValueError(f"{where}: missing field 'prompt' (non-empty string) or 'prompt_token_ids'")
    answer = row.get("answer")
    return Prompt(str(row.get("id", line_number)), token_ids, None if answer is None else str(answer))


def load_prompts(
    path: str, tokenizer: Tokenizer | None, chat_template: str, max_prompt_length: int, on_overlong: str
) -> list[Prompt]:
    """Read, validate and tokenize a prompt file; overlong prompts are skipped (and counted) or refused."""
    file = Path(path)
    if not file.is_file():
        raise ValueError(f"prompt file {path!r} does not exist (data.train_prompts)")
    prompts, skipped = [], 0
    for line_number, row in _read_rows(file):
        prompt = _prompt_from_row(file, line_number, row, tokenizer, chat_template)
        if len(prompt.token_ids) > max_prompt_length:
            if on_overlong == "fail":
                raise ValueError(
                    f"{file}:{line_number}: prompt of {len(prompt.token_ids)} tokens exceeds "
                    f"rollout.max_prompt_length={max_prompt_length}; raise it or set "
                    "data.on_overlong_prompt=skip"
                )
            skipped += 1
            continue
        prompts.append(prompt)
    if skipped:
        logger.warning("%s: skipped %d prompts longer than %d tokens", file, skipped, max_prompt_length)
    if not prompts:
        raise ValueError(f"{file}: no usable prompts ({skipped} skipped as too long)")
    return prompts


class PromptSampler:
    """Draws prompts in epochs of seeded shuffles; ``position`` (prompts drawn so far) is the whole state,
    so a run resumed at the same position draws exactly the same prompts."""

    def __init__(self, prompts: list[Prompt], seed: int, position: int = 0):
        self.prompts, self.seed, self.position = prompts, seed, position

    def _order(self, epoch: int) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(len(self.prompts), generator=generator).tolist()

    def next_batch(self, count: int) -> list[Prompt]:
        batch = []
        while len(batch) < count:
            epoch, offset = divmod(self.position, len(self.prompts))
            take = min(count - len(batch), len(self.prompts) - offset)
            order = self._order(epoch)
            batch.extend(self.prompts[i] for i in order[offset : offset + take])
            self.position += take
        return batch
