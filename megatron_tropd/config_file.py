"""Run configs as YAML files: ``--config run.yaml`` in, ``config.yaml`` (and ``--print-config --format
yaml``) out, and recipes named by ``module:function``. Torch-free: it runs before any process starts.

A file holds a full or partial config, nested as ``RunConfig`` is (``optim: {lr: 1.0e-6}``), with an
optional ``defaults:`` list in Hydra's spirit: each entry is a recipe name (``tiny_cpu``, or a user's
``my_pkg.recipes:my_recipe``), another YAML file (a path relative to this one), or ``_self_`` (this
file's own keys; last when absent). A recipe builds a whole config, so it may only come first; files and
``_self_`` apply on top in order. Every leaf goes through the same typed checks as a command-line override
(``overrides.apply_values``), so a typo still gets a "did you mean". Strings keep their ``${VAR}`` and
``${oc.env:VAR,default}`` placeholders until launch (``overrides.resolve_placeholders``), which is why the
file is read with ``resolve=False``. OmegaConf reads the YAML: unlike plain YAML 1.1 it reads ``1e-5`` as a
float.

A written ``config.yaml`` is complete (no ``defaults:``), so ``--config <run>/config.yaml`` rebuilds the
same ``RunConfig``.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from megatron_tropd.config import RunConfig
from megatron_tropd.overrides import apply_values

DEFAULTS_KEY = "defaults"
SELF_ENTRY = "_self_"
YAML_SUFFIXES = (".yaml", ".yml")
RecipeLookup = Callable[[str], RunConfig]


def load_recipe(name: str, get_recipe: RecipeLookup) -> RunConfig:
    """A built-in recipe by name, or ``module:function`` (a function of no arguments returning a
    ``RunConfig``) from the user's own code."""
    if ":" not in name:
        return get_recipe(name)
    module_name, _, function_name = name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(
            f"recipe {name!r}: cannot import module {module_name!r} ({error}); put it on PYTHONPATH"
        ) from None
    function = getattr(module, function_name, None)
    if not callable(function):
        raise ValueError(f"recipe {name!r}: module {module_name!r} has no function {function_name!r}")
    config = function()
    if not isinstance(config, RunConfig):
        raise ValueError(
            f"recipe {name!r} returned a {type(config).__name__}; a recipe function returns a RunConfig"
        )
    return config


def compose(path: str | os.PathLike, get_recipe: RecipeLookup, base: RunConfig | None = None) -> RunConfig:
    """The config that the YAML file at ``path`` describes, on top of ``base`` (``--recipe``) when given,
    else on top of the file's first ``defaults:`` recipe, else on the schema defaults."""
    return _compose(Path(path), get_recipe, base, seen=())


def _compose(
    path: Path, get_recipe: RecipeLookup, base: RunConfig | None, seen: tuple[Path, ...]
) -> RunConfig:
    resolved = path.resolve()
    if resolved in seen:
        chain = " -> ".join(str(p) for p in (*seen, resolved))
        raise ValueError(f"config files include each other in a cycle: {chain}")
    body = read_yaml(path)
    defaults = _defaults(body.pop(DEFAULTS_KEY, []), path)
    config = base
    for position, entry in enumerate(defaults):
        if entry == SELF_ENTRY:
            config = apply_values(config or RunConfig(), body, source=str(path))
        elif _names_a_file(entry, path):
            config = _compose(path.parent / entry, get_recipe, config, (*seen, resolved))
        elif position == 0 and base is None:
            config = load_recipe(entry, get_recipe)
        else:
            raise ValueError(
                f"{path}: defaults entry {entry!r} is a recipe, and a recipe builds a whole config: list it "
                f"first in defaults (and do not pass --recipe with this file), or name a YAML file"
            )
    return config


def _defaults(entries: Any, path: Path) -> list[str]:
    """The ``defaults:`` list with ``_self_`` appended when absent; a single name is a list of one."""
    entries = [entries] if isinstance(entries, str) else entries
    if not isinstance(entries, list) or not all(isinstance(entry, str) for entry in entries):
        raise ValueError(f"{path}: defaults must be a list of recipe names or YAML file paths")
    if entries.count(SELF_ENTRY) > 1:
        raise ValueError(f"{path}: defaults lists {SELF_ENTRY} more than once")
    return entries if SELF_ENTRY in entries else [*entries, SELF_ENTRY]


def _names_a_file(entry: str, path: Path) -> bool:
    return entry.endswith(YAML_SUFFIXES) or (path.parent / entry).is_file()


def read_yaml(path: Path) -> dict[str, Any]:
    """The mapping in the YAML file ``path``, placeholders unresolved; a clear error for a missing file,
    bad YAML or a top level that is not a mapping."""
    from omegaconf import OmegaConf

    if not path.is_file():
        raise ValueError(f"config file {path} does not exist")
    try:
        body = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    except Exception as error:  # the YAML loader's errors share no base class worth naming
        raise ValueError(f"config file {path} is not valid YAML: {error}") from None
    if body is None:
        return {}
    if not isinstance(body, dict):
        raise ValueError(f"config file {path} must hold a mapping of keys (such as optim: {{lr: 1.0e-6}})")
    return body


def to_yaml(config: RunConfig) -> str:
    """``config`` as a complete YAML document that ``compose`` reads back to an equal config."""
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.create(dataclasses.asdict(config)))


def write_yaml(config: RunConfig, path: str | os.PathLike) -> Path:
    """Write ``to_yaml(config)`` to ``path`` through a temporary file and a rename (never half-written)."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(to_yaml(config), encoding="utf-8")
    os.replace(temporary, path)
    return path
