"""Where the stages' outputs live and what their metrics are called: the names every part of the pipeline shares.

Each path helper takes the directory it lives under (default: the project-relative one), so a stage called with
other ``--metrics``/``--plots``/``--artifacts`` directories finds its files the same way. ``dvc.yaml`` writes these
paths into its stage commands (``tests/pipeline/test_lineage.py`` checks that it does); the
report stage, the MLflow records and the Prefect flows read them from here, so a path or a metric is named once.
"""

from __future__ import annotations

from pathlib import Path

# Paths, relative to the project root.
PREPARED = "data/prepared"  # data stage
LATENTS = "data/latents"  # encode stage
CLASSIFIER = "artifacts/classifier"  # classifier stage
REPORTS = "reports"  # report stage: reports/<profile> (reports_dir)
METRICS, PLOTS, ARTIFACTS = "metrics", "plots", "artifacts"  # per-scale metrics, training curves, models and samples
SUMMARY, REPORT = "summary.json", "report.md"  # in REPORTS
SAMPLES_FILE = "samples.safetensors"  # in stage_dir(scale, "samples")
RESOLVED = "resolved_params.json"  # beside every output: the resolved parameters (deterministic)
PROVENANCE = "provenance.json"  # beside every output: git commit, timings (outside DVC's hash: .dvcignore)

# What the study compares: the teacher's ODE sampler and the sCM student at 1 and 2 steps.
METHODS = ("teacher", "scm1", "scm2")
STUDENTS = ("scm1", "scm2")


def stage_dir(scale: str, stage: str, artifacts: str | Path = ARTIFACTS) -> Path:
    """``artifacts/<scale>/<stage>``: the output directory of ``teacher``, ``distill`` or ``samples``."""
    return Path(artifacts) / scale / stage


def metrics_file(scale: str, stage: str, metrics: str | Path = METRICS) -> Path:
    """``metrics/<scale>/<stage>.json``: every number ``teacher``, ``distill`` or ``evaluate`` reports (not a DVC metric)."""
    return Path(metrics) / scale / f"{stage}.json"


def headline_file(scale: str, metrics: str | Path = METRICS) -> Path:
    """``metrics/<scale>/headline.json``: the few numbers of a scale that ``dvc metrics show`` lists (DVC's only metric)."""
    return Path(metrics) / scale / "headline.json"


def reports_dir(profile: str, reports: str | Path = REPORTS) -> Path:
    """``reports/<profile>``: the report stage's output. Only ``reports/default`` is committed (``.gitignore``)."""
    return Path(reports) / profile


def history_file(scale: str, stage: str, plots: str | Path = PLOTS) -> Path:
    """``plots/<scale>/<stage>_history.csv``: the training curve of ``teacher`` or ``distill``."""
    return Path(plots) / scale / f"{stage}_history.csv"


def evaluation_file(scale: str, artifacts: str | Path = ARTIFACTS) -> Path:
    """``artifacts/<scale>/evaluation.json``: every number of the evaluate stage, per seed set."""
    return Path(artifacts) / scale / "evaluation.json"


def grid_file(method: str) -> str:
    """The sample grid of ``method`` in the samples directory."""
    return f"grid_{method}.png"


# Metric keys of metrics/<scale>/evaluate.json.


def metric(name: str, method: str) -> str:
    """``fid_clf`` of ``scm2`` -> ``fid_clf_scm2`` (the mean over seed sets)."""
    return f"{name}_{method}"


def metric_std(name: str, method: str) -> str:
    """The spread over seed sets of :func:`metric`."""
    return f"{name}_{method}_std"


FEATURE_SPACES = ("clf", "clf2", "inception", "dinov2")  # study/fidelity.py says what each is


def fd(space: str) -> str:
    """The Fréchet-distance key of a feature space: ``fid_clf``, ``fid_clf2``, ``fid_inception``, ``fd_dinov2``."""
    return "fd_dinov2" if space == "dinov2" else f"fid_{space}"


def ratio(method: str, space: str = "clf") -> str:
    """Fréchet distance of a student over the teacher's, in one feature space: ``fid_clf_ratio_scm2``."""
    return f"{fd(space)}_ratio_{method}"


def speedup(method: str) -> str:
    """Sampler-only speedup of a student over the teacher."""
    return f"speedup_{method}"


def nfe(method: str) -> str:
    return f"nfe_{method}"


# The headline numbers of one scale: what the MLflow records, the model registry and the cross-scale table show.
HEADLINE = (*(metric("fid_clf", m) for m in METHODS), ratio("scm2"), ratio("scm2", "clf2"), metric("kid_clf_mean", "scm2"),
            *(speedup(m) for m in STUDENTS), nfe("teacher"))
