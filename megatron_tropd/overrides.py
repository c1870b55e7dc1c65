"""Command-line overrides (``key.sub=value``) and launch-time ``${VAR}`` placeholders for a ``RunConfig``.

``apply_overrides`` returns a new config (``dataclasses.replace`` all the way down, nothing mutated), parsing
each value by the type its field declares, so ``optim.lr=1e-5`` is a float and ``rollout.guidance=false`` a
bool; lists, tuples and dicts come as JSON (``data.chat_template_kwargs='{"enable_thinking": false}'``).
Unknown keys and values of the wrong type fail here, naming the key; ranges and cross-field rules are
left to ``RunConfig.validate``, which the caller runs next. Torch-free: it runs before any process starts.

Recipes write machine-specific paths as ``${TROPD_RUN_DIR}/...``; ``resolve_placeholders`` expands them from
the environment at launch (never while a recipe is built), so one recipe serves every cluster.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import re
import types
import typing
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, TypeVar

ConfigT = TypeVar("ConfigT")

_TRUE_WORDS = ("true", "1", "yes", "on")
_FALSE_WORDS = ("false", "0", "no", "off")
_NONE_WORDS = ("none", "null")
_PLACEHOLDER = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def apply_overrides(config: ConfigT, overrides: Sequence[str]) -> ConfigT:
    """Return ``config`` with each ``"dotted.key=value"`` applied in order; ``config`` is left unchanged."""
    for override in overrides:
        key, separator, raw_value = override.partition("=")
        if not separator or not key.strip():
            raise ValueError(f"override {override!r} is not of the form key.sub=value (e.g. optim.lr=1e-5)")
        config = _replace_at(config, config, key.strip().split("."), raw_value, key.strip())
    return config


def _replace_at(root: Any, node: Any, path: list[str], raw_value: str, key: str) -> Any:
    """Copy of ``node`` with the field at ``path`` replaced; ``root`` is only used for error suggestions."""
    name = path[0]
    if not dataclasses.is_dataclass(node) or name not in {f.name for f in dataclasses.fields(node)}:
        raise ValueError(_unknown_key_message(root, key))
    field_type = typing.get_type_hints(type(node))[name]
    if len(path) == 1:
        value = parse_value(raw_value, field_type, key)
    else:
        child = getattr(node, name)
        if not dataclasses.is_dataclass(child):
            raise ValueError(_unknown_key_message(root, key))
        value = _replace_at(root, child, path[1:], raw_value, key)
    return dataclasses.replace(node, **{name: value})


def leaf_keys(config: Any, prefix: str = "") -> Iterator[str]:
    """Every overridable dotted key of ``config`` (fields of nested dataclasses, recursively)."""
    for config_field in dataclasses.fields(config):
        value = getattr(config, config_field.name)
        key = f"{prefix}{config_field.name}"
        if dataclasses.is_dataclass(value):
            yield from leaf_keys(value, prefix=f"{key}.")
        else:
            yield key


def _unknown_key_message(root: Any, key: str) -> str:
    known = list(leaf_keys(root))
    close = difflib.get_close_matches(key, known, n=3, cutoff=0.6)
    if not close:  # a wrong section but the right leaf name ("optimizer.lr"): match on the last part
        tail = key.rsplit(".", 1)[-1]
        close = [k for k in known if k.rsplit(".", 1)[-1] == tail][:3]
    hint = f"; did you mean: {', '.join(close)}?" if close else ""
    return f"unknown config key {key!r}{hint} (`--print-config` shows every key)"


def parse_value(raw_value: str, field_type: Any, key: str) -> Any:
    """Parse the command-line text ``raw_value`` as ``field_type``; ``ValueError`` names key, type, value."""
    try:
        return _parse(raw_value.strip(), field_type)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{key}={raw_value!r}: expected {_type_name(field_type)} ({error})") from None


def _parse(text: str, field_type: Any) -> Any:
    origin, args = typing.get_origin(field_type), typing.get_args(field_type)
    if origin in (typing.Union, types.UnionType):
        if text.lower() in _NONE_WORDS and type(None) in args:
            return None
        non_none = [arg for arg in args if arg is not type(None)]
        if len(non_none) != 1:
            raise TypeError(f"unions of {non_none} cannot be set from the command line")
        return _parse(text, non_none[0])
    if dataclasses.is_dataclass(field_type):
        raise TypeError("this is a section: set its fields one by one, as key.field=value")
    if origin in (list, tuple) or field_type in (list, tuple):
        return _parse_sequence(text, field_type)
    if origin is dict or field_type is dict:
        return _parse_mapping(text, field_type)
    return _parse_scalar(text, field_type)


def _parse_scalar(text: str, field_type: Any) -> Any:
    if field_type is bool:
        if text.lower() in _TRUE_WORDS:
            return True
        if text.lower() in _FALSE_WORDS:
            return False
        raise ValueError(f"use one of {', '.join(_TRUE_WORDS + _FALSE_WORDS)}")
    if field_type is int:
        return int(text)  # "1.5" and "1e3" are refused: a count given as a float is a typo
    if field_type is float:
        return float(text)
    if field_type is str:
        return text
    raise TypeError(f"fields of type {_type_name(field_type)} cannot be set from the command line")


def _parse_sequence(text: str, field_type: Any) -> Any:
    """Lists and tuples come as JSON arrays (``'[1, 2]'``); each element is checked against its type."""
    items = json.loads(text)
    if not isinstance(items, list):
        raise ValueError("give a JSON array such as [1, 2]")
    origin = typing.get_origin(field_type) or field_type
    args = typing.get_args(field_type)
    if origin is tuple and args and args[-1] is not Ellipsis:
        if len(args) != len(items):
            raise ValueError(f"needs exactly {len(args)} elements, got {len(items)}")
        element_types = list(args)
    else:
        element_types = [args[0] if args else Any] * len(items)
    parsed = [
        _check_element(item, element_type) for item, element_type in zip(items, element_types, strict=True)
    ]
    return tuple(parsed) if origin is tuple else parsed


def _parse_mapping(text: str, field_type: Any) -> dict:
    """Dicts come as JSON objects (``'{"enable_thinking": false}'``); keys and values are type-checked."""
    try:
        items = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f'give a JSON object such as {{"key": true}}: {error.msg}') from None
    if not isinstance(items, dict):
        raise ValueError('give a JSON object such as {"key": true}')
    key_type, value_type = typing.get_args(field_type) or (Any, Any)
    return {_check_element(key, key_type): _check_element(value, value_type) for key, value in items.items()}


def _check_element(item: Any, element_type: Any) -> Any:
    if element_type is Any:
        return item
    if element_type is float and isinstance(item, int) and not isinstance(item, bool):
        return float(item)
    if isinstance(item, element_type) and not (element_type is int and isinstance(item, bool)):
        return item
    raise ValueError(f"element {item!r} is not {_type_name(element_type)}")


def _type_name(field_type: Any) -> str:
    return getattr(field_type, "__name__", None) or str(field_type).replace("typing.", "")


# ---------------------------------------------------------------------------------------------------------
# ${VAR} placeholders, resolved at launch
# ---------------------------------------------------------------------------------------------------------


def resolve_placeholders(config: ConfigT, environ: Mapping[str, str], *, strict: bool = True) -> ConfigT:
    """Expand ``${VAR}`` in every string field from ``environ``; returns a new config.

    ``strict``: a variable missing from ``environ`` raises one ``ValueError`` listing every missing variable
    and the fields that need it. Otherwise it is left as written (``--print-config`` on a laptop).
    """
    missing: dict[str, list[str]] = {}
    resolved = _resolve_node(config, environ, missing, prefix="")
    if strict and missing:
        lines = [f"  ${{{name}}} (used by {', '.join(keys)})" for name, keys in sorted(missing.items())]
        raise ValueError(
            "the recipe's paths need these environment variables, which are not set:\n"
            + "\n".join(lines)
            + "\nexport them (see slurm/env.sh) or override the fields with key=value"
        )
    return resolved


def _resolve_node(node: Any, environ: Mapping[str, str], missing: dict[str, list[str]], prefix: str) -> Any:
    changes = {}
    for config_field in dataclasses.fields(node):
        value, key = getattr(node, config_field.name), f"{prefix}{config_field.name}"
        if dataclasses.is_dataclass(value):
            new_value = _resolve_node(value, environ, missing, prefix=f"{key}.")
        elif isinstance(value, str):
            new_value = _expand(value, environ, missing, key)
        else:
            continue
        if new_value is not value:
            changes[config_field.name] = new_value
    return dataclasses.replace(node, **changes) if changes else node


def _expand(text: str, environ: Mapping[str, str], missing: dict[str, list[str]], key: str) -> str:
    def substitute(match: re.Match[str]) -> str:
        name = match.group(1)
        if name in environ:
            return environ[name]
        missing.setdefault(name, []).append(key)
        return match.group(0)

    expanded = _PLACEHOLDER.sub(substitute, text)
    return text if expanded == text else expanded
