"""The Lightning-free layer: ``sdq_lightning.core`` (the search, the freeze, the schedules, the added losses, the
teacher) and every module of the package it imports, at module level or inside a function, import no Lightning."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import sdq_lightning

PKG = Path(sdq_lightning.__file__).resolve().parent
LIGHTNING = ("lightning", "pytorch_lightning", "lightning_fabric")


def _module_file(name: str) -> Path | None:
    rel = Path(*name.split(".")[1:])
    for cand in (PKG / rel / "__init__.py", (PKG / rel).with_suffix(".py")):
        if cand.is_file():
            return cand
    return None


def _imports(path: Path, module: str) -> set[str]:
    """Every absolute module name ``path`` imports (relative imports resolved against ``module``), at module level or
    inside a function, except in a package's lazy ``__getattr__``."""
    out: set[str] = set()
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    tree = ast.parse(path.read_text())
    lazy = {id(n) for f in ast.walk(tree) if isinstance(f, ast.FunctionDef) and f.name == "__getattr__"
            for n in ast.walk(f)}  # a package's PEP 562 hook loads its Lightning names only when they are asked for
    for node in ast.walk(tree):
        if id(node) in lazy:
            continue
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            out.add(base)
            out.update(f"{base}.{a.name}" for a in node.names)  # `from pkg import submodule`
    return out


def lightning_imports(root: str) -> dict[str, list[str]]:
    """{module of the package reachable from ``root``: the Lightning modules it imports}."""
    seen, todo, found = set(), [root], {}
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        todo += [name.rsplit(".", k)[0] for k in range(1, name.count("."))]  # importing a module runs its parents
        path = _module_file(name)
        if path is None:
            continue
        for imp in _imports(path, name):
            if imp.split(".")[0] in LIGHTNING:
                found.setdefault(name, []).append(imp)
            elif imp.split(".")[0] == "sdq_lightning":
                todo.append(imp)
    return found


def test_core_reaches_no_lightning_import():
    found = lightning_imports("sdq_lightning.core")
    assert not found, f"the Lightning-free core reaches Lightning imports: {found}"


def test_the_walk_finds_lightning_where_it_is():
    # the control: the callback package imports Lightning, and the walk must see it
    found = lightning_imports("sdq_lightning.callbacks")
    assert "sdq_lightning.callbacks.sdq" in found and "sdq_lightning.callbacks.guard" in found


def test_importing_the_core_loads_no_lightning():
    code = ("import sys, sdq_lightning.core; "
            f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {LIGHTNING!r}); "
            "assert not bad, bad")
    res = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
