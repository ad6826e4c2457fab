"""Real English that every machine with Python has offline: the docstrings of the standard library.

``write_stdlib_corpus`` parses (never imports) the installed standard library's ``.py`` files and
writes one JSON line per docstring of at least ``min_chars`` characters: ``{"text": ..., "source":
"module.py:line"}``. The files are read in sorted order, so the corpus is the same on every run of
the same Python.
"""

from __future__ import annotations

import ast
import inspect
import json
import sysconfig
from pathlib import Path

from ds_mtp.data import write_atomic
from ds_mtp.errors import UserError


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def iter_docstrings(root: Path | None = None, min_chars: int = 200, max_files: int = 0):
    """(text, "relative/path.py:line") for every docstring of the .py files under root, sorted by path."""
    root = root or stdlib_dir()
    files = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts and "test" not in p.parts
                   and "tests" not in p.parts and "idlelib" not in p.parts)
    if max_files:
        files = files[:max_files]
    for path in files:
        try:
            tree = ast.parse(path.read_bytes())
        except (SyntaxError, ValueError, OSError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node, clean=False)
                if doc and len(doc) >= min_chars:
                    text = inspect.cleandoc(doc)
                    yield text, f"{path.relative_to(root)}:{getattr(node, 'lineno', 1)}"


def write_stdlib_corpus(out: str | Path, *, min_chars: int = 200, max_docs: int = 0, max_files: int = 0,
                        log=print) -> int:
    """Write the docstring corpus as JSON lines; returns the number of documents."""
    out = Path(out)
    if out.is_dir():
        raise UserError(f"{out} is a directory; give a .jsonl file name")
    lines = []
    for text, where in iter_docstrings(min_chars=min_chars, max_files=max_files):
        lines.append(json.dumps({"text": text, "source": where}, ensure_ascii=False))
        if max_docs and len(lines) >= max_docs:
            break
    if not lines:
        raise UserError(f"no docstrings of at least {min_chars} characters found under {stdlib_dir()}")
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, ("\n".join(lines) + "\n").encode())
    log(f"stdlib corpus: {len(lines)} docstrings ({sum(len(line) for line in lines) / 1e6:.1f} MB) -> {out}")
    return len(lines)
