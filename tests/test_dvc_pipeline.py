"""A real `dvc repro` of the smoke profile in a temporary git repository: every stage runs, every output exists,
a second `dvc repro` does nothing, and a parameter change invalidates exactly the stages that depend on it."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCALES = ("cpu-xs", "cpu-s")
pytestmark = pytest.mark.slow


def _run(args, cwd, *, expect_ok: bool = True, **kw):
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "DVC_NO_ANALYTICS": "true", "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@localhost",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@localhost"}
    env.pop("MLFLOW_RUN_ID", None)
    res = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, **kw)
    if expect_ok:
        assert res.returncode == 0, f"{args} failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    else:
        assert res.returncode != 0, f"{args} succeeded:\n{res.stdout[-3000:]}"
    return res.stdout + res.stderr


def make_project(dest: Path, profile: str = "smoke") -> Path:
    """A copy of the project (code, dvc.yaml, params.yaml) as a fresh git + DVC repository on ``profile``."""
    for name in ("scm", "study", "stages", "pipeline"):
        shutil.copytree(ROOT / name, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("dvc.yaml", "pyproject.toml", ".dvcignore"):
        shutil.copy(ROOT / name, dest / name)
    params = (ROOT / "params.yaml").read_text()
    (dest / "params.yaml").write_text(re.sub(r"(?m)^profile: \S+", f"profile: {profile}", params, count=1))
    (dest / ".gitignore").write_text("__pycache__/\n.cache/\n")
    _run(["git", "init", "-q"], dest)
    _run([sys.executable, "-m", "dvc", "init", "-q"], dest)
    _run([sys.executable, "-m", "dvc", "config", "core.analytics", "false"], dest)
    (dest / ".dvc" / "plots").mkdir(exist_ok=True)  # the template of dvc.yaml's top-level plots
    shutil.copy(ROOT / ".dvc" / "plots" / "by_scale.json", dest / ".dvc" / "plots" / "by_scale.json")
    _run(["git", "add", "-A"], dest)
    _run(["git", "commit", "-qm", "init"], dest)
    return dest


@pytest.fixture(scope="module")
def repro(tmp_path_factory):
    repo = make_project(tmp_path_factory.mktemp("smoke"))
    log = _run([sys.executable, "-m", "dvc", "repro"], repo, timeout=900)
    return repo, log


def test_every_stage_ran_and_wrote_its_outputs(repro):
    repo, log = repro
    for stage in ("data", "encode", "classifier", "report", *(f"{s}@{x}" for s in ("teacher", "distill", "sample", "evaluate") for x in SCALES)):
        assert f"Running stage '{stage}'" in log, stage
        assert f"\n{stage.partition('@')[0]}: profile smoke" in log, stage  # each stage names its profile first
    for path in ("data/prepared/images.parquet", "data/latents/latents.safetensors", "artifacts/classifier/model.safetensors",
                 "reports/smoke/summary.json", "reports/smoke/report.md", "reports/smoke/fid_vs_params.png",
                 "reports/smoke/loss_curves.png", "reports/smoke/curves/distill.csv", "dvc.lock"):
        assert (repo / path).is_file(), path
    for s in SCALES:
        for path in (f"artifacts/{s}/teacher/model.safetensors", f"artifacts/{s}/distill/model.safetensors",
                     f"artifacts/{s}/samples/samples.safetensors", f"artifacts/{s}/samples/grid_scm2.png",
                     f"metrics/{s}/evaluate.json", f"plots/{s}/distill_history.csv", f"reports/smoke/samples/{s}.png",
                     f"artifacts/{s}/teacher/resolved_params.json"):
            assert (repo / path).is_file(), path
    summary = json.loads((repo / "reports/smoke/summary.json").read_text())
    assert [e["scale"] for e in summary["scales"]] == list(SCALES)
    assert summary["scales"][0]["n_params"] < summary["scales"][1]["n_params"]
    accuracy = json.loads((repo / "artifacts/classifier/metrics.json").read_text())["accuracy"]
    for e in summary["scales"]:
        assert e["fid_clf"]["teacher"] > 0 and e["teacher_nfe"] == 5  # smoke: dpm2 with 3 steps
        assert e["clf_accuracy"] == accuracy  # fid_clf is reported beside its feature extractor's accuracy
        assert e["fid_clf2"]["teacher"] > 0 and e["fid_clf2_ratio"]["scm2"] > 0  # the second feature space
        assert e["fid_inception"]["teacher"] is None and e["fid_inception"]["status"].startswith("off")
    report = (repo / "reports/smoke/report.md").read_text()
    assert f"{accuracy:.1%} held-out accuracy" in report
    assert "| cpu-s | `fid_clf2` |" in report and "`fid_inception`: off (evaluate.inception: off" in report
    assert "![Reconstructions](recon_grid.png)" in report and (repo / "reports/smoke/recon_grid.png").is_file()
    resolved = json.loads((repo / "artifacts/cpu-s/distill/resolved_params.json").read_text())
    assert resolved["params"]["distill"]["steps"] == 6
    assert json.loads((repo / "artifacts/cpu-s/distill/provenance.json").read_text())["git_commit"] != "unknown"
    assert {e["distill_method"] for e in summary["scales"]} == {resolved["params"]["distill"]["method"]}
    distilled = json.loads((repo / "metrics/cpu-s/distill.json").read_text())
    assert distilled["final_r"] == 1.0  # the tangent warm-up's r at the last step (smoke: H = 3 < 6 steps)


def test_second_repro_is_a_no_op_and_status_is_clean(repro):
    repo, _ = repro
    log = _run([sys.executable, "-m", "dvc", "repro"], repo)
    assert "Running stage" not in log
    assert "Data and pipelines are up to date" in _run([sys.executable, "-m", "dvc", "status"], repo)


def test_the_metric_names_read_downstream_are_the_ones_evaluate_writes(repro):
    """study/layout.py names each metric once; the report, the MLflow records and the registry read those names."""
    from pipeline.tracking import TABLE_METRICS
    from study import layout

    repo, _ = repro
    for s in SCALES:
        written = json.loads((repo / layout.metrics_file(s, "evaluate")).read_text())
        assert set(layout.HEADLINE) | set(TABLE_METRICS) <= set(written), set(layout.HEADLINE) - set(written)
        entry = next(e for e in json.loads((repo / "reports/smoke/summary.json").read_text())["scales"] if e["scale"] == s)
        assert entry["fid_clf"]["scm2"] == written[layout.metric("fid_clf", "scm2")]
        assert entry["fid_clf_ratio"]["scm1"] == written[layout.ratio("scm1")]


def test_metrics_show_lists_only_the_headline_numbers(repro):
    """One small numeric file per scale is DVC's metric; every other number is in non-metric JSON."""
    repo, _ = repro
    shown = json.loads(_run([sys.executable, "-m", "dvc", "metrics", "show", "--json"], repo))
    files = next(iter(shown.values()))["data"]  # the workspace (its key is "")
    assert sorted(files) == sorted(f"metrics/{s}/headline.json" for s in SCALES)
    for s in SCALES:
        headline = files[f"metrics/{s}/headline.json"]["data"]
        assert set(headline) == {"fid_clf", "fid_clf2", "ratio_clf", "ratio_clf2", "speedup", "accuracy"}
        assert set(headline["fid_clf"]) == {"teacher", "scm1", "scm2"} and set(headline["ratio_clf"]) == {"scm1", "scm2"}
        leaves = [v for group in headline.values() for v in group.values()]
        assert all(isinstance(v, float) for v in leaves) and len(leaves) <= 20  # numbers only, a few of them
        written = json.loads((repo / f"metrics/{s}/evaluate.json").read_text())
        assert headline["fid_clf"]["scm2"] == float(f"{written['fid_clf_scm2']:.4g}")
    table = _run([sys.executable, "-m", "dvc", "metrics", "show"], repo)
    assert max(len(line) for line in table.splitlines()) < 400, table


def test_plots_show_overlays_the_scales_and_shows_the_figures(repro):
    """Top-level plots: titled, labelled, every scale in one chart (the by_scale template), the figures as images."""
    repo, _ = repro
    shown = json.loads(_run([sys.executable, "-m", "dvc", "plots", "show", "--json"], repo))
    assert not shown.get("errors"), shown.get("errors")
    data = shown["data"]
    loss = data["teacher training loss"][0]["content"]
    assert loss["title"].startswith("Teacher") and loss["encoding"]["x"]["title"] == "thousands of training images"
    assert loss["encoding"]["color"]["field"] == "scale"
    assert {row["scale"] for row in loss["data"]["values"]} == set(SCALES)
    images = [k for k, v in data.items() if v and v[0]["type"] == "image"]
    assert {"reports/smoke/fid_vs_params.png", "reports/smoke/loss_curves.png"} <= set(images)
    assert {f"reports/smoke/samples/{s}.png" for s in SCALES} <= set(images)


def test_plots_show_renders_an_offline_page(repro, tmp_path):
    """The page .dvc/config names (written by `make install`) inlines Vega: no CDN script in what DVC writes."""
    from pipeline import plots_page

    repo, _ = repro
    page = plots_page.write(repo)
    _run([sys.executable, "-m", "dvc", "config", "plots.html_template", "plots/offline.html"], repo)
    _run([sys.executable, "-m", "dvc", "plots", "show", "-o", str(tmp_path / "plots")], repo)
    html = (tmp_path / "plots" / "index.html").read_text()
    assert "vegaEmbed(" in html and "teacher training loss" in html.lower() or "Teacher:" in html
    assert "<script src=" not in html and "cdn.jsdelivr" not in html
    assert len(html) > len(page.read_text())  # the template with the plots in it


@contextlib.contextmanager
def edited(path: Path, old: str, new: str, *, then: Callable[[], Any] = lambda: None):
    """``path`` with its first ``old`` replaced by ``new`` inside the block; restored afterwards, then ``then()``."""
    original = path.read_text()
    assert old in original, old
    try:
        path.write_text(original.replace(old, new, 1))
        yield
    finally:
        path.write_text(original)
        then()


def test_a_distill_parameter_invalidates_only_what_depends_on_it(repro):
    repo, _ = repro
    with edited(repo / "params.yaml", "  tangent_c: 0.1 ", "  tangent_c: 0.2 "):
        status = _run([sys.executable, "-m", "dvc", "status", "--json"], repo)
        changed = set(json.loads(status))
        assert {f"distill@{s}" for s in SCALES} <= changed
        assert not any(k.startswith(("teacher@", "data", "encode", "classifier")) for k in changed), changed


def test_fresh_seeds_scores_the_finished_models_on_unused_seed_sets(repro):
    """benchmarks/fresh_seeds.py re-scores a finished run on other seed sets; on the pipeline's own set 0 it must
    reproduce the evaluate stage's fid_clf, which shows that it scores exactly as the pipeline does."""
    repo, _ = repro
    script = ROOT / "benchmarks" / "fresh_seeds.py"
    evaluation = json.loads((repo / "artifacts/cpu-xs/evaluation.json").read_text())
    n = evaluation["protocol"]["generated_per_set"]
    out = _run([sys.executable, str(script), "--run", str(repo), "--scale", "cpu-xs", "--seed-sets", "0",
                "--num-samples", str(n)], repo)
    for m in ("teacher", "scm1", "scm2"):
        printed = float(re.search(rf"cpu-xs {m}: fid_clf (\S+)", out).group(1))
        assert printed == pytest.approx(evaluation["per_seed"][m][0]["fid_clf"], abs=0.006), (m, out)
    out = _run([sys.executable, str(script), "--run", str(repo), "--scale", "cpu-xs", "--seed-sets", "7", "8",
                "--num-samples", str(n)], repo)
    assert "over seed sets [7, 8]" in out and "fid_clf ratio to the teacher: 1-step" in out and "fid_clf2 ratio" in out


def test_a_comment_edit_reruns_its_stage_and_nothing_downstream(repro):
    """The git commit and the timings live in provenance.json, outside DVC's hash: a re-run that computes the same
    latents leaves every downstream stage up to date."""
    repo, _ = repro
    repro_again = lambda: _run([sys.executable, "-m", "dvc", "repro"], repo, timeout=600)
    with edited(repo / "stages" / "encode.py", '"""Stage ``encode``', '# a comment\n"""Stage ``encode``', then=repro_again):
        log = _run([sys.executable, "-m", "dvc", "repro"], repo, timeout=600)
        assert re.findall(r"Running stage '([^']+)'", log) == ["encode"], log[-2000:]
        assert (repo / "data/latents/provenance.json").is_file()


def test_a_stage_killed_under_dvc_repro_resumes_from_its_checkpoint(repro):
    """SIGKILL inside distill@cpu-xs during `dvc repro` (SCM_FAILPOINT); the next `dvc repro` resumes it."""
    repo, _ = repro
    repro_again = lambda: _run([sys.executable, "-m", "dvc", "repro"], repo, timeout=600)
    with edited(repo / "params.yaml", "  tangent_c: 0.1 ", "  tangent_c: 0.15 ", then=repro_again):
        env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
               "SCM_FAILPOINT": "step:5", "DVC_NO_ANALYTICS": "true"}
        killed = subprocess.run([sys.executable, "-m", "dvc", "repro", "distill@cpu-xs"], cwd=repo, env=env,
                                capture_output=True, text=True, timeout=600)
        assert killed.returncode != 0
        assert (repo / "checkpoints" / "distill-cpu-xs" / "last.safetensors").is_file()
        log = _run([sys.executable, "-m", "dvc", "repro", "distill@cpu-xs"], repo, timeout=600)
        assert "resuming from" in log and "at step 3" in log, log[-2000:]
        assert json.loads((repo / "metrics/cpu-xs/distill.json").read_text())["resumed_from_step"] == 3
        assert not (repo / "checkpoints" / "distill-cpu-xs").exists()  # cleared once the outputs are written


def test_dvc_exp_run_with_a_value_the_profile_would_shadow_fails_naming_both_keys(repro):
    """`dvc exp run -S distill.steps=8` on the smoke profile: smoke's distill.steps (6) would win silently and DVC
    would record 8; instead the first stage that reads it stops with one line naming both keys. (Last in this module:
    it leaves the workspace restored, but DVC removes the distill outputs before the command fails.)"""
    repo, _ = repro
    try:
        out = _run([sys.executable, "-m", "dvc", "exp", "run", "-S", "distill.steps=8"], repo, expect_ok=False, timeout=600)
        assert "error: " in out and "distill.steps = 8 (profiles.smoke.distill.steps = 6 wins)" in out, out[-2000:]
        assert "Traceback" not in out
    finally:
        _run(["git", "checkout", "--", "params.yaml"], repo)
        _run([sys.executable, "-m", "dvc", "checkout", "-f"], repo)

