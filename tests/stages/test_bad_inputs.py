"""Bad inputs across the stage CLIs, run for real as subprocesses in a throwaway project directory.

Each row of the table is one bad input (a parameter, a file, a checkpoint, a URL). Every one must end the same way:
exit code 2, one ``error: ...`` line on stderr that names the culprit, no traceback, and nothing left behind (no output
directory, no ``.<name>.tmp-*`` sibling, no metrics/history file, and a pre-existing output directory byte-identical).

The subprocesses start at once on a small thread pool (each one spends most of its time importing torch); every test
then checks its own row.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[2]
SHAPE = (2, 8, 8)
WORKERS = 4
OUT = "artifacts/out"  # every stage's --out, relative to the project directory
METRICS, HISTORY = "metrics/m.json", "plots/h.csv"

# Tiny sizes everywhere, so that an input that is wrongly accepted still finishes quickly (and then fails the test).
TINY = ["base.threads=1", "base.device=cpu", "data.max_images=20", "encode.steps=2", "encode.batch_size=4",
        "classifier.steps=2", "teacher.steps=2", "teacher.batch_size=4", "teacher.lr_warmup_steps=0", "teacher.log_every=1",
        "distill.steps=2", "distill.batch_size=4", "distill.log_every=1", "sample.num_samples=4", "sample.seed_sets=1",
        "sample.teacher_steps=1", "sample.batch_size=4", "sample.grid_size=4", "evaluate.kid_subset_size=2"]


# --------------------------------------------------------------------------------------------------------------
# Fixtures: built once per module.


def _latents(folder: Path, shape=SHAPE, nan: bool = False) -> Path:
    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    train, eval_ = 0.5 * torch.randn(16, *shape, generator=g), 0.5 * torch.randn(8, *shape, generator=g)
    if nan:
        train[5, 0, 3, 4] = float("nan")
    save_file({"train": train, "eval": eval_, "train_labels": torch.arange(16) % 10, "eval_labels": torch.arange(8) % 10},
              str(folder / "latents.safetensors"))
    codec = {"kind": "identity", "latent_shape": list(shape), "image_shape": list(shape), "mean": [0.0] * shape[0],
             "std": [0.5] * shape[0], "sigma_data": 0.5}
    (folder / "codec.json").write_text(json.dumps(codec))
    return folder


def _png(path: Path, size: int, value: int = 128) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", (size, size), value).save(path)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def fx(tmp_path_factory) -> dict[str, str]:
    """Paths (as strings) of the inputs the cases refer to as ``{name}``."""
    from study.models import build_net, save_model

    root = tmp_path_factory.mktemp("fixtures")
    p: dict[str, Path | str] = {}
    p["latents"] = _latents(root / "latents")
    p["latents_nan"] = _latents(root / "latents_nan", nan=True)
    p["latents_bad_codec"] = _latents(root / "latents_bad_codec")
    (root / "latents_bad_codec" / "codec.json").write_text('{"kind": "identity", "mean": [0.0, 0.0]')
    (root / "prepared_bad_manifest").mkdir()
    (root / "prepared_bad_manifest" / "images.parquet").write_bytes(b"PAR1")
    (root / "prepared_bad_manifest" / "manifest.json").write_text('{"sha256": 5}')
    p["prepared_bad_manifest"] = root / "prepared_bad_manifest"

    # A cpu-xs teacher on the 2×8×8 latents and a truncated copy.
    torch.manual_seed(0)
    (root / "teacher_xs").mkdir()
    save_model(root / "teacher_xs" / "model.safetensors", build_net("cpu-xs", SHAPE),
               {"role": "teacher", "scale": "cpu-xs", "latent_shape": list(SHAPE), "sigma_data": 0.5})
    p["teacher_xs"] = root / "teacher_xs"
    p["teacher_xs_file"] = root / "teacher_xs" / "model.safetensors"
    data = p["teacher_xs_file"].read_bytes()
    (root / "truncated").mkdir()
    (root / "truncated" / "model.safetensors").write_bytes(data[: len(data) // 2])
    p["truncated"] = root / "truncated"
    p["truncated_file"] = root / "truncated" / "model.safetensors"
    nan_net = build_net("cpu-xs", SHAPE)
    with torch.no_grad():
        next(nan_net.parameters()).fill_(float("nan"))
    (root / "teacher_nan").mkdir()
    save_model(root / "teacher_nan" / "model.safetensors", nan_net,
               {"role": "teacher", "scale": "cpu-xs", "latent_shape": list(SHAPE), "sigma_data": 0.5})
    p["teacher_nan"] = root / "teacher_nan"

    # Image folders.
    (root / "img_empty").mkdir()
    p["img_empty"] = root / "img_empty"
    (root / "img_empty_class" / "a").mkdir(parents=True)
    _png(root / "img_empty_class" / "b" / "0.png", 8)
    p["img_empty_class"] = root / "img_empty_class"
    for i in range(3):
        _png(root / "img_corrupt" / "a" / f"{i}.png", 8, 40 * i)
        _png(root / "img_truncated" / "a" / f"{i}.png", 8, 40 * i)
    (root / "img_corrupt" / "a" / "bad.png").write_bytes(hashlib.sha256(b"x").digest() * 20)
    noisy = Image.frombytes("L", (8, 8), hashlib.sha256(b"y").digest() * 2)  # incompressible: the cut hits the pixels
    noisy.save(root / "img_truncated" / "a" / "cut.png")
    cut = (root / "img_truncated" / "a" / "cut.png").read_bytes()
    (root / "img_truncated" / "a" / "cut.png").write_bytes(cut[: len(cut) // 2])
    p["img_corrupt"], p["img_truncated"] = root / "img_corrupt", root / "img_truncated"
    for i, size in enumerate([8, 8, 10, 8]):
        _png(root / "img_mixed" / ("a" if i % 2 else "b") / f"{i}.png", size)
    p["img_mixed"] = root / "img_mixed"

    # params files: the project's params.yaml with one defect each.
    text = (ROOT / "params.yaml").read_text()
    raw = yaml.safe_load(text)

    def with_top_level_key(d: dict) -> None:
        d["bogus_section"] = {"x": 1}

    def with_key_in_profile(d: dict) -> None:
        profiles = d.setdefault("profiles", {}) or {}
        smoke = profiles.setdefault("smoke", {}) or {}
        smoke.setdefault("teacher", {})["stepz"] = 3
        profiles["smoke"], d["profiles"] = smoke, profiles

    def with_section_in_profile(d: dict) -> None:
        d.setdefault("profiles", {})["extra"] = {"bogus": {"x": 1}}

    variants: dict[str, object] = {name: copy.deepcopy(raw) for name in ("params_top", "params_profile_key", "params_profile_section")}
    with_top_level_key(variants["params_top"])
    with_key_in_profile(variants["params_profile_key"])
    with_section_in_profile(variants["params_profile_section"])
    variants["params_list"] = ["just", "a list"]
    for name, content in variants.items():
        (root / f"{name}.yaml").write_text(yaml.safe_dump(content, sort_keys=False))
        p[name] = root / f"{name}.yaml"
    (root / "params_bad_yaml.yaml").write_text(text + "\nteacher: [unclosed\n")
    p["params_bad_yaml"] = root / "params_bad_yaml.yaml"
    (root / "params_binary.yaml").write_bytes(b"\xff\xfe\x00\x81 not text")
    p["params_binary"] = root / "params_binary.yaml"

    p["url"] = f"http://127.0.0.1:{_closed_port()}/teacher/model.safetensors"  # nothing listens there
    p["sha"] = hashlib.sha256(b"some other file").hexdigest()
    return {k: str(v) for k, v in p.items()}


# --------------------------------------------------------------------------------------------------------------
# The table.


STAGE_ARGS = {
    "data": ["--out", OUT],
    "encode": ["--data", "data/prepared", "--out", OUT],
    "classifier": ["--data", "data/prepared", "--out", OUT],
    "teacher": ["--scale", "cpu-xs", "--latents", "{latents}", "--out", OUT, "--metrics", METRICS, "--history", HISTORY],
    "distill": ["--scale", "cpu-xs", "--latents", "{latents}", "--teacher", "{teacher_xs}", "--out", OUT,
                "--metrics", METRICS, "--history", HISTORY],
    "sample": ["--scale", "cpu-xs", "--latents", "{latents}", "--teacher", "{teacher_xs}", "--student", "{teacher_xs}",
               "--out", OUT],
    "report": ["--out", OUT],
}


@dataclass(frozen=True)
class Case:
    id: str
    stage: str
    args: tuple[str, ...]  # after the stage's defaults (later flags win); "{name}" is a fixture path
    expect: tuple[str, ...]  # substrings of the error line ("{name}" allowed)
    preexisting: bool = False  # create OUT with a sentinel first: it must stay byte-identical
    names_source: bool = False  # a teacher.source case: see test_a_fetched_teacher_error_names_the_source

    def argv(self, fx: dict[str, str]) -> list[str]:
        tiny = [a for kv in TINY for a in ("-S", kv)]
        return [sys.executable, "-m", f"stages.{self.stage}",
                *(a.format(**fx) for a in (*STAGE_ARGS[self.stage], *tiny, *self.args))]


def S(*kvs: str) -> tuple[str, ...]:
    return tuple(a for kv in kvs for a in ("-S", kv))



CASES = [
    # params.yaml and -S overrides. The whole file is validated whatever the stage, so most rows use the data stage
    # (no torch import: fast); a row for each other stage shows that its CLI goes through the same loader.
    Case("unknown-top-level-key", "data", ("--params", "{params_top}"), ("bogus_section", "unknown top-level key")),
    Case("unknown-key-in-section", "data", S("teacher.stepz=3"), ("teacher.stepz", "unknown key")),
    Case("unknown-key-in-profile", "data", ("--params", "{params_profile_key}"), ("profiles.smoke.teacher.stepz", "unknown key")),
    Case("unknown-section-in-profile", "data", ("--params", "{params_profile_section}"), ("profiles.extra.bogus", "unknown section")),
    Case("unknown-section-override", "data", S("bogus.x=1"), ("bogus", "unknown section")),
    Case("string-for-int", "data", S("distill.steps=abc"), ("distill.steps", "expected int", "'abc'")),
    Case("list-for-float", "data", S("distill.lr=[0.1, 0.2]"), ("distill.lr", "expected float")),
    Case("bool-for-int", "data", S("data.max_images=true"), ("data.max_images", "expected int", "True")),
    Case("string-for-bool", "data", S("teacher.adaptive_weight=maybe"), ("teacher.adaptive_weight", "expected bool")),
    Case("scalar-for-section", "data", S("teacher=5"), ("teacher", "expected a mapping")),
    Case("zero-steps", "data", S("teacher.steps=0"), ("teacher.steps", ">= 1", "got 0")),
    Case("negative-batch-size", "sample", S("sample.batch_size=-1"), ("sample.batch_size", "got -1")),
    Case("eval-fraction-out-of-range", "data", S("data.eval_fraction=1.5"), ("data.eval_fraction", "got 1.5")),
    Case("sigma-data-zero", "data", S("base.sigma_data=0"), ("base.sigma_data", "> 0.0")),
    Case("nan-learning-rate", "data", S("distill.lr=.nan"), ("distill.lr", "finite")),
    Case("dropout-one", "data", S("teacher.dropout=1.0"), ("teacher.dropout", "< 1.0")),
    Case("channels-two", "data", S("data.channels=2"), ("data.channels", "got 2")),
    Case("latent-mean-length", "data", S("encode.latent_mean=[0.0]"), ("encode.latent_mean", "expected 4 values")),
    Case("empty-block-widths", "data", S("encode.channels=[]"), ("encode.channels", "at least one")),
    Case("unknown-tangent", "data", S("distill.tangent=exact"), ("distill.tangent", "'exact'")),
    Case("unknown-precision", "data", S("base.precision=fp16"), ("base.precision", "'fp16'")),
    Case("negative-checkpoint-interval", "data", S("distill.checkpoint_every=-5"), ("distill.checkpoint_every",)),
    Case("micro-batch-not-dividing", "teacher", S("teacher.batch_per_device=48"), ("teacher.batch_per_device=48", "does not divide")),
    Case("unknown-profile", "classifier", ("--profile", "nope"), ("profile", "unknown profile 'nope'", "smoke")),
    Case("unknown-data-source", "data", S("data.source=imagenet"), ("data.source", "'imagenet'")),
    Case("override-without-equals", "data", ("-S", "teacher.steps"), ("teacher.steps", "key=value")),
    Case("params-file-missing", "data", ("--params", "nope.yaml"), ("nope.yaml", "not found")),
    Case("params-not-yaml", "data", ("--params", "{params_bad_yaml}"), ("{params_bad_yaml}", "not valid YAML")),
    Case("params-a-list", "data", ("--params", "{params_list}"), ("expected a mapping at the top level",)),
    Case("override-not-yaml", "data", S("teacher.steps=[1"), ("teacher.steps",)),
    Case("override-into-a-scalar", "data", S("teacher.steps.max=3"), ("teacher.steps",)),
    Case("params-binary-file", "data", ("--params", "{params_binary}"), ("{params_binary}",)),
    # Scales.
    Case("unknown-scale", "teacher", ("--scale", "huge"), ("'huge'", "cpu-xs")),
    # Missing files.
    Case("encode-missing-data", "encode", ("--data", "nope/prepared"), ("nope/prepared", "not found")),
    Case("teacher-missing-latents", "teacher", ("--latents", "nope/latents"), ("nope/latents/latents.safetensors", "not found")),
    Case("distill-missing-teacher", "distill", ("--teacher", "nope/teacher"), ("nope/teacher", "not found"), preexisting=True),
    # Image folders.
    Case("empty-imagefolder", "data", S("data.source=imagefolder", "data.root={img_empty}"), ("{img_empty}", "no images")),
    Case("empty-class-folder", "data", S("data.source=imagefolder", "data.root={img_empty_class}"), ("{img_empty_class}/a", "no images")),
    Case("imagefolder-root-missing", "data", S("data.source=imagefolder", "data.root=nope/images"), ("nope/images", "no such directory")),
    Case("corrupt-image", "data", S("data.source=imagefolder", "data.root={img_corrupt}"), ("bad.png", "not a readable image"),
         preexisting=True),
    Case("truncated-image", "data", S("data.source=imagefolder", "data.root={img_truncated}"), ("cut.png", "not a readable image")),
    Case("mixed-image-sizes", "data", S("data.source=imagefolder", "data.root={img_mixed}"), ("10x10", "data.image_size")),
    # Latents.
    Case("nan-latents", "teacher", ("--latents", "{latents_nan}"), ("{latents_nan}", "NaN")),
    # Checkpoints. (More in tests/stages/test_training.py: another latent shape, damaged metadata, a pickle given as
    # teacher.source; a local file with a wrong sha256 in tests/stages/test_fetch.py.)
    Case("teacher-source-other-scale", "teacher", ("--scale", "cpu-s", *S("teacher.source={teacher_xs_file}")),
         ("'cpu-xs'", "'cpu-s'"), preexisting=True, names_source=True),
    Case("teacher-source-truncated", "teacher", S("teacher.source={truncated_file}"), ("not a readable safetensors",),
         names_source=True),
    # URLs.
    Case("unreachable-url", "teacher", S("teacher.source={url}", "teacher.sha256={sha}"), ("{url}", "download failed"),
         preexisting=True, names_source=True),
    Case("url-with-bad-sha256", "teacher", S("teacher.source={url}", "teacher.sha256=deadbeef"), ("{url}", "sha256", "'deadbeef'"),
         names_source=True),
    # Values the loader used to accept, and checks across sections that used to fail late.
    Case("empty-scales", "data", S("base.scales=[]"), ("base.scales", "at least one scale")),
    Case("repeated-scale", "data", S("base.scales=[cpu-xs, cpu-xs]"), ("base.scales", "'cpu-xs' is listed twice")),
    Case("unknown-scale-in-params", "data", S("base.scales=[cpu-xxl]"), ("base.scales", "'cpu-xxl'")),
    Case("t-mid-beyond-t-max", "data", S("base.sigma_data=50"), ("sample.t_mid", "t_max")),
    Case("seed-too-large", "data", S("base.seed=18446744073709551616"), ("base.seed",)),
    Case("kid-subset-beyond-samples", "data", S("evaluate.kid_subset_size=5000"), ("evaluate.kid_subset_size", "sample.num_samples")),
    Case("empty-teacher-source", "data", S("teacher.source=''"), ("teacher.source", "empty")),
    Case("override-without-key", "data", ("-S", "=5"), ("'=5'", "dotted key")),
    # Non-finite models.
    Case("nan-teacher-source", "teacher", S("teacher.source={teacher_nan}"), ("NaN or inf",), preexisting=True,
         names_source=True),
    Case("nan-student", "sample", ("--student", "{teacher_nan}"), ("{teacher_nan}", "NaN or inf"), preexisting=True),
    # Outputs that would destroy an input, or cannot be written (checked before anything runs).
    Case("out-is-an-input", "teacher", ("--out", "{latents}"), ("--out", "overlaps the input --latents")),
    Case("metrics-inside-an-input", "teacher", ("--metrics", "{latents}/latents.safetensors"),
         ("--metrics", "overlaps the input --latents")),
    Case("out-contains-the-inputs", "report", ("--out", "metrics"), ("--out 'metrics'", "overlaps the input --metrics")),
    Case("out-is-the-project", "data", ("--out", "."), ("--out '.'", "project root")),
    Case("out-under-a-file", "data", ("--out", "params.yaml/prepared"), ("--out", "params.yaml is a file")),
    # Damaged files a stage reads.
    Case("damaged-manifest", "encode", ("--data", "{prepared_bad_manifest}"), ("{prepared_bad_manifest}/manifest.json", "not a manifest")),
    Case("damaged-codec-description", "sample", ("--latents", "{latents_bad_codec}"), ("{latents_bad_codec}/codec.json",
                                                                                        "not a codec description")),
    Case("metrics-under-a-file", "teacher", ("--metrics", "params.yaml/m.json"), ("--metrics", "params.yaml is a file"),
         preexisting=True),
]


def _case(c) -> Case:
    return c.values[0] if hasattr(c, "values") else c


# --------------------------------------------------------------------------------------------------------------
# Running the table.


@dataclass
class Result:
    project: Path
    returncode: int
    stdout: str
    stderr: str
    before: dict[str, bytes] = field(repr=False)
    after: dict[str, bytes] = field(repr=False)


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (hidden ones too) with its bytes."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def run_case(case: Case, fx: dict[str, str], project: Path) -> Result:
    shutil.copy(ROOT / "params.yaml", project / "params.yaml")
    if case.preexisting:
        (project / OUT / "sub").mkdir(parents=True)
        (project / OUT / "sentinel.txt").write_text("from an earlier, successful run\n")
        (project / OUT / "sub" / "model.safetensors").write_bytes(b"\x00\x01 earlier weights")
    before = snapshot(project)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "HF_HUB_OFFLINE": "1", "DVC_NO_ANALYTICS": "true", "MLFLOW_DISABLE_TELEMETRY": "true"}
    for name in ("DVC_ROOT", "http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        env.pop(name, None)
    res = subprocess.run(case.argv(fx), cwd=project, env=env, capture_output=True, text=True, timeout=300)
    return Result(project, res.returncode, res.stdout, res.stderr, before, snapshot(project))


@pytest.fixture(scope="module")
def launched(request, fx, tmp_path_factory) -> dict[str, Future]:
    """Start the selected cases' subprocesses, a few at a time; each test waits for its own."""
    selected = [item.callspec.params["case"] for item in request.session.items
                if item.module is request.module and hasattr(item, "callspec") and "case" in item.callspec.params]
    pool = ThreadPoolExecutor(WORKERS)
    slow_first = sorted(dict.fromkeys(selected), key=lambda c: c.stage == "data")  # torch stages take the longest
    futures = {c.id: pool.submit(run_case, c, fx, tmp_path_factory.mktemp(c.id)) for c in slow_first}
    yield futures
    pool.shutdown(wait=True, cancel_futures=True)


_NOISE = [
    re.compile(r"\d+%\|"),  # tqdm bars
    re.compile(r"\b\w*Warning: "),  # warnings.warn headers; their indented source line follows
]


def error_lines(stderr: str) -> list[str]:
    """The lines of ``stderr`` that are not tqdm bars or Python warnings."""
    kept: list[str] = []
    after_warning = False
    for line in stderr.replace("\r", "\n").splitlines():
        if not line.strip():
            continue
        if after_warning and line.startswith((" ", "\t")):
            continue
        after_warning = bool(_NOISE[1].search(line))
        if after_warning or _NOISE[0].search(line):
            continue
        kept.append(line)
    return kept


def test_error_lines_filter():
    noisy = ("teacher:  40%|####      | 2/5 [00:01<00:02]\r\n"
             "/x/y.py:3: UserWarning: something\n  warnings.warn('something')\n\nerror: teacher.steps: bad\n")
    assert error_lines(noisy) == ["error: teacher.steps: bad"]
    assert error_lines("Traceback (most recent call last):\n  File 'x'\nerror: boom\n")[0].startswith("Traceback")


@pytest.mark.parametrize("case", CASES, ids=[_case(c).id for c in CASES])
def test_bad_input_is_one_line_exit_2_and_leaves_nothing(case: Case, launched, fx):
    r: Result = launched[case.id].result()
    where = f"\n$ {' '.join(case.argv(fx))}\n--- stderr ---\n{r.stderr[-3000:]}"
    assert "Traceback" not in r.stderr, where
    assert r.returncode == 2, where
    lines = error_lines(r.stderr)
    assert len(lines) == 1 and lines[0].startswith("error: "), where
    for expected in case.expect:
        assert expected.format(**fx) in lines[0], f"{expected.format(**fx)!r} not in the error line{where}"
    # Nothing left behind: the project holds exactly the files it held before, byte for byte...
    changed = sorted(k for k in set(r.before) | set(r.after) if r.before.get(k) != r.after.get(k))
    assert not changed, f"files added, removed or changed: {changed}"
    # ...and no output or temporary directory (empty or not) appeared.
    out = r.project / OUT
    assert out.exists() == case.preexisting
    leftovers = [p.name for p in out.parent.iterdir() if p.name != out.name] if out.parent.exists() else []
    assert leftovers == [], leftovers
    assert not (r.project / METRICS).exists() and not (r.project / HISTORY).exists()


SOURCE_CASES = [c for c in CASES if isinstance(c, Case) and c.names_source]
_SOURCE_NAMED_BY_FETCH = {"unreachable-url", "url-with-bad-sha256"}


@pytest.mark.parametrize("case", SOURCE_CASES, ids=[c.id for c in SOURCE_CASES])
def test_a_fetched_teacher_error_names_the_source(case: Case, launched, fx):
    """The error about a teacher.source names what the user wrote, not a temporary file."""
    r: Result = launched[case.id].result()
    line = error_lines(r.stderr)[-1]
    source = next(a.split("=", 1)[1] for a in case.args if a.startswith("teacher.source=")).format(**fx)
    assert r.returncode == 2 and source in line and ".tmp-" not in line, line
