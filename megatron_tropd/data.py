"""Prompt data: files, tokenizers, chat templates, and a deterministic, resumable sampler.

Prompt files are JSONL (one object per line) or parquet (one row per prompt) with the fields:

- ``prompt`` (str): the user message, or ``prompt_token_ids`` (list of int): an already tokenized prompt;
- ``answer`` (str, optional): a reference answer, for evaluation;
- ``id`` (str or int, optional): defaults to the line number.

Text prompts are wrapped in a chat template (``data.chat_template``: the tokenizer's own, none, or a Jinja
string) and tokenized exactly as Hugging Face ``apply_chat_template(..., add_generation_prompt=True)``
does: the template writes every special token itself (DeepSeek-R1's BOS included), and the rendered text
is encoded without adding any more (no second BOS). With ``transformers`` installed it renders and encodes
(the reference); without it, ``_FallbackRenderer`` reproduces its template environment. The tokenizer's
template is ``chat_template.jinja`` beside ``tokenizer_config.json`` when that file exists (it takes
priority, as in transformers), else the config's ``chat_template`` entry. ``data.chat_template_kwargs``
are passed to the template (e.g. ``{"enable_thinking": false}`` for Qwen3).
"""

from __future__ import annotations

import importlib.util
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from megatron_tropd.config import RunConfig

logger = logging.getLogger(__name__)

CHAT_TEMPLATE_FILE = "chat_template.jinja"

# The named special tokens transformers hands every chat template (``special_tokens_map``).
SPECIAL_TOKEN_NAMES = (
    "bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token"
)  # fmt: skip

# Names that ``apply_chat_template`` takes as its own arguments (or that the renderer sets): a template
# keyword argument of one of these names would not reach the template, so it is refused.
RESERVED_TEMPLATE_KWARGS = (
    "conversation", "messages", "tools", "documents", "chat_template", "add_generation_prompt",
    "continue_final_message", "tokenize", "padding", "truncation", "max_length", "return_tensors",
    "return_dict", "return_assistant_tokens_mask", "tokenizer_kwargs", "sanitize_control_tokens",
)  # fmt: skip


@dataclass(frozen=True)
class Prompt:
    id: str
    token_ids: tuple[int, ...]
    answer: str | None = None
    domain: str | None = None
    """Routes the prompt to the teacher of that name (``RunConfig.teachers``)."""


def _token_text(value: object) -> str | None:
    """A special token as written in tokenizer_config.json: a string or an ``AddedToken`` dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        loaded = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON ({error}): re-export the tokenizer") from None
    if not isinstance(loaded, dict):
        raise ValueError(f"{path} must hold a JSON object")
    return loaded


def _default_template(directory: Path, config: dict) -> str | None:
    """The tokenizer's own chat template: ``chat_template.jinja`` first, then the config's entry (a
    string, or a list of named templates of which "default" is the one used)."""
    template_file = directory / CHAT_TEMPLATE_FILE
    if template_file.is_file():
        return template_file.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {entry.get("name"): entry.get("template") for entry in template if isinstance(entry, dict)}
        if "default" not in named:
            raise ValueError(
                f"{directory / 'tokenizer_config.json'} has named chat templates {sorted(named)} and no "
                "'default': pass one as data.chat_template (the Jinja text)"
            )
        template = named["default"]
    return template if isinstance(template, str) and template else None


def transformers_available() -> bool:
    """Whether ``transformers`` can be imported (it is the reference renderer when present)."""
    return importlib.util.find_spec("transformers") is not None


class Tokenizer:
    """Encode/decode over a sentencepiece model or a Hugging Face tokenizer directory.

    ``use_transformers`` (HF directories only): None = when transformers is installed. With it, chat
    prompts are rendered and every text encoded by ``AutoTokenizer``; otherwise by the ``tokenizers``
    library and ``_FallbackRenderer``, which the tests hold token-for-token equal to transformers.
    """

    def __init__(self, path: str, *, use_transformers: bool | None = None):
        self.path = Path(path)
        if not self.path.exists():
            raise ValueError(
                f"tokenizer {path!r} does not exist: pass a sentencepiece .model or an HF directory "
                "(data.tokenizer)"
            )
        self.chat_template: str | None = None
        self.special_tokens: dict[str, str] = {}
        self._transformers = None
        if self.path.is_file():
            import sentencepiece

            try:
                self._sp = sentencepiece.SentencePieceProcessor(model_file=str(self.path))
            except (OSError, RuntimeError) as error:
                raise ValueError(f"tokenizer {path!r} is not a sentencepiece model ({error})") from None
            self.eos_token_id = self._sp.eos_id()
            self.vocab_size = self._sp.get_piece_size()
            return
        from tokenizers import Tokenizer as HFTokenizer

        tokenizer_file = self.path / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise ValueError(
                f"tokenizer directory {path!r} has no tokenizer.json: export the model's fast tokenizer "
                "(tools/convert.py copies it) or pass a sentencepiece .model"
            )
        try:
            self._hf = HFTokenizer.from_file(str(tokenizer_file))
        except Exception as error:  # the Rust library raises a bare Exception for a damaged file
            raise ValueError(
                f"{tokenizer_file} cannot be loaded ({error}): re-export the tokenizer"
            ) from None
        config = {
            **_read_json(self.path / "special_tokens_map.json"),
            **_read_json(self.path / "tokenizer_config.json"),
        }
        self.chat_template = _default_template(self.path, config)
        for name in SPECIAL_TOKEN_NAMES:
            if (text := _token_text(config.get(name))) is not None:
                self.special_tokens[name] = text
        eos = self.special_tokens.get("eos_token")
        self.eos_token_id = self._hf.token_to_id(eos) if eos else None
        self.vocab_size = self._hf.get_vocab_size(with_added_tokens=True)
        if use_transformers is None:
            use_transformers = transformers_available()
        if use_transformers:
            from transformers import AutoTokenizer

            self._transformers = AutoTokenizer.from_pretrained(str(self.path))

    @property
    def backend(self) -> str:
        """What renders chat prompts and encodes text: "transformers", "tokenizers" or "sentencepiece"."""
        if self._transformers is not None:
            return "transformers"
        return "sentencepiece" if hasattr(self, "_sp") else "tokenizers"

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` with no special tokens added (a chat template writes its own)."""
        if self._transformers is not None:
            return list(self._transformers.encode(text, add_special_tokens=False))
        if hasattr(self, "_sp"):
            return self._sp.encode(text)
        return self._hf.encode(text, add_special_tokens=False).ids

    def decode(self, token_ids) -> str:
        if hasattr(self, "_sp"):
            return self._sp.decode(list(token_ids))
        return self._hf.decode(list(token_ids), skip_special_tokens=True)


def check_template_kwargs(kwargs: Mapping[str, Any] | None, field: str = "data.chat_template_kwargs") -> dict:
    """``kwargs`` as a plain dict of JSON values with string keys; ValueError naming ``field`` otherwise."""
    if kwargs is None:
        return {}
    if not isinstance(kwargs, Mapping):
        raise ValueError(f'{field} must be a mapping such as {{"enable_thinking": false}}; got {kwargs!r}')
    for key in kwargs:
        if not isinstance(key, str) or not key.isidentifier():
            raise ValueError(f"{field}: key {key!r} is not a template variable name")
        if key in RESERVED_TEMPLATE_KWARGS:
            raise ValueError(
                f"{field}: {key!r} is set by the renderer itself and cannot be a template argument"
            )
    try:
        return json.loads(json.dumps(dict(kwargs)))  # plain JSON values only, as the sandbox expects
    except (TypeError, ValueError) as error:
        raise ValueError(
            f"{field} must hold JSON values (str, number, bool, null, list, dict): {error}"
        ) from None


class _FallbackRenderer:
    """transformers' chat-template environment without transformers.

    The facts it reproduces (transformers ``utils/chat_template_utils.py``): an immutable jinja2 sandbox
    with ``trim_blocks`` and ``lstrip_blocks``, the loop-controls extension and a ``{% generation %}`` tag;
    ``tojson`` without HTML escaping or ASCII-only output; the globals ``raise_exception`` (a
    ``TemplateError``), ``strftime_now`` (local time), ``dict`` and ``namespace`` (no underscore
    attributes); the variables ``messages``, ``tools`` and ``documents`` (None here),
    ``add_generation_prompt``, the named special tokens, then the caller's keyword arguments, which win.
    """

    _compiled: dict[str, Any] = {}

    @classmethod
    def template(cls, source: str):
        if source not in cls._compiled:
            cls._compiled[source] = cls._environment().from_string(source)
        return cls._compiled[source]

    @staticmethod
    def _environment():
        import jinja2
        import jinja2.ext
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        class GenerationTag(jinja2.ext.Extension):
            """``{% generation %}...{% endgeneration %}`` marks assistant text; rendering keeps the body."""

            tags = {"generation"}

            def parse(self, parser):
                lineno = next(parser.stream).lineno
                body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
                return jinja2.nodes.Scope(body).set_lineno(lineno)

        class SafeNamespace(jinja2.utils.Namespace):
            """``namespace()`` that refuses underscore attributes (no reach into Python internals)."""

            def __init__(*args, **kwargs):
                self, args = args[0], args[1:]
                attrs = dict(*args, **kwargs)
                for name in attrs:
                    SafeNamespace._check(name)
                jinja2.utils.Namespace.__init__(self, attrs)

            def __setitem__(self, name, value):
                SafeNamespace._check(name)
                jinja2.utils.Namespace.__setitem__(self, name, value)

            @staticmethod
            def _check(name):
                if isinstance(name, str) and name.startswith("_"):
                    raise jinja2.exceptions.SecurityError(f"namespace attribute {name!r} is not allowed")

        class TemplateDict:
            """``dict(...)`` and ``dict.fromkeys(...)`` for templates, without the type itself."""

            def __call__(self, *args, **kwargs):
                return dict(*args, **kwargs)

            def fromkeys(self, *args, **kwargs):
                return dict.fromkeys(*args, **kwargs)

        def raise_exception(message):
            raise jinja2.exceptions.TemplateError(message)

        def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
            return json.dumps(
                value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
            )

        environment = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTag, jinja2.ext.loopcontrols]
        )
        environment.filters["tojson"] = tojson
        environment.globals.update(
            raise_exception=raise_exception,
            strftime_now=lambda fmt: datetime.now().strftime(fmt),
            dict=TemplateDict(),
            namespace=SafeNamespace,
        )
        return environment

    @classmethod
    def render(
        cls, source: str, messages: list[dict], special_tokens: Mapping[str, str], kwargs: dict
    ) -> str:
        variables = {**special_tokens, **kwargs}
        return cls.template(source).render(
            messages=messages, tools=None, documents=None, add_generation_prompt=True, **variables
        )


def _template_source(chat_template: str, tokenizer: Tokenizer) -> str:
    template = tokenizer.chat_template if chat_template == "auto" else chat_template
    if not template:
        raise ValueError(
            f"data.chat_template='auto' but tokenizer {tokenizer.path} has no chat template (neither "
            f"{CHAT_TEMPLATE_FILE} nor a 'chat_template' in tokenizer_config.json): set "
            "data.chat_template=none for raw prompts or pass a Jinja template string"
        )
    return template


def render_prompt(
    text: str, chat_template: str, tokenizer: Tokenizer, template_kwargs: Mapping[str, Any] | None = None
) -> str:
    """``text`` as one user turn of a chat, ready for the assistant's reply.

    ``chat_template``: "none" (the raw text), "auto" (the tokenizer's own template) or a Jinja string;
    ``template_kwargs`` are extra template variables (``enable_thinking=False``).
    """
    if chat_template == "none":
        return text
    kwargs = check_template_kwargs(template_kwargs)
    source = _template_source(chat_template, tokenizer)
    messages = [{"role": "user", "content": text}]
    try:
        if tokenizer.backend == "transformers":
            custom = None if chat_template == "auto" else source
            return tokenizer._transformers.apply_chat_template(
                messages, chat_template=custom, tokenize=False, add_generation_prompt=True, **kwargs
            )
        return _FallbackRenderer.render(source, messages, tokenizer.special_tokens, kwargs)
    except Exception as error:  # a template's own raise_exception, an undefined variable, a syntax error
        import jinja2

        if not isinstance(error, jinja2.exceptions.TemplateError):
            raise
        raise ValueError(f"the chat template of {tokenizer.path} failed to render: {error}") from None


def encode_prompt(
    text: str, chat_template: str, tokenizer: Tokenizer, template_kwargs: Mapping[str, Any] | None = None
) -> list[int]:
    """The prompt's token ids: ``render_prompt`` encoded with no special tokens added, exactly as
    ``apply_chat_template(..., tokenize=True)`` does (the template already wrote BOS where the model
    wants one)."""
    return tokenizer.encode(render_prompt(text, chat_template, tokenizer, template_kwargs))


def _read_rows(path: Path) -> list[tuple[int, object]]:
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            return list(enumerate(pq.read_table(path).to_pylist(), start=1))
        except Exception as error:  # pyarrow raises its own error types for damaged files
            raise ValueError(
                f"{path}: not a readable parquet file ({type(error).__name__}: {error})"
            ) from None
    rows = []
    try:
        handle = path.open("rb")  # bytes, decoded line by line so that a bad byte names its line
    except OSError as error:
        raise ValueError(f"prompt file {path} cannot be read ({error.strerror})") from None
    with handle:
        for line_number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise ValueError(f"{path}:{line_number}: not UTF-8 text (JSONL files are UTF-8)") from None
            if not line.strip():
                continue
            try:
                rows.append((line_number, json.loads(line)))
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{line_number}: not valid JSON ({error.msg})") from None
    return rows


@dataclass(frozen=True)
class PromptSettings:
    """How a prompt file becomes token ids and which prompts are usable."""

    tokenizer: Tokenizer | None
    chat_template: str
    max_prompt_length: int
    on_overlong: str
    template_kwargs: Mapping[str, Any] | None = None
    vocab_size: int | None = None


def _where(path: Path, line_number: int, row: object) -> str:
    prompt_id = row.get("id") if isinstance(row, dict) else None
    return f"{path}:{line_number}" + (f" (prompt id {prompt_id!r})" if prompt_id is not None else "")


def _check_vocabulary(where: str, token_ids: tuple[int, ...], vocab_size: int | None, source: str) -> None:
    """Every id must be a row of the models' embedding: 0 <= id < vocab_size (the true vocabulary)."""
    if vocab_size is None:
        return
    for position, token_id in enumerate(token_ids):
        if not 0 <= token_id < vocab_size:
            raise ValueError(
                f"{where}: token id {token_id} at position {position} of the {source} is outside the "
                f"models' vocabulary [0, {vocab_size}) (student.vocab_size): fix the prompt file, or use "
                "the tokenizer the models were trained with"
            )


def _prompt_from_row(path: Path, line_number: int, row: object, settings: PromptSettings) -> Prompt:
    where = _where(path, line_number, row)
    if not isinstance(row, dict):
        raise ValueError(f"{where}: each line must be a JSON object with 'prompt' or 'prompt_token_ids'")
    if "prompt_token_ids" in row:
        ids = row["prompt_token_ids"]
        valid = isinstance(ids, list) and ids and all(type(i) is int and i >= 0 for i in ids)
        if not valid:
            raise ValueError(f"{where}: 'prompt_token_ids' must be a non-empty list of non-negative ints")
        token_ids = tuple(ids)
        _check_vocabulary(where, token_ids, settings.vocab_size, "'prompt_token_ids'")
    elif isinstance(row.get("prompt"), str) and row["prompt"]:
        if settings.tokenizer is None:
            raise ValueError(f"{where}: text prompts need a tokenizer: set data.tokenizer")
        try:
            token_ids = tuple(
                encode_prompt(
                    row["prompt"], settings.chat_template, settings.tokenizer, settings.template_kwargs
                )
            )
        except ValueError as error:
            raise ValueError(f"{where}: {error}") from None
        _check_vocabulary(where, token_ids, settings.vocab_size, "tokenized prompt")
    else:
        raise ValueError(f"{where}: missing field 'prompt' (non-empty string) or 'prompt_token_ids'")
    answer, domain = row.get("answer"), row.get("domain")
    if domain is not None and not (isinstance(domain, str) and domain):
        raise ValueError(f"{where}: 'domain' must be a non-empty string (the name of the prompt's teacher)")
    answer = None if answer is None else str(answer)
    return Prompt(str(row.get("id", line_number)), token_ids, answer, domain)


def load_prompts(
    path: str,
    tokenizer: Tokenizer | None,
    chat_template: str,
    max_prompt_length: int,
    on_overlong: str,
    *,
    template_kwargs: Mapping[str, Any] | None = None,
    vocab_size: int | None = None,
) -> list[Prompt]:
    """Read, validate and tokenize a prompt file.

    A prompt longer than ``max_prompt_length`` tokens (after its chat template) is skipped and counted
    (``on_overlong="skip"``: one warning with the count and the longest) or refused (``"fail"``), so every
    prompt kept leaves ``rollout.max_new_tokens`` to generate (``RunConfig.validate`` checks that prompt
    and generation fit both models). ``vocab_size``: refuse ids outside ``[0, vocab_size)``.
    """
    file = Path(path)
    if not file.is_file():
        raise ValueError(f"prompt file {path!r} does not exist (data.train_prompts)")
    settings = PromptSettings(
        tokenizer, chat_template, max_prompt_length, on_overlong, template_kwargs, vocab_size
    )
    prompts, skipped, longest = [], 0, (0, "")
    rows = _read_rows(file)
    for line_number, row in rows:
        prompt = _prompt_from_row(file, line_number, row, settings)
        length = len(prompt.token_ids)
        if length <= max_prompt_length:
            prompts.append(prompt)
            continue
        where = _where(file, line_number, row)
        if on_overlong == "fail":
            raise ValueError(
                f"{where}: prompt of {length} tokens exceeds rollout.max_prompt_length="
                f"{max_prompt_length}; raise it or set data.on_overlong_prompt=skip"
            )
        skipped += 1
        longest = max(longest, (length, where))
    if skipped:
        logger.warning(
            "%s: skipped %d of %d prompts longer than rollout.max_prompt_length=%d tokens (the longest, %d "
            "tokens, at %s); raise rollout.max_prompt_length to keep them",
            file, skipped, len(rows), max_prompt_length, longest[0], longest[1],
        )  # fmt: skip
    if not prompts:
        raise ValueError(
            f"{file}: no usable prompts ({len(rows)} rows, {skipped} longer than rollout.max_prompt_length="
            f"{max_prompt_length}): add prompts or raise rollout.max_prompt_length"
        )
    return prompts


def run_tokenizer(config: RunConfig) -> Tokenizer | None:
    """The run's tokenizer (``data.tokenizer``), or None for a run on pre-tokenized prompts."""
    return Tokenizer(config.data.tokenizer) if config.data.tokenizer else None


def load_run_prompts(config: RunConfig, tokenizer: Tokenizer | None) -> list[Prompt]:
    """The run's training prompts, as its rollouts and the teacher's scoring see them: rendered with
    ``data.chat_template`` and ``data.chat_template_kwargs``, ids checked against the models' vocabulary,
    each routed to a teacher (``RunConfig.route``)."""
    d = config.data
    prompts = load_prompts(
        d.train_prompts, tokenizer, d.chat_template, config.rollout.max_prompt_length, d.on_overlong_prompt,
        template_kwargs=d.chat_template_kwargs, vocab_size=config.student.vocab_size,
    )  # fmt: skip
    for prompt in prompts:  # every prompt has a teacher, before any model loads
        try:
            config.route(prompt.domain)
        except ValueError as error:
            raise ValueError(f"{d.train_prompts}: prompt {prompt.id!r}: {error}") from None
    return prompts


class PromptSampler:
    """Draws prompts in epochs of seeded shuffles; ``position`` (prompts drawn so far) is the whole state,
    so a run resumed at the same position draws exactly the same prompts."""

    def __init__(self, prompts: list[Prompt], seed: int, position: int = 0):
        self.prompts, self.seed, self.position = prompts, seed, position

    def _order(self, epoch: int) -> list[int]:
        import torch  # here, not at import: the pre-flight check loads prompts before torch

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
