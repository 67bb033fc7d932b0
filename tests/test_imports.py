"""Every module of the package imports on its own: no import cycle hides behind a lucky import order."""

import subprocess
import sys
from pathlib import Path

import peftkit

SCRIPT = r"""
import importlib, pkgutil, sys, traceback
import torch, transformers  # third-party imports are slow: load them once, then test peftkit's own graph
import peftkit
names = sorted(m.name for m in pkgutil.walk_packages(peftkit.__path__, "peftkit.") if not m.name.endswith("__main__"))
failed = []
for name in names:
    for loaded in [m for m in sys.modules if m == "peftkit" or m.startswith("peftkit.")]:
        del sys.modules[loaded]  # each module first, alone: its own imports must resolve in order
    try:
        importlib.import_module(name)
    except Exception:
        failed.append(name + ": " + traceback.format_exc().strip().splitlines()[-1])
print(len(names))
print("\n".join(failed))
"""


def test_every_module_imports_alone_in_a_fresh_interpreter():
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=600,
                         cwd=Path(peftkit.__file__).parents[1])
    assert out.returncode == 0, out.stderr[-3000:]
    count, *failures = out.stdout.strip().splitlines()
    root = Path(peftkit.__file__).parent  # (walk_packages lists every module but the package itself)
    files = [p for p in root.rglob("*.py") if p.name != "__main__.py" and p != root / "__init__.py"]
    assert int(count) == len(files), out.stdout  # every module was tried
    assert not failures, "\n".join(failures)
