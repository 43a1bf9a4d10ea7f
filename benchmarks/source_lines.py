"""Lines of Python source under ``src/``, at git commits and in the working tree.

Two counts per file:

- physical lines: newline characters, as ``wc -l`` counts them;
- SLOC (logical source lines): lines that carry at least one code token. Blank lines, comments and docstrings
  (the first string statement of a module, class or function, found with ``ast``) do not count; tokens come from
  ``tokenize``, so a string or expression spanning several lines counts every line it covers. A file that does not
  parse counts 0 SLOC.

Files at a commit are read with ``git show C:path`` (nothing is checked out); ``--worktree`` reads the files on disk
(tracked or not, ignored ones left out). Output is a markdown table::

    python benchmarks/source_lines.py                          # HEAD
    python benchmarks/source_lines.py --commits 5e54817 HEAD --worktree --per-file 20
"""

from __future__ import annotations

import argparse
import ast
import io
import subprocess
import tokenize
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_NOT_CODE = {tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER}


def sloc(source: str) -> int:
    """Lines of ``source`` holding a code token, docstrings, comments and blank lines excluded."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return 0
    docstring_lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.body:
            first = node.body[0]
            value = first.value if isinstance(first, ast.Expr) else None
            if isinstance(value, ast.Constant) and isinstance(value.value, str):
                docstring_lines.update(range(first.lineno, first.end_lineno + 1))
    code_lines: set[int] = set()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type not in _NOT_CODE:
            code_lines.update(range(tok.start[0], tok.end[0] + 1))
    return len(code_lines - docstring_lines)


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout


def sources_at(commit: str) -> dict[str, str]:
    """``{path: text}`` of the ``.py`` files under ``src/`` at ``commit``."""
    paths = [p for p in _git("ls-tree", "-r", "--name-only", commit, "src").split() if p.endswith(".py")]
    return {p: _git("show", f"{commit}:{p}") for p in paths}


def sources_in_worktree() -> dict[str, str]:
    """``{path: text}`` of the ``.py`` files under ``src/`` on disk, git-ignored files left out."""
    listed = _git("ls-files", "--cached", "--others", "--exclude-standard", "src").split()
    return {p: (ROOT / p).read_text() for p in listed if p.endswith(".py") and (ROOT / p).is_file()}


def count(sources: dict[str, str]) -> dict[str, tuple[int, int]]:
    """``{path: (physical lines, SLOC)}``."""
    return {path: (text.count("\n"), sloc(text)) for path, text in sources.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--commits", nargs="+", default=None, help="commits to count (default: HEAD)")
    parser.add_argument("--worktree", action="store_true", help="also count the working tree")
    parser.add_argument("--per-file", type=int, default=0, metavar="N", help="list the N largest files (by SLOC)")
    args = parser.parse_args(argv)

    columns = {}
    for commit in args.commits or ["HEAD"]:
        short = _git("rev-parse", "--short", commit).strip()
        columns[commit if commit == short else f"{commit} ({short})"] = count(sources_at(commit))
    if args.worktree:
        columns["worktree"] = count(sources_in_worktree())

    print("| source | files | physical lines | SLOC |")
    print("|---|---:|---:|---:|")
    for name, counts in columns.items():
        physical = sum(p for p, _ in counts.values())
        logical = sum(s for _, s in counts.values())
        print(f"| {name} | {len(counts)} | {physical:,} | {logical:,} |")

    if args.per_file:
        for name, counts in columns.items():
            print(f"\n{args.per_file} largest files, {name}:\n")
            print("| file | physical lines | SLOC |")
            print("|---|---:|---:|")
            for path, (physical, logical) in sorted(counts.items(), key=lambda kv: -kv[1][1])[: args.per_file]:
                print(f"| {path} | {physical:,} | {logical:,} |")


if __name__ == "__main__":
    main()
