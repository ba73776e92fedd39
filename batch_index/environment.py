"""First check of `python -m batch_index`: are the job's packages importable by this Python?

`ray job submit -- python -m batch_index ...` runs the cluster's own `python`, which may not be
this project's venv; without this check the job dies on the first import with a bare
ModuleNotFoundError. Standard library only, so it runs before anything else is imported.
"""

from __future__ import annotations

import importlib.util
import sys

# import name -> what to install (pyproject.toml pins them)
REQUIRED = {"numpy": "numpy", "pandas": "pandas", "PIL": "pillow", "yaml": "pyyaml",
            "pydantic": "pydantic", "pydantic_settings": "pydantic-settings",
            "pymilvus": "pymilvus[milvus-lite]", "ray": "ray[serve,data]", "torch": "torch",
            "timm": "timm", "transformers": "transformers", "tqdm": "tqdm"}
FIX = ("run the job with the project's venv: `ray job submit --working-dir . --runtime-env-json "
       "'{\"py_executable\": \"/abs/path/.venv/bin/python\"}' -- /abs/path/.venv/bin/python -m "
       "batch_index ...` (README, Bulk indexing), or `pip install -e .` into this Python")


def missing_packages() -> list[str]:
    """The required packages this interpreter cannot import (by install name)."""
    return [package for module, package in REQUIRED.items()
            if importlib.util.find_spec(module) is None]


def check() -> None:
    """SystemExit naming the missing packages, this interpreter and the fix."""
    missing = missing_packages()
    if missing:
        raise SystemExit(f"batch_index: {sys.executable} lacks {', '.join(missing)}; {FIX}")
