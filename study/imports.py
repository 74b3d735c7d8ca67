"""The project files a module runs: its import closure, computed from the code, and a hash of them.

``python -m stages.<name>`` runs ``stages/<name>.py`` and every project module it imports, at module level or inside
functions, plus the ``__init__.py`` of every package on the way. :func:`closure` finds those files by reading the code
(AST), so it does not depend on what a process happened to import. ``pipeline/lineage.py`` writes them into
``dvc.yaml`` as the stage's deps; :func:`code_hash` puts them into the fingerprint of a training checkpoint, so a
checkpoint written by other code is never resumed.
"""

from __future__ import annotations

import ast
import hashlib
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("scm", "study", "stages", "pipeline")  # the project's own code; everything else is a dependency


def module_file(module: str, root: Path = ROOT) -> Path | None:
    """The project file that defines ``module`` (``study.images`` -> ``study/images.py``), or None if it is not ours."""
    if module.split(".")[0] not in PACKAGES:
        return None
    base = root.joinpath(*module.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def _imported_modules(path: Path) -> set[str]:
    """Every module ``path`` imports, anywhere in the file (``from a import b`` yields ``a`` and ``a.b``)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return found


def _with_parents(module: str) -> list[str]:
    """``a.b.c`` -> ``a``, ``a.b``, ``a.b.c``: importing a module runs its packages' ``__init__`` first."""
    parts = module.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


@cache
def closure(module: str, root: Path = ROOT) -> frozenset[Path]:
    """The project files that running ``python -m <module>`` imports, ``module``'s own file included."""
    seen: set[Path] = set()
    todo = [module]
    while todo:
        for name in _with_parents(todo.pop()):
            path = module_file(name, root)
            if path is None or path in seen:
                continue
            seen.add(path)
            todo.extend(_imported_modules(path))
    return frozenset(seen)


def code_hash(module: str, root: Path = ROOT) -> str:
    """sha256 over the root-relative names and bytes of :func:`closure` (read now, not cached)."""
    digest = hashlib.sha256()
    for path in sorted(closure(module, root)):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()
