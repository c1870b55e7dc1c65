"""``tools/prepare_benchmarks.py`` loaded as a module (``tools/`` is not a package), once per session."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path


def load_prepare_tool():
    if "prepare_benchmarks" in sys.modules:
        return sys.modules["prepare_benchmarks"]
    path = Path(__file__).parents[1] / "tools" / "prepare_benchmarks.py"
    spec = importlib.util.spec_from_file_location("prepare_benchmarks", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["prepare_benchmarks"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module
