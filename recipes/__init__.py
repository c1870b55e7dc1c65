"""Recipes: typed, pure functions returning a ``RunConfig``, looked up by name.

``RECIPES`` maps a name to its function; ``get_recipe(name)`` builds one (close names are suggested on a
typo). ``WORLD_SIZES`` gives each recipe's intended job size (ranks), which tests validate against and the
launchers use to size the job. ``recipes/launch.py`` is the nemo-run launcher (imported only when used).
"""

from __future__ import annotations

import difflib
from collections.abc import Callable

from megatron_tropd.config import RunConfig
from recipes import paper, tiny

RECIPES: dict[str, Callable[[], RunConfig]] = {**paper.paper_recipes(), **tiny.tiny_recipes()}

WORLD_SIZES: dict[str, int] = {
    **dict.fromkeys(paper.paper_recipes(), paper.WORLD_SIZE),
    **dict.fromkeys(tiny.tiny_recipes(), tiny.WORLD_SIZE),
}


def get_recipe(name: str) -> RunConfig:
    """Build the recipe ``name``; an unknown name raises ``ValueError`` listing the close ones."""
    if name not in RECIPES:
        close = difflib.get_close_matches(name, list(RECIPES), n=5, cutoff=0.6)
        hint = f"; did you mean: {', '.join(close)}?" if close else ""
        raise ValueError(
            f"unknown recipe {name!r}{hint} ({len(RECIPES)} recipes: `python -m megatron_tropd.train --list`)"
        )
    return RECIPES[name]()
