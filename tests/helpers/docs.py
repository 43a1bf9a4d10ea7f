"""Run a python block of docs/extending.md as written."""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path

DOC = Path(__file__).resolve().parents[2] / "docs" / "extending.md"


def doc_example(section: str, module_name: str = "doc_example", register: bool = False) -> types.ModuleType:
    """The first python block of ``section``, executed as the module ``module_name`` (its decorators register).
    ``register``: also put the module in ``sys.modules`` (timm's ``register_model`` looks the entrypoint's module
    up there); the caller removes it again."""
    text = DOC.read_text().split(f"## {section}\n", 1)[1]
    module = types.ModuleType(module_name)
    if register:
        sys.modules[module_name] = module
    exec(compile(re.search(r"```python\n(.*?)```", text, re.S).group(1), str(DOC), "exec"), module.__dict__)
    return module
