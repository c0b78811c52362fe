"""The project's scripts (``scripts/*.py``) as modules, for the tests of the scripts and of
what they measure (e.g. ``load("bench_norms").saved_bytes``, the saved-memory figure of
docs/performance.md)."""
import importlib.util
import os
import sys

_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "scripts")


def load(name: str):
    """A fresh module of ``scripts/<name>.py``, registered in ``sys.modules`` under ``name``
    (a script's dataclasses look their module up there)."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(_DIR, f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod
