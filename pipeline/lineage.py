"""The code each DVC stage runs, computed from the imports, and the ``dvc.yaml`` deps that must list it.

A stage's command is ``python -m stages.<name>``; the files it runs are the import closure of ``stages/<name>.py``
over the project's packages (every ``import`` and ``from … import``, at module level or inside functions, plus the
``__init__.py`` of every package on the way). For ``dvc repro`` to re-run exactly what an edit touches, each of those
files must be a ``deps`` entry of the stage, and no other project file may be. This module computes the closure
(:func:`code_deps`), checks ``dvc.yaml`` against it (:func:`stale_deps`), and rewrites the code entries of
``dvc.yaml`` in place (``python -m pipeline.lineage --write``), keeping its comments and data deps.

    python -m pipeline.lineage            # exit 1 and list the differences if dvc.yaml is stale
    python -m pipeline.lineage --write    # bring dvc.yaml's code deps up to date
"""

from __future__ import annotations

import argparse
import ast
import sys
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


def code_deps(stage: str, root: Path = ROOT) -> list[str]:
    """The sorted, root-relative code deps of ``stages/<stage>.py``."""
    return sorted(str(p.relative_to(root)) for p in closure(f"stages.{stage}", root))


def is_code(dep: str) -> bool:
    """Whether a ``deps`` entry is project code (as opposed to data, artifacts or metrics)."""
    return dep.endswith(".py") and dep.split("/")[0] in PACKAGES


def _stage_bodies(dvc_yaml: dict) -> dict[str, dict]:
    """Stage name -> its definition (the ``do:`` body for a ``foreach`` stage)."""
    return {name: body.get("do", body) for name, body in dvc_yaml["stages"].items()}


def _load(path: Path):
    from ruamel.yaml import YAML

    yaml = YAML()
    yaml.preserve_quotes = True
    yaml.width = 120
    yaml.indent(mapping=2, sequence=4, offset=2)
    return yaml, yaml.load(path.read_text())


def stale_deps(root: Path = ROOT) -> dict[str, tuple[list[str], list[str]]]:
    """Stage -> (code it runs that is not a dep, code deps it does not run), for every stage that differs."""
    _, doc = _load(root / "dvc.yaml")
    out = {}
    for name, body in _stage_bodies(doc).items():
        listed = {d for d in body.get("deps", []) if isinstance(d, str) and is_code(d)}
        needed = set(code_deps(name, root))
        if listed != needed:
            out[name] = (sorted(needed - listed), sorted(listed - needed))
    return out


def write_deps(root: Path = ROOT) -> list[str]:
    """Rewrite the code entries of every stage's ``deps`` in ``dvc.yaml`` (data deps first, kept in order)."""
    from ruamel.yaml.comments import CommentedSeq

    yaml, doc = _load(root / "dvc.yaml")
    changed = []
    for name, body in _stage_bodies(doc).items():
        old = list(body.get("deps", []))
        new = CommentedSeq([d for d in old if not (isinstance(d, str) and is_code(d))] + code_deps(name, root))
        if old != list(new):
            body["deps"] = new
            changed.append(name)
    with open(root / "dvc.yaml", "w") as f:
        yaml.dump(doc, f)
    return changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.lineage", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write", action="store_true", help="rewrite the code deps of dvc.yaml")
    args = parser.parse_args(argv)
    if args.write:
        changed = write_deps()
        print(f"dvc.yaml: code deps rewritten for {', '.join(changed) or 'no stage'}")
        return 0
    stale = stale_deps()
    for name, (missing, extra) in stale.items():
        print(f"{name}: missing {missing or '-'}; not imported {extra or '-'}", file=sys.stderr)
    if stale:
        print("dvc.yaml is stale: run `python -m pipeline.lineage --write`", file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":
    raise SystemExit(main())
