"""Command-line overrides (``key.sub=value``) and launch-time ``${VAR}`` placeholders for a ``RunConfig``.

``apply_overrides`` returns a new config (``dataclasses.replace`` all the way down, nothing mutated), parsing
each value by the type its field declares, so ``optim.lr=1e-5`` is a float and ``rollout.guidance=false`` a
bool. Lists, tuples and dicts come as JSON or in the flow style Hydra users type (``eval.names=[AIME24,
AIME25]``, ``data.chat_template_kwargs={enable_thinking: false}``, parsed by OmegaConf's YAML loader). The
prefixes of Hydra's grammar: ``~key`` resets a field to its schema default (``~key=value`` only when it
holds that value) or removes a dict entry; ``+dict_field.key=value`` adds an entry (refused when it exists;
every other field exists already, so ``+`` on it is refused with the plain spelling); ``++key=value`` sets
whether or not it exists. Unknown keys and values of the wrong type fail here, naming the key; ranges and
cross-field rules are left to ``RunConfig.validate``, which the caller runs next. ``apply_values`` applies
a nested mapping (a YAML config file) with the same typed checks. Torch-free: it runs before any process
starts.

Recipes write machine-specific paths as ``${TROPD_RUN_DIR}/...`` (or OmegaConf's ``${oc.env:VAR}`` and
``${oc.env:VAR,default}``); ``resolve_placeholders`` expands them from the environment at launch (never
while a recipe is built), so one recipe serves every cluster.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import re
import types
import typing
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, TypeVar

ConfigT = TypeVar("ConfigT")

_TRUE_WORDS = ("true", "1", "yes", "on")
_FALSE_WORDS = ("false", "0", "no", "off")
_NONE_WORDS = ("none", "null")
# ${VAR}, ${oc.env:VAR} and ${oc.env:VAR,default} (OmegaConf's spelling; the default only with oc.env).
_PLACEHOLDER = re.compile(r"\$\{(?:(oc\.env):\s*)?([A-Za-z_][A-Za-z0-9_]*)\s*(?:,([^}]*))?\}")


def apply_overrides(config: ConfigT, overrides: Sequence[str]) -> ConfigT:
    """Return ``config`` with each override (``key.sub=value``, ``+key=value``, ``++key=value``, ``~key``)
    applied in order; ``config`` is left unchanged."""
    for override in overrides:
        config = _apply_one(config, override)
    return config


def _apply_one(config: ConfigT, override: str) -> ConfigT:
    prefix = "~" if override.startswith("~") else "++" if override.startswith("++") else ""
    prefix = prefix or ("+" if override.startswith("+") else "")
    key, separator, raw_value = override[len(prefix) :].partition("=")
    key = key.strip()
    if not key or (not separator and prefix != "~"):
        raise ValueError(
            f"override {override!r} is not of the form key.sub=value (e.g. optim.lr=1e-5), "
            "+dict_field.key=value, ++key=value or ~key"
        )
    edit = _Edit(prefix, raw_value if separator else None, key)
    return _replace_at(config, config, key.split("."), edit)


@dataclasses.dataclass(frozen=True)
class _Edit:
    """One override: what to do at the end of its key's path (``prefix`` is "", "+", "++" or "~")."""

    prefix: str
    raw_value: str | None
    key: str

    def field_value(self, node: Any, name: str, field_type: Any) -> Any:
        """The new value of the dataclass field ``name`` of ``node``."""
        if self.prefix == "+":
            plain = f"{self.key}={self.raw_value}"
            raise ValueError(
                f"+{plain}: {self.key} exists already (every field of the config does; + adds entries to "
                f"dict fields only): set it with {plain}"
            )
        if self.prefix == "~":
            self._check_expected(getattr(node, name), field_type)
            return _schema_default(node, name)
        return parse_value(self.raw_value, field_type, self.key)

    def entry(self, entries: dict, name: str, value_type: Any) -> dict:
        """A copy of the dict field's ``entries`` with the entry ``name`` set, added or removed."""
        present, updated = name in entries, dict(entries)
        if self.prefix == "~":
            if not present:
                raise ValueError(f"~{self.key}: there is no entry {name!r} to remove")
            self._check_expected(entries[name], value_type)
            del updated[name]
        elif self.prefix == "+" and present:
            raise ValueError(
                f"+{self.key}: the entry exists; set it with {self.key}=... (or ++{self.key}=...)"
            )
        elif self.prefix == "" and not present:
            raise ValueError(f"{self.key}: no entry {name!r}; add it with +{self.key}={self.raw_value}")
        elif dataclasses.is_dataclass(value_type):  # a section as an entry: its fields, as in a config file
            fields = parse_value(self.raw_value, Any, self.key)
            base = entries.get(name, value_type())
            updated[name] = _apply_mapping(base, base, fields, prefix=f"{self.key}.")
        else:
            updated[name] = _check_element(parse_value(self.raw_value, Any, self.key), value_type)
        return updated

    def _check_expected(self, current: Any, field_type: Any) -> None:
        """``~key=value`` removes only the value it names (Hydra's rule)."""
        if self.raw_value is not None and parse_value(self.raw_value, field_type, self.key) != current:
            raise ValueError(f"~{self.key}={self.raw_value}: the current value is {current!r}")


def _schema_default(node: Any, name: str) -> Any:
    config_field = next(f for f in dataclasses.fields(node) if f.name == name)
    if config_field.default is not dataclasses.MISSING:
        return config_field.default
    if config_field.default_factory is not dataclasses.MISSING:
        return config_field.default_factory()
    raise ValueError(f"{name} has no default to reset to")


def _replace_at(root: Any, node: Any, path: list[str], edit: _Edit) -> Any:
    """Copy of ``node`` with ``edit`` applied at ``path``; ``root`` is only used for error suggestions."""
    name = path[0]
    if len(path) == 1 and name in _hooks(node) and edit.prefix in ("", "++"):
        return _call_hook(node, name, edit.raw_value, edit.key)
    if not dataclasses.is_dataclass(node) or name not in {f.name for f in dataclasses.fields(node)}:
        raise ValueError(_unknown_key_message(root, edit.key))
    field_type = typing.get_type_hints(type(node))[name]
    child = getattr(node, name)
    if len(path) == 1:
        value = edit.field_value(node, name, field_type)
    elif isinstance(child, dict) and len(path) == 2:
        value = edit.entry(child, path[1], (typing.get_args(field_type) or (Any, Any))[1])
    elif isinstance(child, dict) and dataclasses.is_dataclass(child.get(path[1])):
        value = {**child, path[1]: _replace_at(root, child[path[1]], path[2:], edit)}  # teachers.<n>.x
    elif dataclasses.is_dataclass(child):
        value = _replace_at(root, child, path[1:], edit)
    else:
        raise ValueError(_unknown_key_message(root, edit.key))
    return dataclasses.replace(node, **{name: value})


def apply_values(config: ConfigT, values: Mapping[str, Any], source: str) -> ConfigT:
    """``config`` with a nested mapping applied (a YAML file's body): sections recurse, each leaf is checked
    against its field's type (a string is parsed as on the command line); errors name ``source`` and key."""
    try:
        return _apply_mapping(config, config, values, prefix="")
    except ValueError as error:
        raise ValueError(f"{source}: {error}") from None


def _apply_mapping(root: Any, node: Any, values: Mapping[str, Any], prefix: str) -> Any:
    if not isinstance(values, Mapping):
        raise ValueError(f"{prefix.rstrip('.') or 'the file'} must be a mapping of keys to values")
    hooks = _hooks(node)
    for name in [name for name in values if name in hooks]:  # before the fields, which may refine them
        node = _call_hook(node, name, values[name], f"{prefix}{name}")
    fields, changes = _field_types(node), {}
    for name, value in values.items():
        key = f"{prefix}{name}"
        if name in hooks:
            continue
        if not isinstance(name, str) or name not in fields:
            raise ValueError(_unknown_key_message(root, key))
        child = getattr(node, name)
        entry_type = _dataclass_entry_type(fields[name])
        if dataclasses.is_dataclass(child):
            changes[name] = _apply_mapping(root, child, value, prefix=f"{key}.")
        elif entry_type is not None and isinstance(value, Mapping):  # dict[str, Section]: merge per entry
            changes[name] = {**child}
            for entry, entry_values in value.items():
                base = child.get(entry, entry_type())
                changes[name][entry] = _apply_mapping(root, base, entry_values, prefix=f"{key}.{entry}.")
        else:
            changes[name] = coerce_value(value, fields[name], key)
    return dataclasses.replace(node, **changes)


def _dataclass_entry_type(field_type: Any) -> type | None:
    """``Section`` for a ``dict[str, Section]`` field (``RunConfig.teachers``), else None."""
    if typing.get_origin(field_type) is not dict:
        return None
    value_type = typing.get_args(field_type)[1]
    return value_type if dataclasses.is_dataclass(value_type) else None


def _field_types(node: Any) -> dict[str, Any]:
    hints = typing.get_type_hints(type(node))
    return {config_field.name: hints[config_field.name] for config_field in dataclasses.fields(node)}


def _hooks(node: Any) -> dict[str, str]:
    """A section's override hooks (``OVERRIDE_HOOKS``: key -> method name), e.g. ``student.from_hf``."""
    return getattr(type(node), "OVERRIDE_HOOKS", {}) if dataclasses.is_dataclass(node) else {}


def _call_hook(node: Any, name: str, value: Any, key: str) -> Any:
    """The section that ``node``'s hook ``name`` returns for ``value`` (a string; ``${VAR}`` expanded from
    the environment now, since the hook reads files while the config is built)."""
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{key} takes a path, got {value!r}")
    missing: dict[str, list[str]] = {}
    text = _expand(value.strip(), os.environ, missing, key)
    if missing:
        raise ValueError(f"{key}={value}: set the environment variables {', '.join(sorted(missing))}")
    try:
        return getattr(node, _hooks(node)[name])(text)
    except ValueError as error:
        raise ValueError(f"{key}={value}: {error}") from None


def coerce_value(value: Any, field_type: Any, key: str) -> Any:
    """A value read from a file as ``field_type``: strings go through ``parse_value``, others are checked."""
    if isinstance(value, str):
        return parse_value(value, field_type, key)
    try:
        return _coerce(value, field_type)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{key}: {value!r} is not {_type_name(field_type)} ({error})") from None


def _coerce(value: Any, field_type: Any) -> Any:
    origin, args = typing.get_origin(field_type), typing.get_args(field_type)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        non_none = [arg for arg in args if arg is not type(None)]
        return _coerce(value, non_none[0]) if len(non_none) == 1 else value
    if origin in (list, tuple) or field_type in (list, tuple):
        return _parse_sequence(json.dumps(value), field_type)
    if origin is dict or field_type is dict:
        return _parse_mapping(json.dumps(value), field_type)
    if field_type is str and isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)  # "name: 123" in YAML is the text 123, as on the command line
    return _check_element(value, field_type)


def leaf_keys(config: Any, prefix: str = "") -> Iterator[str]:
    """Every overridable dotted key of ``config`` (fields of nested dataclasses, recursively)."""
    for config_field in dataclasses.fields(config):
        value = getattr(config, config_field.name)
        key = f"{prefix}{config_field.name}"
        if dataclasses.is_dataclass(value):
            yield from leaf_keys(value, prefix=f"{key}.")
        elif isinstance(value, dict) and value and all(dataclasses.is_dataclass(v) for v in value.values()):
            for entry, section in value.items():
                yield from leaf_keys(section, prefix=f"{key}.{entry}.")
        else:
            yield key


def _hook_keys(config: Any, prefix: str = "") -> Iterator[str]:
    """The keys of every section's override hooks (``student.from_hf``), for suggestions."""
    yield from (f"{prefix}{name}" for name in _hooks(config))
    for config_field in dataclasses.fields(config):
        value = getattr(config, config_field.name)
        if dataclasses.is_dataclass(value):
            yield from _hook_keys(value, prefix=f"{prefix}{config_field.name}.")


def _unknown_key_message(root: Any, key: str) -> str:
    known = [*leaf_keys(root), *_hook_keys(root)]
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
    if field_type is Any:  # a dict entry of unknown type: what JSON or YAML reads, else the text itself
        try:
            return _structured(text)
        except ValueError:
            return text
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
    """Lists and tuples come as JSON arrays (``'[1, 2]'``) or YAML flow lists (``[AIME24,AIME25]``); each
    element is checked against its type."""
    items = _structured(text)
    if not isinstance(items, list):
        raise ValueError("give a list such as [1, 2] or [AIME24,AIME25]")
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
    """Dicts come as JSON objects (``'{"enable_thinking": false}'``) or YAML flow mappings
    (``{enable_thinking: false}``); keys and values are type-checked."""
    try:
        items = _structured(text)
    except ValueError as error:
        raise ValueError(f'give a JSON object such as {{"key": true}} or {{key: true}}: {error}') from None
    if not isinstance(items, dict):
        raise ValueError('give a JSON object such as {"key": true} or {key: true}')
    key_type, value_type = typing.get_args(field_type) or (Any, Any)
    return {_check_element(key, key_type): _check_element(value, value_type) for key, value in items.items()}


def _structured(text: str) -> Any:
    """JSON first (exact, as before); else the YAML flow style, through OmegaConf's loader (which reads
    1e-5 as a float, unlike plain YAML 1.1)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        pass
    from omegaconf import OmegaConf  # torch-free; imported only when a value needs it

    try:
        return OmegaConf.to_container(OmegaConf.from_dotlist([f"value={text}"]), resolve=False)["value"]
    except Exception as error:  # the YAML loader's errors share no base class worth naming
        raise ValueError(f"cannot parse {text!r}: {str(error).splitlines()[0]}") from None


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
        resolver, name, default = match.groups()
        if name in environ:
            return environ[name]
        if default is not None and resolver:
            return _unquote(default.strip())
        missing.setdefault(name, []).append(key)
        return match.group(0)

    expanded = _PLACEHOLDER.sub(substitute, text)
    return text if expanded == text else expanded


def _unquote(text: str) -> str:
    """``${oc.env:VAR,'a b'}`` and ``${oc.env:VAR,"a b"}`` give ``a b``, as OmegaConf reads them."""
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        return text[1:-1]
    return text
