"""A benchmark script (``benchmarks/<name>.py``) loaded as a module, for the tests that check what it measures.

The scripts are run as files, not installed; the suite's root conftest puts this folder on ``sys.path`` (pytest's
default import mode), so a test anywhere under tests/ imports ``from benchmark_script import load``.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load(name: str, path: Path | None = None) -> ModuleType:
    """``benchmarks/<name>.py`` (or the file ``path``) as the module ``name``, loaded once per run: a script
    importing another, as ``import open_set``, gets the same module."""
    path = (path or BENCHMARKS / f"{name}.py").resolve()
    module = sys.modules.get(name)
    if module is not None and Path(getattr(module, "__file__", "")).resolve() == path:
        return module
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module      # dataclasses look their module up while the class is created
    spec.loader.exec_module(module)
    return module
