"""Help texts taken from the library's module docstrings without importing the modules (they import torch,
and every `beit` command builds the whole parser first, `--help` included)."""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path


def module_doc(name: str) -> str:
    """The docstring of module `name` (e.g. "beit.visualize"), read from its source file."""
    origin = importlib.util.find_spec(name).origin  # finds the file; runs only the parent packages' __init__
    return ast.get_docstring(ast.parse(Path(origin).read_text()), clean=False) or ""
