"""The layout's rules (ARCHITECTURE.md section 2), checked on the code itself.

- ``central`` runs with torch absent and never imports ``trainer``;
- ``contract`` imports nothing of ours (tests/contract);
- no module imports an ``__main__``.
"""

from __future__ import annotations

import ast
import pkgutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _modules(package: str) -> list[str]:
    root = REPO / package
    return [package] + [m.name for m in pkgutil.walk_packages([str(root)], prefix=f"{package}.")
                        if not m.name.endswith("__main__")]


def test_every_central_module_imports_with_torch_absent_and_without_the_trainer():
    # A None entry in sys.modules makes ``import torch`` raise ImportError, as on a host without torch.
    code = ("import importlib, sys\n"
            "sys.modules['torch'] = None\nsys.modules['torchvision'] = None\n"
            f"for name in {_modules('central')!r}:\n"
            "    importlib.import_module(name)\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('trainer', 'dashboard') or "
            "(m.startswith('torch') and sys.modules[m] is not None))\n"
            "print(','.join(bad))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == ""
    assert len(_modules("central")) > 15            # the walk found the package's modules


def test_the_central_entry_point_lists_every_service():
    out = subprocess.run([sys.executable, "-m", "central", "--help"], cwd=REPO, capture_output=True, text=True,
                         check=True)
    for verb in ("ingest", "review", "labels", "backgrounds", "publish", "serve-bundles", "rollout", "rollback",
                 "dashboard"):
        assert verb in out.stdout


def test_no_module_imports_an_entry_point():
    offenders = []
    for package in ("contract", "agent", "trainer", "central"):
        for path in (REPO / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.ImportFrom) and (node.module or "").endswith("__main__"):
                    offenders.append(f"{path.relative_to(REPO)}:{node.lineno}")
                if isinstance(node, ast.Import) and any(a.name.endswith("__main__") for a in node.names):
                    offenders.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert offenders == []
