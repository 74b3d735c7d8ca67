"""pipeline/lineage.py: every stage's deps in dvc.yaml are exactly the code it runs, and DVC acts on it.

The closure is computed from the code (AST, imports inside functions included); a dep removed from dvc.yaml is
caught; and in a real DVC project, editing a library file makes `dvc status` report exactly the stages that import it.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline import lineage
from study import imports, layout
from helpers import ROOT, make_project

SCALES = ("cpu-xs", "cpu-s")


def test_dvc_yaml_lists_exactly_the_code_each_stage_runs():
    assert lineage.stale_deps() == {}
    assert lineage.main([]) == 0


def test_stages_are_exactly_the_dvc_stages_and_import_no_other_stage():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    assert sorted(p.stem for p in (ROOT / "stages").glob("*.py") if p.stem != "__init__") == sorted(stages)
    for name in stages:
        own = {f"stages/{name}.py", "stages/__init__.py"}
        assert not [d for d in lineage.code_deps(name) if d.startswith("stages/") and d not in own], name
        assert not [d for d in lineage.code_deps(name) if d.startswith("pipeline/")], name


def test_the_library_never_imports_stages_or_pipeline():
    for package in ("study", "scm"):
        for path in (ROOT / package).glob("*.py"):
            module = f"{package}.{path.stem}"
            assert not [p for p in imports.closure(module) if p.parts[-2] in ("stages", "pipeline")], module
    assert not [p for p in imports.closure("scm.losses") if "study" in p.parts]


def _copy_tree(dest: Path) -> Path:
    for name in lineage.PACKAGES:
        shutil.copytree(ROOT / name, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "dvc.yaml", dest / "dvc.yaml")
    return dest


def test_a_dep_removed_from_dvc_yaml_is_caught(tmp_path):
    root = _copy_tree(tmp_path)
    text = (root / "dvc.yaml").read_text()
    evaluate = text.index("  evaluate:")
    cut = text.index("        - study/fidelity.py\n", evaluate)
    (root / "dvc.yaml").write_text(text[:cut] + text[cut:].replace("        - study/fidelity.py\n", "", 1))
    assert lineage.stale_deps(root) == {"evaluate": (["study/fidelity.py"], [])}
    assert lineage.write_deps(root) == ["evaluate"]
    assert lineage.stale_deps(root) == {}


def test_imports_inside_functions_count(tmp_path):
    root = _copy_tree(tmp_path)
    (root / "study" / "extra.py").write_text("X = 1\n")
    stage = root / "stages" / "report.py"
    stage.write_text(stage.read_text() + "\n\ndef _late():\n    from study.extra import X\n    return X\n")
    imports.closure.cache_clear()
    try:
        assert "study/extra.py" in lineage.code_deps("report", root)
        assert lineage.stale_deps(root) == {"report": (["study/extra.py"], [])}
    finally:
        imports.closure.cache_clear()


def test_dvc_yaml_commands_use_the_layout_paths():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    cmd = {name: " ".join(body.get("do", body)["cmd"].split()) for name, body in stages.items()}
    item = "${item}"
    assert f"--out {layout.PREPARED}" in cmd["data"]
    assert f"--out {layout.LATENTS}" in cmd["encode"] and f"--out {layout.CLASSIFIER}" in cmd["classifier"]
    for stage in ("teacher", "distill"):
        assert f"--out {layout.stage_dir(item, stage)}" in cmd[stage]
        assert f"--metrics {layout.metrics_file(item, stage)}" in cmd[stage]
        assert f"--history {layout.history_file(item, stage)}" in cmd[stage]
    assert f"--out {layout.stage_dir(item, 'samples')}" in cmd["sample"]
    assert f"--metrics {layout.metrics_file(item, 'evaluate')}" in cmd["evaluate"]
    assert f"--details {layout.evaluation_file(item)}" in cmd["evaluate"]
    assert f"--out {layout.REPORTS}" in cmd["report"]


def _dvc(args: list[str], cwd: Path) -> str:
    res = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=cwd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    return res.stdout


@pytest.fixture(scope="module")
def committed(tmp_path_factory) -> Path:
    """A DVC project whose dvc.lock records every stage (placeholder outputs), so `dvc status` compares code."""
    repo = make_project(tmp_path_factory.mktemp("lineage"), profile="default")
    stages = yaml.safe_load((repo / "dvc.yaml").read_text())["stages"]
    for body in stages.values():
        do = body.get("do", body)
        for item in (SCALES if "foreach" in body else [None]):
            for entry in [*do.get("outs", []), *do.get("metrics", []), *do.get("plots", [])]:
                path = repo / (next(iter(entry)) if isinstance(entry, dict) else entry).replace("${item}", str(item)).replace("${profile}", "default")
                path.parent.mkdir(parents=True, exist_ok=True)
                if path.suffix:
                    path.write_text("placeholder\n")
                else:
                    path.mkdir(exist_ok=True)
                    (path / "placeholder").write_text("placeholder\n")
    _dvc(["commit", "-f", "-q"], repo)
    assert json.loads(_dvc(["status", "--json"], repo)) == {}
    return repo


@pytest.mark.slow
@pytest.mark.parametrize("edited", ["study/fidelity.py", "study/images.py", "scm/losses.py"])
def test_dvc_status_reports_exactly_the_stages_that_import_an_edited_file(committed, edited):
    expected = set()
    for stage in yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]:
        if edited in lineage.code_deps(stage):
            per_scale = stage in ("teacher", "distill", "sample", "evaluate")
            expected |= {f"{stage}@{s}" for s in SCALES} if per_scale else {stage}
    path = committed / edited
    original = path.read_text()
    try:
        path.write_text(original + "\n# an edit\n")
        changed = set(json.loads(_dvc(["status", "--json"], committed)))
    finally:
        path.write_text(original)
    assert changed == expected
    if edited == "study/fidelity.py":  # the evaluate stage alone computes metrics
        assert changed == {"evaluate@cpu-xs", "evaluate@cpu-s"}
    if edited == "study/images.py":  # load_split: every stage that reads the prepared images
        assert {"encode", "classifier", "evaluate@cpu-s"} <= changed
