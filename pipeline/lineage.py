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
import sys
from pathlib import Path

from study.imports import PACKAGES, ROOT, closure


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
